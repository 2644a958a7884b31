"""COCO reader: ``annotations/instances_<split>*.json`` plus an image folder per split.

Masks may be polygons or RLE (pycocotools decodes both). Crowd regions (``iscrowd=1``) are
left out of training targets, as detectron2 does, and stay in the ground truth COCOeval sees.
Images without annotations train with empty targets. Problems name the file, image or
annotation id at fault.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from ropim.harness.errors import DataError


def annotation_file(root: str | Path, split: str) -> Path:
    folder = Path(root).expanduser() / "annotations"
    exact = folder / f"instances_{split}.json"
    if exact.is_file():
        return exact
    matches = sorted(folder.glob(f"instances_{split}*.json"))  # e.g. instances_val2017.json
    if not matches:
        raise DataError(
            f"no COCO annotation file for split {split!r}: expected {exact} "
            f"(or {folder}/instances_{split}2017.json)"
        )
    return matches[0]


def image_folder(root: str | Path, split: str, ann_file: Path) -> Path:
    root = Path(root).expanduser()
    suffix = ann_file.stem.removeprefix("instances_")  # "val2017" -> folder val2017/
    for candidate in (root / suffix, root / split, root / "images" / suffix):
        if candidate.is_dir():
            return candidate
    raise DataError(f"no image folder for {ann_file.name}: expected {root / suffix}/")


def _check_annotations(payload: Any, path: Path) -> None:
    if not isinstance(payload, dict) or not {"images", "annotations", "categories"} <= set(payload):
        raise DataError(
            f"{path} is not a COCO instances file (needs images, annotations, categories)"
        )
    image_ids = {img.get("id") for img in payload["images"]}
    category_ids = {cat.get("id") for cat in payload["categories"]}
    for img in payload["images"]:
        if not {"id", "file_name", "height", "width"} <= set(img):
            raise DataError(
                f"{path}: image entry {img.get('id', img)} lacks id/file_name/height/width"
            )
    for ann in payload["annotations"]:
        ann_id = ann.get("id")
        where = f"{path}: annotation id {ann_id} (image id {ann.get('image_id')})"
        if ann.get("image_id") not in image_ids:
            raise DataError(f"{where} refers to an image id that is not in 'images'")
        if ann.get("category_id") not in category_ids:
            raise DataError(f"{where} has unknown category_id {ann.get('category_id')}")
        box = ann.get("bbox")
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(isinstance(v, (int, float)) for v in box)
            or box[2] < 0
            or box[3] < 0
        ):
            raise DataError(
                f"{where} has a malformed bbox {box!r}; expected [x, y, w, h], w, h >= 0"
            )
        if "segmentation" not in ann:
            raise DataError(f"{where} has no segmentation (polygon or RLE)")


def load_coco(path: Path):
    """A pycocotools ``COCO`` index of a checked annotation file (its chatter silenced)."""
    from pycocotools.coco import COCO

    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read COCO annotations {path}: {exc}") from None
    _check_annotations(payload, path)
    coco = COCO()
    coco.dataset = payload
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoInstances(Dataset):
    """(image uint8 (3, H, W), target) with torchvision Mask R-CNN's target keys; labels are
    contiguous 1..K in the order of the category ids (0 is background)."""

    def __init__(self, root: str | Path, split: str, filter_empty: bool = False) -> None:
        self.ann_file = annotation_file(root, split)
        self.folder = image_folder(root, split, self.ann_file)
        self.coco = load_coco(self.ann_file)
        self.image_ids = sorted(self.coco.imgs)
        if filter_empty:  # detectron2's training set: images with at least one non-crowd object
            self.image_ids = [
                i
                for i in self.image_ids
                if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns.get(i, []))
            ]
        missing = [
            self.folder / self.coco.imgs[i]["file_name"]
            for i in self.image_ids
            if not (self.folder / self.coco.imgs[i]["file_name"]).is_file()
        ]
        if missing:
            raise DataError(
                f"{len(missing)} images listed in {self.ann_file} are missing on disk, "
                f"e.g. {missing[0]}"
            )
        self.category_ids = sorted(self.coco.cats)
        self.label_of = {cat: index + 1 for index, cat in enumerate(self.category_ids)}

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.folder / info["file_name"]
        try:
            with Image.open(path) as handle:
                pixels = np.asarray(handle.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"cannot read image {path}: {exc}. Remove or replace it.") from None
        height, width = pixels.shape[:2]
        if (height, width) != (info["height"], info["width"]):
            raise DataError(
                f"{path} is {height}x{width} but {self.ann_file} says "
                f"{info['height']}x{info['width']} (image id {image_id})"
            )
        anns = [
            a
            for a in self.coco.imgToAnns.get(image_id, [])
            if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0
        ]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        masks = [self.coco.annToMask(a) for a in anns]
        target = {
            "boxes": boxes,
            "labels": torch.tensor(
                [self.label_of[a["category_id"]] for a in anns], dtype=torch.int64
            ),
            "masks": torch.from_numpy(np.stack(masks))
            if masks
            else torch.zeros((0, height, width), dtype=torch.uint8),
            "image_id": torch.tensor(image_id),
        }
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous(), target
