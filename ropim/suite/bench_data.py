"""Data-path speed: how fast the pre-training views of JPEGs are made, per core and with
workers, against the JPEG decoder alone and against the training step they must feed.

The JPEGs are made once, at ImageNet's typical 500×375 from the bundled digits (each a digit
scaled up onto a tinted, noisy canvas, quality 90), so the benchmark needs no download.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ropim.harness.config import DataSection
from ropim.harness.data.datasets import load_images
from ropim.harness.data.views import pretrain_views
from ropim.harness.fast_views import decode_crop
from ropim.harness.registry import method_class

JPEG_SIZE = (500, 375)  # ImageNet's most common size


def make_jpeg_folder(
    folder: str | Path,
    count: int = 200,
    classes: int = 4,
    jpeg_size: tuple[int, int] = JPEG_SIZE,
) -> Path:
    """``<folder>/train/<class>/<i>.jpg`` at ``jpeg_size`` (width, height; 500×375 by
    default); reused when already complete at that count and size."""
    root = Path(folder)
    done = root / "complete.txt"
    width, height = jpeg_size
    stamp = f"{count} {classes} {width}x{height}"
    if done.is_file() and done.read_text() == stamp:
        return root
    shutil.rmtree(root / "train", ignore_errors=True)
    side = min(300, int(0.8 * min(width, height)))
    digits = load_images(DataSection(dataset="mnist"), "train")
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels, _ = digits[index]
        digit = Image.fromarray(pixels.squeeze(0).numpy()).resize((side, side), Image.BICUBIC)
        tint = rng.uniform(40, 200, size=3)
        canvas = rng.normal(0, 25, size=(height, width, 3)) + tint
        ys = np.linspace(0, 1, height)[:, None, None]
        canvas += 60 * ys * rng.uniform(-1, 1, size=3)  # a smooth gradient, like a backdrop
        left, top = rng.integers(0, width - side + 1), rng.integers(0, height - side + 1)
        ink = np.asarray(digit, dtype=np.float64)[..., None] / 255
        region = canvas[top : top + side, left : left + side]
        canvas[top : top + side, left : left + side] = region * (1 - ink) + 255 * ink
        out = root / "train" / f"class{index % classes}" / f"{index:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(canvas.clip(0, 255).astype(np.uint8)).save(out, quality=90)
    done.write_text(stamp)
    return root


def _rate(count: int, seconds: float) -> float:
    return count / max(seconds, 1e-9)


def decode_rate(paths: list[str], path: str) -> float:
    """Images/s of the decoder alone (full size, RGB) in this process: Pillow's for the
    ``full`` path, libjpeg-turbo's through simplejpeg for the ``scaled`` one."""
    start = time.perf_counter()
    for file in paths:
        if path == "scaled":
            simplejpeg.decode_jpeg(Path(file).read_bytes(), colorspace="RGB")
        else:
            with Image.open(file) as image:
                image.convert("RGB").load()
    return _rate(len(paths), time.perf_counter() - start)


def view_rate(data: DataSection, img_size: int, seed: int = 0) -> float:
    """Images/s of the pre-training views (one core, this process): decode, crop, resize and,
    on the ``full`` path, conversion and normalisation per image."""
    views = pretrain_views(data, img_size, 3, seed)
    start = time.perf_counter()
    for index in range(len(views)):
        views[index]
    return _rate(len(views), time.perf_counter() - start)


def loader_rate(data: DataSection, img_size: int, workers: int, batch_size: int = 64) -> float:
    """Images/s through a DataLoader with ``workers`` processes (two passes, the second
    timed, so worker start-up is not counted)."""
    views = pretrain_views(data, img_size, 3, 0)
    loader = DataLoader(
        views, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0
    )
    for _ in loader:
        pass
    start = time.perf_counter()
    seen = sum(len(batch[1]) for batch in loader)
    return _rate(seen, time.perf_counter() - start)


def scaled_decode_error(
    paths: list[str], size: int, scale: list[float], interpolation: str, seed: int = 0
) -> dict[str, float]:
    """What decoding at 1/2–1/8 DCT scale does to the views: each file's view against the
    same crop box decoded at full scale and resized alike (uint8 0–255): mean |Δ|, PSNR, and
    the share of views that differ at all (their box allowed a reduced decode)."""
    errors, reduced = [], 0
    for index, path in enumerate(paths):
        views = [
            decode_crop(
                path,
                size,
                scale,
                (3 / 4, 4 / 3),
                0.0,
                torch.Generator().manual_seed(seed + index),
                interpolation,
                limit,
            ).float()
            for limit in (8, 1)
        ]
        difference = (views[0] - views[1]).abs()
        reduced += bool(difference.max() > 0)
        errors.append(difference)
    mean_abs = float(torch.stack([e.mean() for e in errors]).mean())
    mse = float(torch.stack([e.pow(2).mean() for e in errors]).mean())
    psnr = float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)
    return {"dct_mean_abs": mean_abs, "dct_psnr_db": psnr, "dct_differs": reduced / len(paths)}


REPEATS = 3  # each one-core rate is the best of 3 passes (one pass over 200 files is ~0.3 s)

# The pre-training views measured, from these methods' recipes: MAE's small bicubic crops and
# ROPIM's (= SimMIM's) bilinear ones.
VIEW_METHODS = ("mae", "ropim")


def bench_data(
    folder: str | Path,
    img_size: int = 224,
    count: int = 200,
    workers: int | None = None,
    jpeg_size: tuple[int, int] = JPEG_SIZE,
) -> list[dict[str, Any]]:
    """Rows per decode path (``full``, ``scaled``) and recipe view: views/s on one core, the
    path's decoder alone on one core, their ratio, and views/s with ``workers`` processes."""
    root = make_jpeg_folder(folder, count, jpeg_size=jpeg_size)
    workers = workers or torch.multiprocessing.cpu_count()
    paths = sorted(str(p) for p in (root / "train").rglob("*.jpg"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: one process, one thread
    try:
        rows = []
        for path in ("full", "scaled"):
            decode_rate(paths, path)  # warm the file cache and the decoder
            decoded = max(decode_rate(paths, path) for _ in range(REPEATS))
            for view in VIEW_METHODS:
                recipe = method_class(view).recipe
                scale, interpolation = list(recipe.crop_scale), recipe.interpolation
                data = DataSection(
                    dataset="imagefolder",
                    root=str(root),
                    decode=path,
                    crop_scale=scale,
                    interpolation=interpolation,
                )
                per_core = max(view_rate(data, img_size) for _ in range(REPEATS))
                error = (
                    scaled_decode_error(paths, img_size, scale, interpolation)
                    if path == "scaled"
                    else {}
                )
                rows.append(
                    error
                    | {
                        "path": path,
                        "view": f"{view} ({interpolation}, crop {scale[0]}-{scale[1]})",
                        "img_size": img_size,
                        "jpeg_size": f"{jpeg_size[0]}x{jpeg_size[1]}",
                        "loader_per_core": per_core,
                        "decode_per_core": decoded,
                        "ratio": per_core / decoded,
                        "workers": workers,
                        "loader_total": loader_rate(data, img_size, workers),
                    }
                )
    finally:
        torch.set_num_threads(threads)
    return rows
