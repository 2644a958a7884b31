"""Digit scenes: dense-prediction data composed from the bundled real MNIST digits.

A scene is a canvas with a few digits at random positions and scales over a smooth textured
background. Pixel labels follow the ADE20K convention the readers expect: ``0`` = ignore (the
anti-aliased rim of each digit, where ink is neither clearly on nor off), ``d + 1`` = digit
``d``, ``11`` = background. After mmsegmentation's "reduce zero label" the classes are the
digits 0-9 and background 10, with 255 ignored. Training scenes use training digits and
validation scenes held-out digits, so no digit appears in both. Everything is a pure function
of (seed, split, index).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from ropim.harness.data.datasets import MnistDigits
from ropim.harness.seeding import derive_seed

IGNORE_LABEL = 0
BACKGROUND_LABEL = 11
NUM_SCENE_CLASSES = 11  # after reduce-zero-label: digits 0-9 and background
ADE_SPLITS = {"train": "training", "val": "validation"}
INK_ON = 0.5  # ink share from which a pixel belongs to its digit
INK_RIM = 0.15  # ink share from which a non-digit pixel is ambiguous (ignored)


@dataclass
class SceneSpec:
    """What a generated scene set looks like; stored next to the data so reuse is checked."""

    canvas: int = 64
    train_scenes: int = 1000
    val_scenes: int = 200
    min_digits: int = 1
    max_digits: int = 3
    min_scale: float = 0.35  # digit frame side as a share of the canvas
    max_scale: float = 0.6
    texture: bool = True
    seed: int = 0
    version: int = 1  # bump when the composition changes, so old sets are rewritten


@dataclass
class SceneSettings(SceneSpec):
    """A task's ``scenes:`` section: the spec plus where generated sets are kept."""

    folder: str | None = None  # None: <folder holding the run>/datasets; generated once per
    # spec, then reused by every run beside it


@dataclass
class DigitInstance:
    digit: int
    mask: np.ndarray  # bool (H, W): pixels that belong to this digit


@dataclass
class Scene:
    image: np.ndarray  # uint8 (H, W, 3)
    label: np.ndarray  # uint8 (H, W), ADE20K convention (0 = ignore)
    instances: list[DigitInstance]


def _background(rng: np.random.Generator, canvas: int, texture: bool) -> np.ndarray:
    tint = rng.uniform(0.0, 70.0, size=3)
    base = np.broadcast_to(tint, (canvas, canvas, 3)).astype(np.float32)
    if not texture:
        return base.copy()
    coarse = rng.uniform(-35.0, 35.0, size=(6, 6, 3)).astype(np.float32)
    smooth = np.stack(
        [
            np.asarray(
                Image.fromarray(coarse[..., c]).resize((canvas, canvas), Image.Resampling.BICUBIC)
            )
            for c in range(3)
        ],
        axis=-1,
    )
    return np.clip(base + smooth, 0.0, 255.0)


def _boxes_overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    (ay, ax, asize), (by, bx, bsize) = a, b
    return not (ay + asize <= by or by + bsize <= ay or ax + asize <= bx or bx + bsize <= ax)


def compose_scene(spec: SceneSpec, digits: MnistDigits, split: str, index: int) -> Scene:
    """One scene, identical for the same (spec, split, index)."""
    rng = np.random.default_rng(derive_seed(spec.seed, "scene", split, index))
    canvas = spec.canvas
    image = _background(rng, canvas, spec.texture)
    label = np.full((canvas, canvas), BACKGROUND_LABEL, dtype=np.uint8)
    placed: list[tuple[int, int, int]] = []
    instances = []
    wanted = int(rng.integers(spec.min_digits, spec.max_digits + 1))
    for _ in range(wanted * 20):  # rejection sampling for non-overlapping frames
        if len(placed) == wanted:
            break
        size = int(rng.uniform(spec.min_scale, spec.max_scale) * canvas)
        y, x = (int(v) for v in rng.integers(0, canvas - size + 1, size=2))
        if any(_boxes_overlap((y, x, size), other) for other in placed):
            continue
        placed.append((y, x, size))
        pick = int(rng.integers(len(digits)))
        pixels, digit = digits[pick]
        glyph = Image.fromarray(pixels[0].numpy()).resize((size, size), Image.Resampling.BILINEAR)
        ink = np.asarray(glyph, dtype=np.float32) / 255.0
        colour = rng.uniform(170.0, 255.0, size=3).astype(np.float32)
        window = image[y : y + size, x : x + size]
        image[y : y + size, x : x + size] = window * (1 - ink[..., None]) + colour * ink[..., None]
        on = ink >= INK_ON
        rim = (ink >= INK_RIM) & ~on
        patch = label[y : y + size, x : x + size]
        patch[rim] = IGNORE_LABEL
        patch[on] = digit + 1
        mask = np.zeros((canvas, canvas), dtype=bool)
        mask[y : y + size, x : x + size] = on
        if mask.any():
            instances.append(DigitInstance(digit, mask))
    pixels = np.clip(image + rng.normal(0.0, 4.0, size=image.shape), 0, 255).astype(np.uint8)
    return Scene(pixels, label, instances)


def spec_of(settings: SceneSpec) -> SceneSpec:
    """The plain spec of a settings object that extends it (e.g. with an output folder)."""
    return SceneSpec(**{f.name: getattr(settings, f.name) for f in fields(SceneSpec)})


def scene_dataset_dir(spec: SceneSpec, folder: str | Path, layout: str) -> Path:
    """Where a generated set lives: named by its size and a digest of its whole spec."""
    folder = Path(folder)
    plain = spec_of(spec)
    digest = derive_seed(*sorted(asdict(plain).items())) % 10**8
    name = f"digit_scenes_{layout}_{plain.canvas}px_{plain.train_scenes}_{plain.val_scenes}"
    return folder / f"{name}_{digest:08d}"


def scenes_folder(settings: SceneSettings, run_dir: Path) -> Path:
    """The configured folder, or ``datasets/`` beside the run (shared by a comparison)."""
    return Path(settings.folder) if settings.folder else Path(run_dir).parent / "datasets"


def scene_digits(split: str) -> MnistDigits:
    return MnistDigits("train" if split == "train" else "val")


def spec_matches(folder: Path, spec: SceneSpec) -> bool:
    marker = folder / "scenes.json"
    return marker.is_file() and json.loads(marker.read_text()) == asdict(spec)


def write_ade20k_scenes(root: str | Path, spec: SceneSpec) -> Path:
    """Write ``<root>/ADEChallengeData2016/{images,annotations}/{training,validation}``.

    Images are JPEG and labels PNG, as in ADE20K; an existing set with the same spec is kept.
    Returns the dataset folder.
    """
    folder = Path(root) / "ADEChallengeData2016"
    if spec_matches(folder, spec):
        return folder
    for split, ade_split in ADE_SPLITS.items():
        digits = scene_digits(split)
        images_dir = folder / "images" / ade_split
        labels_dir = folder / "annotations" / ade_split
        images_dir.mkdir(parents=True, exist_ok=True)
        labels_dir.mkdir(parents=True, exist_ok=True)
        count = spec.train_scenes if split == "train" else spec.val_scenes
        for index in range(count):
            scene = compose_scene(spec, digits, split, index)
            stem = f"scene_{ade_split}_{index:08d}"
            Image.fromarray(scene.image).save(images_dir / f"{stem}.jpg", quality=95)
            Image.fromarray(scene.label).save(labels_dir / f"{stem}.png")
    (folder / "scenes.json").write_text(json.dumps(asdict(spec), indent=2))
    return folder


COCO_SPLITS = ("train", "val")


def coco_annotations(scene: Scene, image_id: int, first_id: int, file_name: str) -> tuple:
    """The COCO image record and one instance per digit: RLE mask, box, area, category."""
    from pycocotools import mask as mask_utils

    height, width = scene.label.shape
    image = {"id": image_id, "file_name": file_name, "height": height, "width": width}
    annotations = []
    for offset, instance in enumerate(scene.instances):
        rle = mask_utils.encode(np.asfortranarray(instance.mask.astype(np.uint8)))
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        annotations.append(
            {
                "id": first_id + offset,
                "image_id": image_id,
                "category_id": instance.digit + 1,  # COCO ids start at 1; name = the digit
                "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
                "area": float(mask_utils.area(rle)),
                "bbox": [x, y, w, h],
                "iscrowd": 0,
            }
        )
    return image, annotations


def write_coco_scenes(root: str | Path, spec: SceneSpec) -> Path:
    """The same scenes as a COCO dataset: ``<root>/{train,val}/*.jpg`` and
    ``<root>/annotations/instances_{train,val}.json``; returns ``root``."""
    root = Path(root)
    if spec_matches(root, spec):
        return root
    categories = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in COCO_SPLITS:
        digits = scene_digits(split)
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        count = spec.train_scenes if split == "train" else spec.val_scenes
        for index in range(count):
            scene = compose_scene(spec, digits, split, index)
            name = f"scene_{split}_{index:08d}.jpg"
            Image.fromarray(scene.image).save(folder / name, quality=95)
            image, anns = coco_annotations(scene, index + 1, len(annotations) + 1, name)
            images.append(image)
            annotations.extend(anns)
        payload = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(payload))
    (root / "scenes.json").write_text(json.dumps(asdict(spec), indent=2))
    return root
