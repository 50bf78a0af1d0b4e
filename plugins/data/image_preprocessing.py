"""Image preprocessing declared in a spec, shared by the ``images`` and ``hf_dataset`` sources.

Each image goes through these steps, in this order (Pillow does the decoding and resampling):

1. ``color``: converted to RGB (3 channels) or grey (1 channel, ITU-R 601-2 luma
   L = (19595·R + 38470·G + 7471·B + 2¹⁵) >> 16, Pillow's conversion), its pixel values on the
   scale of 8-bit images, 0 (black) to 255 (white), whatever the file's depth (see below);
2. ``resize``: ``N`` scales the shorter side to N and the longer one to ⌊N · long / short⌋
   (aspect kept, as torchvision's ``Resize(N)``), ``[h, w]`` to exactly h × w; with
   ``interpolation`` (bilinear by default; Pillow filters down-scaling with a support widened by
   the scale, i.e. antialiased);
3. ``center_crop``: ``N`` or ``[h, w]``, the top-left corner at (round((H − h)/2), round((W − w)/2));
4. ``scale``: pixel values (0..255) multiplied by it (1/255 by default, giving 0..1);
5. ``normalize``: per channel (x − mean) / std, a preset (``imagenet``: mean 0.485, 0.456, 0.406,
   std 0.229, 0.224, 0.225; ``clip``: mean 0.4815, 0.4578, 0.4082, std 0.2686, 0.2613, 0.2758;
   ``half``: 0.5 and 0.5) or ``{mean: [...], std: [...]}``;
6. ``layout``: samples are (C, H, W) with ``nchw`` (default) or (H, W, C) with ``nhwc``. A model
   whose input asks for the other layout (e.g. a Keras model's (batch, H, W, 3)) receives its
   own: the run moves the channel axis when the input's shape says so.

Images of different sizes need ``resize: [h, w]`` or ``center_crop`` to give every sample one shape.

**Bit depths.** Step 1 puts every image on the 0..255 scale by the range of its pixel type, so
that ``scale`` means the same for every file and one picture stored at any depth gives the same
samples: 8-bit channels (modes L, RGB, RGBA, P with its palette, LA, CMYK, YCbCr, HSV, LAB, … as
Pillow converts them; alpha is dropped) as they are; 1-bit images as 0 and 255; 16-bit images
(I;16, I;16B, …, 16-bit PGM/PPM) as v · 255/65535; 32-bit integer TIFFs by their type, unsigned
v · 255/(2³² − 1), signed v · 255/(2³¹ − 1) (negative pixels have no place on the scale and are
refused); float images (mode F, e.g. 32-bit float TIFFs) are taken as already on the 0..1 scale
(1.0 is white) and give v · 255, not clipped, NaN or Inf refused. Deep images are resized in
floating point, keeping their precision. Pillow reads 16-bit RGB(A) PNGs as 8 bits per channel
(their high bytes). A mode or an integer type whose range the file does not tell (a 32-bit
integer image of another format) is refused naming the file and its mode: never clipped.

**Memory.** An image whose header gives more than ``max_pixels`` pixels (width × height; default
89,478,485, Pillow's own limit, about 256 MiB as 8-bit RGB; at most twice that, where Pillow refuses
to open a file) is refused before it is decoded: a small file can claim a huge image (a
decompression bomb). A batch holds its samples (the arrays the model is fed) and, while it is
read, the images being decoded (each with its converted and resized copies): the ``images``
source's threads decode at once only as many images as hold ``max_pixels`` pixels together (small
images in parallel, huge ones one after another).
"""

from __future__ import annotations

import io
import re
import struct
import threading
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from layerscope.util.errors import UserError
from layerscope.util.params import Count

NORMALIZE_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
Size = PositiveInt | tuple[PositiveInt, PositiveInt]

#: Pillow's ``Image.MAX_IMAGE_PIXELS`` (it warns above it and refuses to open twice as many pixels).
MAX_PIXELS = 89_478_485
PILLOW_MAX_PIXELS = 2 * MAX_PIXELS
#: Modes of 8 bits per channel, which Pillow converts to RGB and L (directly or through RGB).
EIGHT_BIT_MODES = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
)
#: Held while Pillow's warning filter is changed (:func:`quiet_pillow`).
_QUIET = threading.Lock()
#: What Pillow raises for a file it cannot read or decode (plugins raise SyntaxError, struct.error …).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error)


@contextmanager
def opened_image(source: Path | bytes, where: str | Path | None = None, max_pixels: int = MAX_PIXELS):
    """The image at *source* (a path, or a file's bytes), opened by Pillow (its header read; pixels decoded
    on use); *where* names it in errors (default: the path). An image of more than *max_pixels* pixels is
    refused before it is decoded, and a file Pillow cannot read, now or while decoding in the block, is a
    user error naming it."""
    from PIL import Image

    where = where if where is not None else source if isinstance(source, Path) else "an image"
    try:
        with quiet_pillow():  # the header read: Pillow warns of an image over its limit, layerscope checks
            opened = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        with opened as image:
            width, height = image.size
            if width * height > max_pixels:
                raise UserError(
                    f"data: {where} has {width}×{height} = {width * height:,} pixels, "
                    f"{too_large(width * height, max_pixels)}"
                )
            try:
                yield image
            finally:
                image.close()  # its decoded pixels, now
    except Image.DecompressionBombError as error:  # more than Pillow opens at all: the header's size
        claimed = re.search(r"Image size \((\d+) pixels\)", str(error))
        if claimed is None:
            raise UserError(f"data: {where} is too large an image for Pillow ({error})") from None
        raise UserError(
            f"data: {where} has {int(claimed[1]):,} pixels, {too_large(int(claimed[1]), max_pixels)}"
        ) from None
    except DECODE_ERRORS as error:
        raise UserError(f"data: {where} is not a readable image ({error})") from None


def too_large(pixels: int, max_pixels: int) -> str:
    """Why an image of *pixels* (over *max_pixels*) is refused, and what to do about it."""
    if pixels > PILLOW_MAX_PIXELS:  # max_pixels goes no higher
        return (
            f"more than layerscope decodes at all ({PILLOW_MAX_PIXELS:,}, the highest data.max_pixels; Pillow "
            "refuses larger images); make the image smaller to read it"
        )
    return f"more than data.max_pixels ({max_pixels:,}); raise it to read the image (decoded, it is held in memory)"


@contextmanager
def quiet_pillow():
    """Pillow's DecompressionBombWarning silenced in the block, where layerscope checks an image's size itself
    (refused with a message of its own, or read because data.max_pixels allows it): the user sees one message,
    not Pillow's warning first. Warning filters are global, so the blocks of all threads take turns (the header
    reads, and the decoding of images over Pillow's limit, which hold most of a batch's pixel budget anyway)."""
    from PIL import Image

    with _QUIET, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _integer_type(image, where) -> tuple[int, bool]:
    """(bits, signed) of the integer pixels of a mode-I image (or a signed 8-bit TIFF), from the file."""
    if image.format == "TIFF":
        bits = image.tag_v2.get(258, (1,))
        signed = image.tag_v2.get(339, (1,))
        bits, signed = (bits[0], signed[0]) if isinstance(bits, tuple) and isinstance(signed, tuple) else (0, 0)
        if bits in (8, 16, 32) and signed in (1, 2):
            return bits, signed == 2
    elif image.format in ("PNG", "PPM"):  # Pillow widens 16-bit PNG (older versions) and PGM/PPM to mode I
        return 16, False
    raise UserError(
        f"data: {where} has {image.mode} pixels of a type layerscope cannot tell the range of "
        f"({image.format or 'unknown'} format); save it with 8 or 16 bits per channel"
    )


def deep_pixels(image, where) -> np.ndarray | None:
    """The pixels of a single-channel image deeper than 8 bits (modes I;16…, I, F, and signed 8-bit TIFFs)
    as float32 on the 0..255 scale (see the module docstring), decoding it; None for other images."""
    mode = image.mode
    signed_bytes = mode == "L" and image.format == "TIFF" and image.tag_v2.get(339, (1,)) == (2,)
    if not (mode.startswith("I;16") or mode in ("I", "F") or signed_bytes):
        return None
    values = np.asarray(image)
    if mode.startswith("I;16"):
        return values.astype(np.float32) / np.float32(257)  # 65535 / 255, exactly
    if mode == "F":
        values = values.astype(np.float32, copy=False)
        if not np.isfinite(values).all():
            raise UserError(f"data: {where} has pixels that are not finite (NaN or Inf; a float image, mode F)")
        return values * np.float32(255)
    bits, signed = _integer_type(image, where)
    if signed:
        values = values.view(np.int8) if bits == 8 else values
        if values.min() < 0:
            raise UserError(
                f"data: {where} has negative pixels (a signed {bits}-bit image, mode {mode}); images are "
                "read on a black-to-white scale from 0: save it unsigned"
            )
    elif bits == 32:
        values = values.view(np.uint32)  # Pillow holds unsigned 32-bit pixels in int32
    top = 2 ** (bits - signed) - 1
    return (values.astype(np.float32) / np.float32(top / 255)).astype(np.float32, copy=False)


class PixelBudget:
    """Pixels that threads may hold decoded at once: a thread decoding an image takes its pixels (at most the
    whole budget) and waits while others hold too many, so small images decode in parallel and huge ones
    one after another."""

    def __init__(self, pixels: int):
        self.pixels, self.held = pixels, 0
        self._changed = threading.Condition()

    def take(self, pixels: int) -> int:
        """Wait until *pixels* (capped at the budget) are free, hold them and return how many were taken."""
        pixels = max(1, min(pixels, self.pixels))
        with self._changed:
            self._changed.wait_for(lambda: self.held + pixels <= self.pixels)
            self.held += pixels
        return pixels

    def give(self, pixels: int) -> None:
        with self._changed:
            self.held -= pixels
            self._changed.notify_all()


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
    scale: float = Field(
        1 / 255, description="pixel values (0..255, every bit depth brought to that scale) are multiplied by this"
    )
    normalize: Literal["imagenet", "clip", "half"] | Normalization | None = Field(
        None, description="per channel (x - mean) / std after scale: a preset or {mean: [...], std: [...]}"
    )
    layout: Literal["nchw", "nhwc"] = Field("nchw", description="channel axis first (C, H, W) or last (H, W, C)")
    max_pixels: Count = Field(
        MAX_PIXELS,
        le=PILLOW_MAX_PIXELS,
        description="an image of more pixels (width × height, from its header) is refused before it is decoded",
    )

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

    def sample_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """The shape of the sample an image of *width* × *height* gives: steps 2, 3 and 6."""
        width, height = self.resized(width, height)
        if self.center_crop is not None:
            height, width = (self.center_crop,) * 2 if isinstance(self.center_crop, int) else self.center_crop
        return (self.channels, height, width) if self.layout == "nchw" else (height, width, self.channels)

    def __call__(
        self,
        source: Path | bytes,
        where: str | Path | None = None,
        out: np.ndarray | None = None,
        budget: PixelBudget | None = None,
    ) -> np.ndarray:
        """The image at *source* (a path, or an image file's bytes that *where* names) through every step, as
        float32 (C, H, W) or (H, W, C), written into *out* (a sample of a batch) when given, decoded once
        *budget* (shared by the threads decoding a batch) holds its pixels; an unreadable image, one over
        ``max_pixels`` or one smaller than the crop is a user error naming the file."""
        where = where if where is not None else source if isinstance(source, Path) else "an image"
        held = 0
        try:
            with opened_image(source, where, self.max_pixels) as image:
                held = budget.take(image.width * image.height) if budget is not None else 0
                with quiet_pillow() if image.width * image.height > MAX_PIXELS else nullcontext():
                    pixels = self._pixels(image, where)  # Pillow checks again while decoding GIF and TIFF
        finally:
            if budget is not None and held:
                budget.give(held)
        return self._finish(pixels, where, out)

    def _pixels(self, image, where) -> np.ndarray:
        """Steps 1 and 2: the decoded, converted and resized pixels, (H, W, 1 or 3), uint8 or float32 (deep
        images) on the 0..255 scale; a grey image stays one channel (made three by :meth:`_finish`)."""
        from PIL import Image

        deep = deep_pixels(image, where)
        if deep is not None:
            size = self.resized(deep.shape[1], deep.shape[0])
            if size == (deep.shape[1], deep.shape[0]):
                return deep[..., None]
            image, deep = Image.fromarray(deep), None  # mode F: resampled in floating point
        elif image.mode in EIGHT_BIT_MODES:
            image.load()  # decoding errors are errors of the file, not of the conversion
            grey = self.channels == 1 or image.mode in ("1", "L", "LA")
            image = self._converted(image, "L" if grey else "RGB", where)
        else:
            raise UserError(f"data: {where} has pixels of mode {image.mode}, which layerscope does not read")
        size = self.resized(*image.size)
        if size != image.size:
            image = image.resize(size, getattr(Image.Resampling, self.interpolation.upper()))
        pixels = np.asarray(image)
        return pixels if pixels.ndim == 3 else pixels[..., None]

    @staticmethod
    def _converted(image, mode: str, where):
        """*image* (8 bits per channel) converted by Pillow to *mode* (directly, else through RGB)."""
        if image.mode == mode:
            return image
        try:
            try:
                converted = image.convert(mode)
            except ValueError:  # e.g. LAB converts to RGB only
                converted = image.convert("RGB").convert(mode)
        except ValueError:
            raise UserError(f"data: {where} has pixels of mode {image.mode}, which Pillow cannot convert") from None
        image.close()  # the decoded original: one decoded image per thread at a time
        return converted

    def _finish(self, pixels: np.ndarray, where, out: np.ndarray | None) -> np.ndarray:
        """Steps 3-6 on resized (H, W, 1 or 3) pixels, into *out* (allocated when None)."""
        if self.center_crop is not None:
            height, width = (self.center_crop,) * 2 if isinstance(self.center_crop, int) else self.center_crop
            if height > pixels.shape[0] or width > pixels.shape[1]:
                raise UserError(
                    f"data: {where} is {pixels.shape[1]}×{pixels.shape[0]} after resize, smaller than "
                    f"center_crop {width}×{height}; resize it to at least the crop"
                )
            top, left = round((pixels.shape[0] - height) / 2), round((pixels.shape[1] - width) / 2)
            pixels = pixels[top : top + height, left : left + width]
        channels_first = self.layout == "nchw"
        shape = (self.channels, *pixels.shape[:2]) if channels_first else (*pixels.shape[:2], self.channels)
        if out is None:
            out = np.empty(shape, np.float32)
        elif out.shape != shape:
            raise UserError(
                f"data: the images differ in size ({where} gives a sample of shape {list(shape)}, the first "
                f"of its batch {list(out.shape)}); set resize: [h, w] or center_crop to give every sample one shape"
            )
        np.copyto(out, pixels.transpose(2, 0, 1) if channels_first else pixels, casting="unsafe")  # 1 → 3 channels
        out *= np.float32(self.scale)
        normalization = self.mean_std()
        if normalization is not None:
            mean, std = (v[:, None, None] for v in normalization) if channels_first else normalization
            out -= mean
            out /= std
        return out
