"""Training augmentation and evaluation resizing, following mmsegmentation's ADE20K pipeline:
keep-ratio random resize (ratio 0.5-2.0 of the base scale), random crop with at most 75% of one
class, horizontal flip, photometric distortion, then normalisation with the encoder's own
statistics. Randomness comes from the generator passed in, so views are reproducible."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from downstream.segmentation.dataset import IGNORE_INDEX


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _chance(generator: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=generator)) < p


def keep_ratio_size(height: int, width: int, scale: Sequence[int], ratio: float = 1.0):
    """mmsegmentation's keep-ratio rescale: fit the long side in ``scale[0]*ratio`` and the
    short side in ``scale[1]*ratio``."""
    long_max, short_max = scale[0] * ratio, scale[1] * ratio
    factor = min(long_max / max(height, width), short_max / min(height, width))
    return max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1)


def resize_pair(image: Tensor, label: Tensor | None, size: tuple[int, int]):
    image = TF.resize(
        image, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True
    )
    if label is not None:
        label = TF.resize(
            label[None], list(size), interpolation=TF.InterpolationMode.NEAREST_EXACT
        )[0]
    return image, label


def _crop_box(label: Tensor, crop: int, generator: torch.Generator, cat_max_ratio: float):
    """mmsegmentation's RandomCrop: a ``crop`` window (cut to the image where it is smaller),
    redrawn up to 10 times while one class covers ``cat_max_ratio`` of it."""
    height, width = label.shape
    for _ in range(10):
        y = int(torch.randint(0, max(height - crop, 0) + 1, (), generator=generator))
        x = int(torch.randint(0, max(width - crop, 0) + 1, (), generator=generator))
        if cat_max_ratio >= 1.0:
            break
        window = label[y : y + crop, x : x + crop]
        counts = torch.bincount(window[window != IGNORE_INDEX].flatten())
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return y, x


def photometric(image: Tensor, generator: torch.Generator) -> Tensor:
    """mmsegmentation's PhotoMetricDistortion: brightness +-32, contrast and saturation x0.5-1.5,
    hue +-18 (of OpenCV's 180), each with probability 0.5; contrast before or after colour."""
    out = image.float()
    if _chance(generator, 0.5):
        out = out + _uniform(generator, -32, 32)
    contrast_first = _chance(generator, 0.5)
    contrast = _uniform(generator, 0.5, 1.5) if _chance(generator, 0.5) else None
    if contrast_first and contrast is not None:
        out = out * contrast
    out = out.clamp(0, 255)
    if image.shape[0] == 3:
        if _chance(generator, 0.5):
            out = TF.adjust_saturation(out / 255, _uniform(generator, 0.5, 1.5)) * 255
        if _chance(generator, 0.5):
            out = TF.adjust_hue(out / 255, _uniform(generator, -18, 18) / 180) * 255
    if not contrast_first and contrast is not None:
        out = out * contrast
    return out.clamp(0, 255)


def normalize(image: Tensor, mean: Sequence[float], std: Sequence[float], in_chans: int) -> Tensor:
    """uint8/float 0-255 RGB -> the encoder's channels, normalised as in its pre-training."""
    image = image.float() / 255
    if in_chans == 1:
        image = TF.rgb_to_grayscale(image)
    return TF.normalize(image, list(mean)[:in_chans], list(std)[:in_chans])


class TrainAugment:
    def __init__(
        self,
        crop: int,
        scale: Sequence[int],
        ratio_range: Sequence[float],
        cat_max_ratio: float,
        hflip: float,
        photometric: bool,
        mean: Sequence[float],
        std: Sequence[float],
        in_chans: int,
    ) -> None:
        self.crop, self.scale, self.ratio_range = crop, scale, ratio_range
        self.cat_max_ratio, self.hflip, self.use_photometric = cat_max_ratio, hflip, photometric
        self.mean, self.std, self.in_chans = mean, std, in_chans

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator):
        ratio = _uniform(generator, *self.ratio_range)
        size = keep_ratio_size(*label.shape, self.scale, ratio)
        image, label = resize_pair(image, label, size)
        y, x = _crop_box(label, self.crop, generator, self.cat_max_ratio)
        image = image[:, y : y + self.crop, x : x + self.crop]
        label = label[y : y + self.crop, x : x + self.crop]
        if _chance(generator, self.hflip):
            image, label = image.flip(-1), label.flip(-1)
        if self.use_photometric:
            image = photometric(image, generator)
        # mmsegmentation's pipeline: Normalize, then Pad(crop, pad_val=0, seg_pad_val=255), so
        # the padding is the mean colour, outside the photometric distortion.
        image = normalize(image, self.mean, self.std, self.in_chans)
        pad_h, pad_w = self.crop - label.shape[0], self.crop - label.shape[1]
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        return image, label.contiguous()
