"""Training-step speed on this machine: images/s and peak accelerator memory.

Times the trainer's own step (:class:`~ropim.harness.loop.TrainStep`: the method's loss,
backward, gradient clipping when the recipe clips, AdamW) on synthetic normalised images, so
data loading does not enter the figure. Knows no method by name: a method's ablations and
micro-benchmarks come through the method interface.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch

from ropim.harness.config import Config
from ropim.harness.loop import TrainStep
from ropim.harness.pretrain import Pretraining, set_up_pretraining
from ropim.harness.records import hardware
from ropim.harness.runtime import resolve_device, synchronize


def _time_steps(
    setup: Pretraining, cfg: Config, warmup: int, steps: int, variant: Callable | None = None
) -> dict[str, Any]:
    fabric = setup.fabric
    model, optimizer = fabric.setup(setup.method, setup.optimizer)
    step = TrainStep(
        fabric,
        model,
        optimizer,
        setup.step_loss(cfg.run.seed),
        cfg.run.seed,
        setup.settings.clip_grad,
    )
    device = fabric.device
    size, chans, batch = cfg.model.img_size, cfg.model.in_chans, cfg.train.batch_size
    images = torch.randn(batch, chans, size, size, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elapsed = 0.0
    with variant() if variant is not None else contextlib.nullcontext():
        for index in range(warmup + steps):
            synchronize(device)
            start = time.perf_counter()
            loss, _ = step((images,), index)
            synchronize(device)
            if index >= warmup:
                elapsed += time.perf_counter() - start
    result = {
        "method": setup.method.name,
        "model": cfg.model.name,
        "img_size": size,
        "patch_size": cfg.model.patch_size,
        "batch_size": batch,
        "clip_grad": setup.settings.clip_grad,
        "precision": resolve_device(cfg.train.accelerator, cfg.train.precision)[1],
        "device": str(device),
        "device_name": _device_name(device),
        "timed_steps": steps,
        "images_per_s": batch * steps / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "final_loss": float(loss),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def _device_name(device: torch.device) -> str:
    return hardware()["cuda_devices"][0] if device.type == "cuda" else "cpu"


def bench_step(cfg: Config, warmup: int = 3, steps: int = 10) -> dict[str, Any]:
    """Speed of the configured method's training step."""
    return _time_steps(set_up_pretraining(cfg), cfg, warmup, steps)


def bench_pretrain(planned: list[Any], steps: int = 10) -> list[dict[str, Any]]:
    """Rows: each method's step speed on the shared backbone, the share of its step each of its
    ablations removes, and its micro-benchmarks."""
    rows: list[dict[str, Any]] = []
    seen = set()
    for run in planned:
        if run.method in seen:
            continue
        seen.add(run.method)
        result = _time_steps(set_up_pretraining(run.config), run.config, 3, steps)
        rows.append({"measurement": "train_step", **result})
        setup = set_up_pretraining(run.config)
        for name, variant in setup.method.ablations().items():
            ablated = _time_steps(setup, run.config, 3, steps, variant)
            rows.append(
                {
                    "measurement": "ablation_share_of_step",
                    "method": run.method,
                    "ablation": name,
                    "model": result["model"],
                    "img_size": result["img_size"],
                    "batch_size": result["batch_size"],
                    "device_name": result["device_name"],
                    "step_ms": result["step_ms"],
                    "step_ms_ablated": ablated["step_ms"],
                    "share": 1 - ablated["step_ms"] / result["step_ms"],
                }
            )
        accelerator, precision = resolve_device(
            run.config.train.accelerator, run.config.train.precision
        )
        device = torch.device("cuda" if accelerator == "cuda" else "cpu")
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
        for row in setup.method.micro_benchmarks(device, dtype):
            rows.append({"method": run.method, "device_name": _device_name(device)} | row)
    return rows
