"""Training-step speed of a method on this machine: images/s and peak accelerator memory.

Times the real training step (forward, backward, AdamW) of the configured method and backbone
on synthetic normalised images, so data loading does not enter the figure.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from ropim.config import Config
from ropim.optim import build_optimizer, resolve
from ropim.registry import build_method
from ropim.run_record import hardware
from ropim.seeding import make_generator
from ropim.sketch import CountSketch
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


def _time_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return 1000 * (time.perf_counter() - start) / repeats


def bench_projection(
    batch: int,
    tokens: int,
    dim: int,
    ratio: float = 0.14,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    warmup: int = 2,
    repeats: int = 5,
) -> dict[str, float]:
    """Projection + complement of ``(B, N, D)`` tokens: bucket scatter/gather vs. dense bmm.

    The dense path is the authors' formulation: a ``(B, N, N)`` matrix per batch, multiplied in.
    Both include drawing the sketch; the dense one also builds the matrices on the device (the
    authors build them on the CPU in the data loader, which is slower still).
    """
    device = torch.device(device)
    x = torch.randn(batch, tokens, dim, device=device, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(0)

    def fast() -> None:
        sketch = CountSketch.sample(batch, tokens, ratio, generator=generator, device=device)
        sketch.project(x)
        sketch.complement(x)

    def dense() -> None:
        sketch = CountSketch.sample(batch, tokens, ratio, generator=generator, device=device)
        matrix = sketch.dense().to(dtype)
        torch.bmm(matrix, x)
        x - torch.bmm(matrix, x)  # noqa: B018 - the complement, as the authors form it

    fast_ms = _time_ms(fast, device, warmup, repeats)
    dense_ms = _time_ms(dense, device, warmup, repeats)
    return {
        "batch": batch,
        "tokens": tokens,
        "dim": dim,
        "fast_ms": fast_ms,
        "dense_ms": dense_ms,
        "dense_over_fast": dense_ms / fast_ms,
    }


@contextlib.contextmanager
def projection_disabled() -> Iterator[None]:
    """Make ``Π`` the identity (and ``Π⊥`` too, so the loss keeps its shape): the ablation
    that isolates what the projection itself costs inside a real ROPIM step."""
    project, complement = CountSketch.project, CountSketch.complement
    CountSketch.project = lambda self, x: x  # type: ignore[method-assign]
    CountSketch.complement = lambda self, x: x  # type: ignore[method-assign]
    try:
        yield
    finally:
        CountSketch.project, CountSketch.complement = project, complement  # type: ignore[method-assign]


def bench_pretrain(
    planned: list[Any],
    projection_sizes: tuple[tuple[int, int], ...] = ((224, 16), (448, 16)),
    projection_dim: int = 768,
    projection_batch: int = 128,
    steps: int = 10,
) -> list[dict[str, Any]]:
    """Rows: each method's step speed on the shared backbone, ROPIM's projection share of its
    step, and fast-vs-dense projection timings at ViT-B/16 token counts."""
    rows: list[dict[str, Any]] = []
    seen = set()
    for run in planned:
        if run.method in seen:
            continue
        seen.add(run.method)
        result = bench_step(run.config, warmup=3, steps=steps)
        rows.append({"measurement": "train_step", **result})
        if run.method == "ropim":
            with projection_disabled():
                ablated = bench_step(run.config, warmup=3, steps=steps)
            share = 1 - ablated["step_ms"] / result["step_ms"]
            rows.append(
                {
                    "measurement": "projection_share_of_step",
                    "method": run.method,
                    "model": result["model"],
                    "img_size": result["img_size"],
                    "batch_size": result["batch_size"],
                    "device_name": result["device_name"],
                    "step_ms": result["step_ms"],
                    "step_ms_without_projection": ablated["step_ms"],
                    "share": share,
                }
            )
    config = planned[0].config
    accelerator, precision = resolve_device(config.train.accelerator, config.train.precision)
    device = torch.device("cuda" if accelerator == "cuda" else "cpu")
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    for img_size, patch in projection_sizes:
        tokens = (img_size // patch) ** 2
        timing = bench_projection(
            projection_batch, tokens, projection_dim, device=device, dtype=dtype
        )
        rows.append(
            {
                "measurement": "projection_fast_vs_dense",
                "img_size": img_size,
                "patch_size": patch,
                "dtype": str(dtype).removeprefix("torch."),
                "device_name": hardware()["cuda_devices"][0] if device.type == "cuda" else "cpu",
                **timing,
            }
        )
    return rows
