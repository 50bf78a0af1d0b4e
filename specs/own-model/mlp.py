"""A small PyTorch MLP for scikit-learn's 8×8 digits: the model of own-model.yaml (random weights, seeded)."""

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, hidden: int = 32, classes: int = 10):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(64, hidden), nn.GELU()
        self.fc2, self.act2 = nn.Linear(hidden, hidden), nn.Tanh()
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP().eval()
