"""What a pre-training costs before it is submitted: each method's counted FLOPs per image,
the total a recipe spends, and the GPU-hours that implies at a stated model-FLOPs utilisation.

The FLOPs are counted as every pre-training counts them (:mod:`ropim.harness.flops`: forward
and backward of the loss under ``FlopCounterMode``), here on a batch of two images and scaled
to the recipe's total batch (exact for a ViT's matrix products, which are linear in the batch).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ropim.harness.errors import ConfigError
from ropim.harness.pretrain import set_up_pretraining
from ropim.suite.bench import BF16_PEAK_TFLOPS, peak_tflops
from ropim.suite.recipes import preset_runs

IMAGENET_TRAIN = 1_281_167  # ImageNet-1k training images (the papers' epochs are over these)
# MFU the suite measured: `make gpu-check` on one H100 (2026-11-28, bf16, ViT-B/16, batch 128)
# timed ROPIM at 2,099 images/s; at its counted 1.06e11 FLOPs per image (forward + backward,
# `ropim cost`) that is 222 TFLOP/s, 22.5% of the card's 989 bf16 peak (MAE's 2,293 images/s at
# 5.63e10 FLOPs per image is 13%: docs/benchmarks.md).
MEASURED_MFU = 0.225
COUNTED_IMAGES = 2


def cost_rows(
    config: str | Path,
    overrides: list[str] | None = None,
    devices: int = 8,
    images: int | None = None,
    gpu: str = "H100",
    mfu: float = MEASURED_MFU,
) -> list[dict[str, Any]]:
    """Per method: FLOPs per image, per step and in all, and GPU-hours at ``mfu`` of ``gpu``."""
    peak = peak_tflops(gpu)
    if peak is None:
        known = ", ".join(name for name, _ in BF16_PEAK_TFLOPS)
        raise ConfigError(f"--gpu {gpu!r}: no bf16 peak known; choose one of {known}")
    for name, value in (("--devices", devices), ("--images", images)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} {value} must be a positive whole number")
    rows = []
    runs, _ = preset_runs(config, [], list(overrides or []))
    for method, (cfg, _given) in runs.items():
        print(f"counting {method}'s step ({cfg.model.name}, {cfg.model.img_size} px)", flush=True)
        cfg.train.accelerator, cfg.train.precision = "cpu", "32-true"
        setup = set_up_pretraining(cfg)
        torch.manual_seed(0)
        cost = setup.step_cost(COUNTED_IMAGES, cfg.model.img_size, cfg.model.in_chans, 0)
        per_image = cost.per_device / COUNTED_IMAGES
        count = images or (IMAGENET_TRAIN if cfg.data.root is None else None)
        total_batch = cfg.train.batch_size * devices
        steps_per_epoch = math.floor(count / total_batch) if count else None
        if cfg.train.flops_budget:
            steps = math.floor(cfg.train.flops_budget / (per_image * total_batch))
        else:
            steps = math.ceil(steps_per_epoch * cfg.train.epochs) if steps_per_epoch else None
        total = per_image * total_batch * steps if steps else None
        rows.append(
            {
                "method": method,
                "model": cfg.model.name,
                "img_size": cfg.model.img_size,
                "epochs": cfg.train.epochs if not cfg.train.flops_budget else None,
                "flops_budget": cfg.train.flops_budget,
                "total_batch": total_batch,
                "images_per_epoch": count,
                "steps": steps,
                "flops_per_image": per_image,
                "flops_per_step": per_image * total_batch,
                "training_flops": total,
                "gpu": gpu,
                "mfu": mfu,
                "gpu_hours": total / (peak * 1e12 * mfu) / 3600 if total else None,
            }
        )
    return rows


def format_cost(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'method':<10} {'epochs':>7} {'batch':>6} {'steps':>9} {'FLOPs/image':>12} "
        f"{'training FLOPs':>15} {'GPU-hours':>10}"
    ]
    for r in rows:
        epochs = "budget" if r["epochs"] is None else f"{r['epochs']:g}"
        steps = "?" if r["steps"] is None else f"{r['steps']:,}"
        total = "?" if r["training_flops"] is None else f"{r['training_flops']:.3g}"
        hours = "?" if r["gpu_hours"] is None else f"{r['gpu_hours']:,.0f}"
        lines.append(
            f"{r['method']:<10} {epochs:>7} {r['total_batch']:>6} {steps:>9} "
            f"{r['flops_per_image']:>12.3g} {total:>15} {hours:>10}"
        )
    first = rows[0] if rows else {}
    lines.append(
        f"GPU-hours at {first.get('mfu', MEASURED_MFU):.1%} model-FLOPs utilisation of one "
        f"{first.get('gpu', 'H100')}'s bf16 peak (--mfu; the default is the suite's H100 "
        f"measurement, `ropim docs benchmarks`); FLOPs counted forward + backward "
        f"(ropim.harness.flops), {rows[0]['images_per_epoch'] or '?'} images per epoch."
        if rows
        else "no method"
    )
    return "\n".join(lines)
