"""The ADE20K layout reader: ``ADEChallengeData2016/{images,annotations}/{training,validation}``.

Labels follow ADE20K: 0 is "other" and is ignored; with ``reduce_zero_label`` (mmsegmentation's
ADE20K setting) every label drops by one and 0 becomes the ignore index 255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from ropim.harness.errors import DataError

IGNORE_INDEX = 255
SPLITS = {"train": "training", "val": "validation"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def dataset_folder(root: str | Path) -> Path:
    """``root`` itself or its ``ADEChallengeData2016`` child, whichever holds ``images/``."""
    root = Path(root).expanduser()
    for candidate in (root, root / "ADEChallengeData2016"):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    raise DataError(
        f"no ADE20K layout under {root}: expected {root}/ADEChallengeData2016/images/"
        f"{{training,validation}}/*.jpg and {root}/ADEChallengeData2016/annotations/"
        f"{{training,validation}}/*.png (or images/ and annotations/ directly in {root})"
    )


def _open(path: Path, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if mode == "label" and image.mode not in ("L", "P", "I", "I;16"):
                raise DataError(
                    f"label map {path} has mode {image.mode}; ADE20K labels are single-channel "
                    f"PNGs holding class indices"
                )
            return np.asarray(image.convert("RGB") if mode == "image" else image)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}. Remove or replace the file.") from None


class ADE20KSegmentation(Dataset):
    """(image uint8 (3, H, W), label int64 (H, W)) pairs, labels checked against the classes."""

    def __init__(
        self, root: str | Path, split: str, num_classes: int, reduce_zero_label: bool = True
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"split {split!r} must be one of {sorted(SPLITS)}")
        folder = dataset_folder(root)
        images_dir = folder / "images" / SPLITS[split]
        labels_dir = folder / "annotations" / SPLITS[split]
        for needed in (images_dir, labels_dir):
            if not needed.is_dir():
                raise DataError(f"missing folder {needed} (ADE20K layout, split {split!r})")
        self.images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise DataError(f"{images_dir} holds no .jpg/.png images")
        self.labels = [labels_dir / f"{p.stem}.png" for p in self.images]
        missing = [p for p in self.labels if not p.is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} images in {images_dir} have no label map, e.g. {missing[0]} "
                f"(each images/<name>.jpg needs annotations/<name>.png)"
            )
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label

    def __len__(self) -> int:
        return len(self.images)

    def read_label(self, index: int) -> Tensor:
        path = self.labels[index]
        raw = _open(path, "label").astype(np.int64)
        if self.reduce_zero_label:
            label = raw - 1
            label[raw == 0] = IGNORE_INDEX
        else:
            label = raw
        bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= self.num_classes))
        if bad.any():
            value = int(raw[bad][0])
            allowed = (
                f"1..{self.num_classes}"
                if self.reduce_zero_label
                else (f"0..{self.num_classes - 1}")
            )
            raise DataError(
                f"label map {path} holds value {value}, outside the class range {allowed} "
                f"(plus {'0' if self.reduce_zero_label else IGNORE_INDEX} = ignore) for "
                f"num_classes={self.num_classes}; check segmentation.num_classes or the labels"
            )
        return torch.from_numpy(label)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        pixels = _open(self.images[index], "image")
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()
        label = self.read_label(index)
        if image.shape[-2:] != label.shape:
            raise DataError(
                f"{self.images[index]} is {tuple(image.shape[-2:])} but its label map "
                f"{self.labels[index]} is {tuple(label.shape)}"
            )
        return image, label
