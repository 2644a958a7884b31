"""Pre-training views of JPEG folders with the random resized crop done in the decoder's space.

The crop box is drawn from the JPEG header's size (no decoding); the file is then decoded by
libjpeg-turbo (through ``simplejpeg``) at the smallest 1/2, 1/4 or 1/8 DCT scale that still
covers the box at the output size, and the box is cropped and resized once, on uint8, by
torch's antialiased uint8 kernels. Images leave the worker as uint8 and are converted and
normalised per batch (on the device when there is one), not per image. Files simplejpeg cannot
read (PNG under a .jpg name, CMYK JPEGs) are decoded by Pillow instead, same crop and resize.

Measured on a 2-core CPU (``ropim bench-data``, 500×375 JPEGs, 224 px): Pillow's decode plus
Pillow's bicubic resize of the box ran at about half the decoder's rate; libjpeg-turbo plus the
uint8 resize runs within reach of the decoder alone (figures in the README).

A view is a function of (seed, epoch, index) only, like
:class:`~ropim.harness.data.views.SeededViews`: every method sees the same crops and a
resumed run replays them exactly. The crops follow torchvision's ``RandomResizedCrop``
algorithm (10 tries at a random area and log-uniform aspect
ratio, then a centre crop clamped to the ratio range); the pixels differ slightly from the
``full`` path (the box is rounded to whole pixels of a DCT-scaled decode).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from ropim.harness.errors import DataError
from ropim.harness.seeding import derive_seed


def crop_box(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a random resized crop, torchvision's algorithm drawn from
    ``generator``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        draws = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * draws[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(draws[2] * (height - h + 1)), height - h)
            left = min(int(draws[3] * (width - w + 1)), width - w)
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _power_of_two_reduction(w: int, h: int, size: int, limit: int = 8) -> int:
    """The largest 1, 2, 4 or 8 (at most ``limit``) that still leaves ``size`` pixels across a
    w×h box."""
    reduce = 1
    while reduce < limit and min(w, h) >= 2 * reduce * size:
        reduce *= 2
    return reduce


def _turbo_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) when libjpeg-turbo can decode ``data`` to RGB; None otherwise."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (width, height) if colorspace not in ("CMYK", "YCCK") else None


def _pillow_rgb(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))  # writable: it becomes a tensor


def decode_crop(
    path: str,
    size: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    hflip: float,
    generator: torch.Generator,
    interpolation: str = "bicubic",
    max_reduction: int = 8,
) -> Tensor:
    """One ``size``×``size`` RGB uint8 view (CHW) of the JPEG at ``path``; ``max_reduction``
    1 decodes at full scale (what ``bench-data`` compares the scaled decode against)."""
    try:
        data = Path(path).read_bytes()
        header = _turbo_header(data)
        if header is None:
            pixels = _pillow_rgb(path)
            width, height = pixels.shape[1], pixels.shape[0]
            left, top, w, h = crop_box(width, height, scale, ratio, generator)
        else:
            width, height = header
            left, top, w, h = crop_box(width, height, scale, ratio, generator)
            reduce = _power_of_two_reduction(w, h, size, max_reduction)
            pixels = simplejpeg.decode_jpeg(
                data,
                colorspace="RGB",
                min_width=math.ceil(width / reduce) if reduce > 1 else 0,
                min_height=math.ceil(height / reduce) if reduce > 1 else 0,
            )
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}. Remove or replace the file.") from None
    fx, fy = pixels.shape[1] / width, pixels.shape[0] / height  # the scale actually decoded
    x0, y0 = round(left * fx), round(top * fy)
    x1 = max(x0 + 1, round((left + w) * fx))
    y1 = max(y0 + 1, round((top + h) * fy))
    box = torch.from_numpy(pixels[y0:y1, x0:x1]).permute(2, 0, 1).unsqueeze(0)
    view = F.interpolate(box, size=(size, size), mode=interpolation, antialias=True)[0]
    if float(torch.rand(1, generator=generator)) < hflip:
        view = view.flip(-1)
    return view.contiguous()


class DecoderCropViews(Dataset):
    """Seeded uint8 views (CHW) of ``samples`` (path, label); call :meth:`set_epoch` first."""

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        size: int,
        scale: Sequence[float],
        ratio: Sequence[float],
        hflip: float,
        seed: int,
        interpolation: str = "bicubic",
    ) -> None:
        self.samples = list(samples)
        self.size, self.scale, self.ratio, self.hflip = size, scale, ratio, hflip
        self.seed, self.interpolation = seed, interpolation
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "view", self.epoch, index))
        view = decode_crop(
            path, self.size, self.scale, self.ratio, self.hflip, generator, self.interpolation
        )
        return view, label


class BatchNormalizer:
    """uint8 batches → float, scaled to [0, 1] and normalised, once per batch on its device;
    float batches pass through (they were normalised per image)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            return images
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return (images.float() / 255 - mean) / std
