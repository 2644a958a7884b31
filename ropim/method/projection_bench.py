"""Time ROPIM's projection: the bucket scatter/gather used here against the dense matrix
product of the authors' code, at the same sketch."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ropim.harness.runtime import synchronize
from ropim.method.sketch import CountSketch


def _time_ms(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / repeats


def time_projection(
    batch: int,
    tokens: int,
    dim: int,
    ratio: float = 0.14,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    warmup: int = 2,
    repeats: int = 5,
) -> dict[str, float | int | str]:
    """Projection + complement of ``(B, N, D)`` tokens, both including drawing the sketch; the
    dense path also builds its matrices on the device (the authors build them on the CPU in the
    data loader, which is slower still)."""
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
        "dtype": str(dtype).removeprefix("torch."),
        "fast_ms": fast_ms,
        "dense_ms": dense_ms,
        "dense_over_fast": dense_ms / fast_ms,
    }
