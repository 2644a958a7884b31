"""Check an image folder before a long run: every file decoded in full, with all cores.

Finds what would stop training hours in (unreadable or truncated files, empty classes) and
what training will quietly handle (non-RGB modes it converts, class imbalance). Used by
``ropim check-data`` and, with ``data.on_bad_image: skip``, to leave bad files out of a run
up front, the same ones for every method, each recorded.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from ropim.harness.errors import DataError
from ropim.harness.progress import tracked


@dataclass
class ImageStatus:
    path: str
    problem: str | None = None  # "unreadable: ..." / "truncated: ..."
    mode: str | None = None


@dataclass
class FolderReport:
    folder: str
    images: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    bad: list[ImageStatus] = field(default_factory=list)
    modes: Counter = field(default_factory=Counter)

    @property
    def empty_classes(self) -> list[str]:
        return sorted(c for c, n in self.per_class.items() if n == 0)

    @property
    def imbalance(self) -> float:
        """Largest class over smallest non-empty class."""
        counts = [n for n in self.per_class.values() if n]
        return max(counts) / min(counts) if counts else 0.0

    @property
    def fatal(self) -> bool:
        """Would stop training with ``data.on_bad_image: error``."""
        return bool(self.bad or self.empty_classes or not self.images)


def inspect_image(path: str) -> ImageStatus:
    """Decode the whole file: ``verify`` finds broken structure, ``load`` truncation."""
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
            return ImageStatus(path, mode=image.mode)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        kind = "truncated" if "truncat" in str(exc).lower() else "unreadable"
        return ImageStatus(path, problem=f"{kind}: {exc}")


def list_images(folder: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Files per class folder (ImageFolder's rules and extensions)."""
    if not folder.is_dir():
        raise DataError(f"dataset folder not found: {folder}; expected {folder}/<class>/<image>")
    try:
        classes, _ = find_classes(str(folder))
    except FileNotFoundError as exc:
        raise DataError(f"{folder} holds no class folders: {exc}") from None
    files = {
        name: sorted(
            str(p) for p in (folder / name).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS
        )
        for name in classes
    }
    return files, classes


def check_folder(folder: str | Path, workers: int | None = None) -> FolderReport:
    folder = Path(folder)
    files, classes = list_images(folder)
    report = FolderReport(str(folder), per_class={c: len(files[c]) for c in classes})
    paths = [p for c in classes for p in files[c]]
    report.images = len(paths)
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(paths) > 64:
        with ProcessPoolExecutor(workers) as pool:
            checked = pool.map(inspect_image, paths, chunksize=64)
            statuses = list(tracked(checked, len(paths), f"checking {folder}", unit="image"))
    else:
        checked = map(inspect_image, paths)
        statuses = list(tracked(checked, len(paths), f"checking {folder}", unit="image"))
    for status in statuses:
        if status.problem:
            report.bad.append(status)
        else:
            report.modes[status.mode] += 1
    return report


def describe(report: FolderReport) -> list[str]:
    """Lines for a person: what is wrong, what will be converted, how balanced it is."""
    lines = [f"{report.folder}: {report.images} images in {len(report.per_class)} classes"]
    for status in report.bad:
        lines.append(f"  BAD   {status.path}: {status.problem}")
    for name in report.empty_classes:
        lines.append(f"  EMPTY class {name!r} holds no images")
    if len(report.per_class) < 2:
        lines.append(
            f"  WARN  {len(report.per_class)} class(es): pre-training works, but every "
            f"classification protocol would score 100% (they need at least 2 classes)"
        )
    converted = {m: n for m, n in report.modes.items() if m != "RGB"}
    for mode, count in sorted(converted.items()):
        lines.append(f"  note  {count} image(s) in mode {mode} will be converted to RGB")
    if report.imbalance > 1:
        counts = [n for n in report.per_class.values() if n]
        lines.append(
            f"  note  class sizes {min(counts)}..{max(counts)} (largest/smallest "
            f"{report.imbalance:.1f}x)"
        )
    return lines
