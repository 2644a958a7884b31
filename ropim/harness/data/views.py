"""Seeded views: augmentation drawn per (run seed, epoch, image index), so every method in a
comparison sees the very same views and a resumed run replays the exact batches it would
have seen."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ropim.harness.config import DataSection
from ropim.harness.data.datasets import ImageFolderImages, load_images
from ropim.harness.data.transforms import pretrain_transform
from ropim.harness.fast_views import DecoderCropViews
from ropim.harness.seeding import derive_seed, seeded_host_rngs


class SeededViews(Dataset):
    """Applies a random transform with randomness fixed by (seed, epoch, index): torch's,
    Python's and NumPy's host generators are all seeded per item, so library transforms that
    draw from any of them replay exactly (call :meth:`set_epoch` before each epoch)."""

    def __init__(self, images: Dataset, transform: v2.Transform, seed: int) -> None:
        self.images = images
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.images[index]
        with seeded_host_rngs(derive_seed(self.seed, "view", self.epoch, index)):
            return self.transform(image), label


class SeededPairs(SeededViews):
    """:class:`SeededViews` for dense tasks, whose augmentation moves the target with the image:
    ``augment(input, target, generator)`` may draw from the generator or from the host RNGs,
    all seeded by (seed, purpose, epoch, index)."""

    def __init__(self, data: Dataset, augment: Callable, seed: int, purpose: str) -> None:
        super().__init__(data, augment, seed)  # type: ignore[arg-type]
        self.purpose = purpose

    def __getitem__(self, index: int):
        first, second = self.images[index]
        seed = derive_seed(self.seed, self.purpose, self.epoch, index)
        with seeded_host_rngs(seed):
            return self.transform(first, second, torch.Generator().manual_seed(seed))


def _file_samples(dataset: Dataset) -> list[tuple[str, int]] | None:
    """(path, label) per item of an image-folder dataset (or a subset of one); None otherwise."""
    indices = None
    if isinstance(dataset, torch.utils.data.Subset):
        indices, dataset = list(dataset.indices), dataset.dataset
    if not isinstance(dataset, ImageFolderImages):
        return None
    samples = [(str(path), int(label)) for path, label in dataset.inner.samples]
    return samples if indices is None else [samples[i] for i in indices]


def pretrain_views(
    cfg: DataSection, img_size: int, in_chans: int, seed: int, images: Dataset | None = None
) -> Dataset:
    """The pre-training views of ``cfg``'s split (``images`` when the caller loaded it):
    cropped in the JPEG decoder's space (``data.decode: scaled``, RGB image folders) or by
    torchvision on the full decode."""
    images = load_images(cfg) if images is None else images
    samples = _file_samples(images)
    if cfg.decode == "scaled" and in_chans == 3 and samples is not None:
        views: Dataset = DecoderCropViews(
            samples, img_size, cfg.crop_scale, cfg.crop_ratio, cfg.hflip, seed, cfg.interpolation
        )
        views.images = images  # type: ignore[attr-defined]  # what skipped_images reads
        return views
    return SeededViews(images, pretrain_transform(cfg, img_size, in_chans), seed)
