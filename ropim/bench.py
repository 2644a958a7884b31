"""Training-step speed of a method on this machine: images/s and peak accelerator memory.

Times the real training step (forward, backward, AdamW) of the configured method and backbone
on synthetic normalised images, so data loading does not enter the figure.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ropim.config import Config
from ropim.optim import build_optimizer, resolve
from ropim.registry import build_method
from ropim.run_record import hardware
from ropim.seeding import make_generator
from ropim.trainer import build_encoder, make_fabric, resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_step(cfg: Config, warmup: int = 3, steps: int = 10) -> dict[str, Any]:
    fabric = make_fabric(cfg.train.accelerator, cfg.train.precision)
    method = build_method(cfg.method, build_encoder(cfg))
    settings = resolve(cfg.train, method.recipe, fabric.world_size)
    model, optimizer = fabric.setup(method, build_optimizer(method, settings))
    device = fabric.device
    size, chans, batch = cfg.model.img_size, cfg.model.in_chans, cfg.train.batch_size
    images = torch.randn(batch, chans, size, size, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elapsed = 0.0
    for step in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        loss = model(images, make_generator(device, cfg.run.seed, "bench", step))
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step >= warmup:
            elapsed += time.perf_counter() - start
    result = {
        "method": method.name,
        "model": cfg.model.name,
        "img_size": size,
        "patch_size": cfg.model.patch_size,
        "batch_size": batch,
        "precision": resolve_device(cfg.train.accelerator, cfg.train.precision)[1],
        "device": str(device),
        "device_name": hardware()["cuda_devices"][0] if device.type == "cuda" else "cpu",
        "timed_steps": steps,
        "images_per_s": batch * steps / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "final_loss": float(loss.detach()),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result
