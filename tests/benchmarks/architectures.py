"""ResNet-18, ResNet-50 and MobileNetV3-small, written out as torchvision defines them.

torchvision cannot be installed beside the CPU build of torch on these machines, so the
benchmarks carry their own copies of the three architectures (same layers, same module
names, random weights): ``resnet18()``, ``resnet50()``, ``mobilenet_v3_small()``. Like
torchvision's, the ResNet blocks apply one ``ReLU`` module twice. BERT-base and GPT-2 small
come from ``transformers``' default configurations with random weights (``bert_base()``, ``gpt2()``).
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers: list[int], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(block, 64, layers[0])
        self.layer2 = self._layer(block, 128, layers[1], 2)
        self.layer3 = self._layer(block, 256, layers[2], 2)
        self.layer4 = self._layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


def _divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


def _conv_bn_act(inp: int, out: int, kernel: int, stride: int = 1, groups: int = 1, activation=nn.Hardswish):
    layers = [
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out, eps=0.001, momentum=0.01),
    ]
    return nn.Sequential(*layers, activation()) if activation else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, kernel: int, expanded: int, out: int, se: bool, activation: str, stride: int):
        super().__init__()
        act = nn.Hardswish if activation == "HS" else nn.ReLU
        self.use_res_connect = stride == 1 and inp == out
        layers = [] if expanded == inp else [_conv_bn_act(inp, expanded, 1, activation=act)]
        layers.append(_conv_bn_act(expanded, expanded, kernel, stride, groups=expanded, activation=act))
        if se:
            layers.append(SqueezeExcitation(expanded, _divisible(expanded // 4)))
        layers.append(_conv_bn_act(expanded, out, 1, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        result = self.block(x)
        return result + x if self.use_res_connect else result


#: (input, kernel, expanded, output, squeeze-excite, activation, stride) of MobileNetV3-small
_SMALL = [
    (16, 3, 16, 16, True, "RE", 2),
    (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1),
    (48, 5, 144, 48, True, "HS", 1),
    (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1),
    (96, 5, 576, 96, True, "HS", 1),
]


class MobileNetV3(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers = [_conv_bn_act(3, 16, 3, 2)] + [InvertedResidual(*row) for row in _SMALL] + [_conv_bn_act(96, 576, 1)]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(576, 1024), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1024, num_classes)
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v3_small(num_classes: int = 1000) -> MobileNetV3:
    return MobileNetV3(num_classes)


def bert_base() -> nn.Module:
    """BERT-base (``transformers``' default ``BertConfig``: 12 layers, 768 wide, 3072-wide GELU MLPs), eager
    attention so that each attention map is a tensor of the graph."""
    import transformers

    return transformers.BertModel(transformers.BertConfig(attn_implementation="eager"), add_pooling_layer=False)


def gpt2() -> nn.Module:
    """GPT-2 small (``transformers``' default ``GPT2Config``: 12 layers, 768 wide), eager attention."""
    import transformers

    return transformers.GPT2Model(transformers.GPT2Config(attn_implementation="eager"))


ARCHITECTURES = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenet_v3_small": mobilenet_v3_small,
    "bert_base": bert_base,
    "gpt2": gpt2,
}
#: The architectures that read token ids and an attention mask (the others read 3×224×224 images).
TOKEN_MODELS = {"bert_base", "gpt2"}


def build(name: str, seed: int = 0) -> nn.Module:
    """The architecture *name* with seeded random weights and BatchNorm statistics, in eval mode (no
    download: the transformers models are built from their configurations)."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[name]()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


__all__ = ["ARCHITECTURES", "TOKEN_MODELS", "bert_base", "build", "gpt2", "mobilenet_v3_small", "resnet18", "resnet50"]
