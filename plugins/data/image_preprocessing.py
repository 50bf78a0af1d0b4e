"""Image preprocessing declared in a spec, shared by the ``images`` and ``hf_dataset`` sources.

Each image goes through these steps, in this order (Pillow does the decoding and resampling):

1. ``color``: converted to RGB (3 channels) or grey (1 channel, ITU-R 601-2 luma
   L = (19595·R + 38470·G + 7471·B + 2¹⁵) >> 16, Pillow's conversion);
2. ``resize``: ``N`` scales the shorter side to N and the longer one to ⌊N · long / short⌋
   (aspect kept, as torchvision's ``Resize(N)``), ``[h, w]`` to exactly h × w; with
   ``interpolation`` (bilinear by default; Pillow filters down-scaling with a support widened by
   the scale, i.e. antialiased);
3. ``center_crop``: ``N`` or ``[h, w]``, the top-left corner at (round((H − h)/2), round((W − w)/2));
4. ``scale``: pixel values (0..255) multiplied by it (1/255 by default);
5. ``normalize``: per channel (x − mean) / std, a preset (``imagenet``: mean 0.485, 0.456, 0.406,
   std 0.229, 0.224, 0.225; ``clip``: mean 0.4815, 0.4578, 0.4082, std 0.2686, 0.2613, 0.2758;
   ``half``: 0.5 and 0.5) or ``{mean: [...], std: [...]}``;
6. ``layout``: samples are (C, H, W) with ``nchw`` (default) or (H, W, C) with ``nhwc``. A model
   whose input asks for the other layout (e.g. a Keras model's (batch, H, W, 3)) receives its
   own: the run moves the channel axis when the input's shape says so.

Images of different sizes need ``resize: [h, w]`` or ``center_crop`` to give every sample one shape.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from layerscope.util.errors import UserError

NORMALIZE_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
Size = PositiveInt | tuple[PositiveInt, PositiveInt]


@contextmanager
def opened_image(path: Path):
    """The image file at *path*, opened by Pillow (its header read; pixels decoded on use); a file Pillow
    cannot read, now or while decoding in the block, is a user error naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            yield image
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UserError(f"data: {path} is not a readable image ({error})") from None


class Normalization(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mean: list[float] = Field(min_length=1)
    std: list[PositiveFloat] = Field(min_length=1)


class ImagePreprocessing(BaseModel):
    """The preprocessing keys of an image data source (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    color: Literal["rgb", "grey", "gray"] = Field("rgb", description="rgb: 3 channels; grey: 1 (luma)")
    resize: Size | None = Field(None, description="N: shorter side to N, aspect kept; [h, w]: exactly")
    interpolation: Literal["bilinear", "bicubic", "nearest", "box", "lanczos"] = "bilinear"
    center_crop: Size | None = Field(None, description="N or [h, w], cut from the centre after resize")
    scale: float = Field(1 / 255, description="pixel values (0..255) are multiplied by this")
    normalize: Literal["imagenet", "clip", "half"] | Normalization | None = Field(
        None, description="per channel (x - mean) / std after scale: a preset or {mean: [...], std: [...]}"
    )
    layout: Literal["nchw", "nhwc"] = Field("nchw", description="channel axis first (C, H, W) or last (H, W, C)")

    @property
    def channels(self) -> int:
        return 3 if self.color == "rgb" else 1

    @model_validator(mode="after")
    def _normalization_fits_the_channels(self) -> ImagePreprocessing:
        if not isinstance(self.normalize, Normalization):
            return self  # the presets fit any color
        for what, values in (("mean", self.normalize.mean), ("std", self.normalize.std)):
            if len(values) not in (1, self.channels):
                raise ValueError(
                    f"normalize.{what} has {len(values)} values; color {self.color} has "
                    f"{self.channels} channel{'s' * (self.channels > 1)} (give 1 or {self.channels})"
                )
        return self

    def mean_std(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-channel mean and std of the normalisation (None without one); a 3-channel preset on grey
        images uses its channels' average."""
        if self.normalize is None:
            return None
        given = (
            NORMALIZE_PRESETS[self.normalize]
            if isinstance(self.normalize, str)
            else (self.normalize.mean, self.normalize.std)
        )
        mean, std = np.asarray(given[0], np.float32), np.asarray(given[1], np.float32)
        if isinstance(self.normalize, str) and self.channels == 1:
            mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
        return mean, std

    @property
    def output_size(self) -> tuple[int, int] | None:
        """The (h, w) every image comes out with, when the steps fix it (None: the images' own size)."""
        fixed = (
            self.center_crop
            if self.center_crop is not None
            else self.resize
            if isinstance(self.resize, tuple)
            else None
        )
        return (fixed, fixed) if isinstance(fixed, int) else fixed

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) an image of *width* × *height* is resized to (step 2)."""
        if self.resize is None:
            return width, height
        if isinstance(self.resize, tuple):
            return self.resize[1], self.resize[0]
        short, long = sorted((width, height))
        scaled = (self.resize, int(self.resize * long / short))
        return scaled if width <= height else scaled[::-1]

    def __call__(self, path: Path) -> np.ndarray:
        """The image file at *path* through every step, as float32 (C, H, W) or (H, W, C); an unreadable
        image or one smaller than the crop is a user error naming the file."""
        with opened_image(path) as image:
            image = self.converted(image)
        return self.process(image, path)

    def converted(self, image):
        """A PIL image in the color mode of step 1 (decoding it)."""
        return image.convert("RGB" if self.channels == 3 else "L")

    def process(self, image, where: str | Path) -> np.ndarray:
        """A PIL image in the color mode of step 1 through steps 2-6."""
        from PIL import Image

        size = self.resized(*image.size)
        if size != image.size:
            image = image.resize(size, getattr(Image.Resampling, self.interpolation.upper()))
        pixels = np.asarray(image, dtype=np.float32)
        if self.center_crop is not None:
            height, width = (self.center_crop,) * 2 if isinstance(self.center_crop, int) else self.center_crop
            if height > pixels.shape[0] or width > pixels.shape[1]:
                raise UserError(
                    f"data: {where} is {pixels.shape[1]}×{pixels.shape[0]} after resize, smaller than "
                    f"center_crop {width}×{height}; resize it to at least the crop"
                )
            top, left = round((pixels.shape[0] - height) / 2), round((pixels.shape[1] - width) / 2)
            pixels = pixels[top : top + height, left : left + width]
        pixels = pixels.reshape(pixels.shape[0], pixels.shape[1], self.channels) * np.float32(self.scale)
        normalization = self.mean_std()
        if normalization is not None:
            pixels = (pixels - normalization[0]) / normalization[1]
        return np.ascontiguousarray(pixels.transpose(2, 0, 1) if self.layout == "nchw" else pixels, np.float32)
