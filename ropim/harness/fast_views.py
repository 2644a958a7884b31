"""Pre-training views of JPEG folders with the random resized crop done in the decoder's space.

The crop box is drawn from the file's header size (no decoding), the JPEG is then decoded at
the smallest 1/2, 1/4 or 1/8 scale that still covers the box at the output size (libjpeg's DCT
scaling through Pillow's ``draft``), and the box is cropped and resized once, on uint8, by
Pillow. Images leave the worker as uint8 and are converted and normalised per batch (on the
device when there is one), not per image.

A view is a function of (seed, epoch, index) only, like :class:`~ropim.harness.data.SeededViews`:
every method sees the same crops and a resumed run replays them exactly. The crops follow
torchvision's ``RandomResizedCrop`` algorithm (10 tries at a random area and log-uniform aspect
ratio, then a centre crop clamped to the ratio range); the pixels differ slightly from the
``full`` path (Pillow's resampling of a DCT-scaled decode instead of torchvision's on the full
decode).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from ropim.harness.errors import DataError
from ropim.harness.seeding import derive_seed

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


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


def decode_crop(
    path: str,
    size: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    hflip: float,
    generator: torch.Generator,
    interpolation: str = "bicubic",
) -> np.ndarray:
    """One ``size``×``size`` RGB uint8 view (HWC) of the JPEG at ``path``."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            left, top, w, h = crop_box(width, height, scale, ratio, generator)
            reduce = 1
            while reduce < 8 and min(w, h) >= 2 * reduce * size:
                reduce *= 2  # the decode still has >= size pixels across the crop
            if reduce > 1:
                image.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))
            fx, fy = image.size[0] / width, image.size[1] / height  # the scale actually used
            box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
            view = image.convert("RGB").resize((size, size), RESAMPLE[interpolation], box=box)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}. Remove or replace the file.") from None
    if float(torch.rand(1, generator=generator)) < hflip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(view)  # a writable copy: it becomes a tensor


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
        return torch.from_numpy(view).permute(2, 0, 1), label


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
