"""Training-step speed on this machine: images/s and peak accelerator memory.

Times the trainer's own step (:class:`~ropim.harness.loop.TrainStep`: the method's loss,
backward, gradient clipping when the recipe clips, AdamW) on synthetic normalised images, so
data loading does not enter the figure. Knows no method by name: a method's ablations and
micro-benchmarks come through the method interface.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from ropim.harness.config import Config
from ropim.harness.data.datasets import load_images
from ropim.harness.data.views import pretrain_views
from ropim.harness.loop import TrainStep
from ropim.harness.optim import pretrain_scheduler
from ropim.harness.pretrain import Pretraining, pretrain, set_up_pretraining
from ropim.harness.records import hardware
from ropim.harness.run_progress import RunProgress
from ropim.harness.runtime import resolve_device, synchronize

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for MFU.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))


def peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak, or None when unknown (then no MFU is given)."""
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in device_name), None)


def attention_is_fused(method: torch.nn.Module) -> bool | None:
    """Whether the encoder's attention calls fused scaled-dot-product attention (timm's
    ``fused_attn``); None for blocks without that switch."""
    flags = [m.fused_attn for m in method.modules() if hasattr(m, "fused_attn")]
    return all(flags) if flags else None


def _time_steps(
    setup: Pretraining,
    cfg: Config,
    warmup: int,
    steps: int,
    variant: Callable | None = None,
    compile_model: bool = False,
) -> dict[str, Any]:
    fabric = setup.fabric
    fused = attention_is_fused(setup.method)
    module = torch.compile(setup.method) if compile_model else setup.method
    model, optimizer = fabric.setup(module, setup.optimizer)
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
            setup.method.after_step(RunProgress(index + 1, warmup + steps, warmup + steps))
            synchronize(device)
            if index >= warmup:
                elapsed += time.perf_counter() - start
        with FlopCounterMode(display=False) as counter:  # one more step, counted, not timed
            step((images,), warmup + steps)
            setup.method.after_step(RunProgress(warmup + steps, warmup + steps, 1))
    flops = float(counter.get_total_flops())
    achieved = flops * steps / elapsed / 1e12
    peak = peak_tflops(_device_name(device)) if device.type == "cuda" else None
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
        "compiled": compile_model,
        "fused_attention": fused,
        "flops_per_step": flops,
        "tflops_per_s": achieved,
        "mfu": achieved / peak if peak else None,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def _device_name(device: torch.device) -> str:
    return hardware()["cuda_devices"][0] if device.type == "cuda" else "cpu"


def bench_step(cfg: Config, warmup: int = 3, steps: int = 10) -> dict[str, Any]:
    """Speed of the configured method's training step."""
    return _time_steps(set_up_pretraining(cfg), cfg, warmup, steps)


def bench_pretrain(
    planned: list[Any], steps: int = 10, compiled: bool = False
) -> list[dict[str, Any]]:
    """Rows: each method's step speed on the shared backbone (and with ``torch.compile`` when
    ``compiled``), the share of its step each of its ablations removes, and its
    micro-benchmarks."""
    rows: list[dict[str, Any]] = []
    seen = set()
    for run in planned:
        if run.method in seen:
            continue
        seen.add(run.method)
        result = _time_steps(set_up_pretraining(run.config), run.config, 3, steps)
        rows.append({"measurement": "train_step", **result})
        if compiled:
            faster = _time_steps(set_up_pretraining(run.config), run.config, 3, steps, None, True)
            rows.append({"measurement": "train_step", **faster})
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


def write_bench_table(table: Any, out: str | Path) -> Path:
    """``bench_pretrain``'s rows as ``<out>/pretrain_<device>.csv`` (one file per device)."""
    device = str(table["device_name"].iloc[0]).replace(" ", "_")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"pretrain_{device}.csv"
    table.to_csv(path, index=False)
    return path


def plain_loop_rate(cfg: Config, steps: int) -> float:
    """Images/s of the shortest honest PyTorch loop over the same work as the harness: the same
    model, method loss, optimiser, schedule, clipping, views and batch, and nothing else (no
    Fabric wrapping, per-step seeding, logging, progress or checkpoints). The yardstick for the
    harness's overhead; it lives here, not in the harness."""
    cfg = copy.deepcopy(cfg)
    setup = set_up_pretraining(cfg)  # the same method, optimiser and batch normalisation
    method, optimizer, settings, normalize = (
        setup.method,
        setup.optimizer,
        setup.settings,
        setup.normalize,
    )
    scheduler = pretrain_scheduler(optimizer, settings, steps, 0)
    views = pretrain_views(cfg.data, cfg.model.img_size, cfg.model.in_chans, cfg.run.seed)
    loader = DataLoader(
        views,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.data.num_workers,
    )
    generator = torch.Generator().manual_seed(cfg.run.seed)
    method.train()
    done = 0
    start = time.perf_counter()
    while done < steps:
        for images, _ in loader:
            scheduler.step_update(done)
            loss = method(normalize(images), generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.clip_grad:
                torch.nn.utils.clip_grad_norm_(method.parameters(), settings.clip_grad)
            optimizer.step()
            done += 1
            if done == steps:
                break
    return steps * cfg.train.batch_size / (time.perf_counter() - start)


def harness_rate(cfg: Config, steps: int, folder: Path) -> float:
    """Images/s of ``pretrain`` itself for ``steps`` steps (its reported training rate, which
    leaves out checkpoint writes and evaluations, as a user's run.json shows)."""
    cfg = copy.deepcopy(cfg)
    per_epoch = len(load_images(cfg.data)) // cfg.train.batch_size
    cfg.train.epochs = steps / per_epoch
    cfg.train.reconstruction_images = 0
    cfg.probe.enabled, cfg.probe.knn_every = False, 0
    cfg.run.output_dir, cfg.run.name = str(folder), f"harness_{time.time_ns()}"
    run_dir = pretrain(cfg)
    record = json.loads((run_dir / "run.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    return float(record["images_per_s"])


def harness_vs_plain(cfg: Config, steps: int, folder: Path, rounds: int = 2) -> list[dict]:
    """Alternating A/B rounds (harness, plain, harness, plain, ...) on the same machine."""
    rows = []
    for index in range(rounds):
        harness = harness_rate(cfg, steps, folder)
        plain = plain_loop_rate(cfg, steps)
        rows.append(
            {"round": index + 1, "harness": harness, "plain": plain, "ratio": harness / plain}
        )
    return rows
