"""``ropim gpu-check``: one short, prepared check of the suite on a CUDA machine.

1. each method's training step at paper scale (ViT-B/16, 224 px, the comparison's batch, bf16),
   eager and with ``torch.compile``: images/s, FLOPs per step (``torch.utils.flop_counter``),
   achieved TFLOP/s and MFU against the card's bf16 peak, peak memory, whether attention is
   fused; with each method's ablations and micro-benchmarks (``bench-pretrain``);
2. the one loop on the device: a tiny pre-training run straight, the same run killed after
   step 5 and resumed, and how far the two final weights are apart (GPU kernels such as
   atomic scatter-adds need not be bit-reproducible, so this is measured, not assumed);
3. the classification protocols on that run (k-NN, linear probe, a short fine-tune).

Writes ``gpu_check.json`` and ``bench.csv`` into the output folder; needs a visible GPU.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file

from ropim.harness.config import find_config, load_config
from ropim.harness.errors import ConfigError
from ropim.harness.pretrain import pretrain
from ropim.harness.records import hardware, library_versions
from ropim.suite.bench import bench_pretrain
from ropim.suite.compare import plan_comparison

# Bundled presets, found by name (installed or from the checkout alike).
PAPER_COMPARISON = find_config("compare_vit_b16_imagenet")
TINY_RUN = find_config("ropim_tiny")
TINY_TABLE = find_config("table2_tiny")


class _Crash(RuntimeError):
    pass


def _crash_after(step: int):
    def callback(done: int) -> None:
        if done == step:
            raise _Crash(step)

    return callback


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    folder = run_dir / "checkpoints"
    return load_file(str(folder / (folder / "latest").read_text() / "model.safetensors"))


def _resume_check(out: Path) -> tuple[dict[str, Any], Path]:
    def config(name: str):
        return load_config(
            TINY_RUN, [f"run.output_dir={out}", f"run.name={name}", "train.epochs=2"]
        )

    started = time.perf_counter()
    straight = pretrain(config("straight"))
    try:
        pretrain(config("crashed"), after_step=[_crash_after(5)])
    except _Crash:
        pass
    resumed = pretrain(config("crashed"), resume=True)
    a, b = _final_weights(straight), _final_weights(resumed)
    gap = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return {
        "identical_weights": all(torch.equal(a[k], b[k]) for k in a),
        "max_abs_weight_difference": gap,
        "run_json": json.loads((straight / "run.json").read_text()),
        "seconds": time.perf_counter() - started,
    }, straight


def _classification(run_dir: Path, results: Path) -> list[dict[str, Any]]:
    import yaml

    from downstream.tasks import task_named
    from ropim.suite.evaluate import evaluate_run

    task = task_named("classification")
    raw = yaml.safe_load(TINY_TABLE.read_text())
    return evaluate_run(task, run_dir, task.parse_settings(raw), results)


def gpu_check(out_dir: str | Path, steps: int = 20) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise ConfigError("gpu-check needs a CUDA device and none is visible; run it on a GPU")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"hardware": hardware(), "libraries": library_versions()}
    started = time.perf_counter()
    rows = bench_pretrain(plan_comparison(PAPER_COMPARISON), steps=steps, compiled=True)
    pd.DataFrame(rows).to_csv(out / "bench.csv", index=False)
    summary["bench"] = rows
    summary["bench_seconds"] = time.perf_counter() - started
    work = out / "runs"
    summary["resume"], run_dir = _resume_check(work)
    summary["classification"] = _classification(run_dir, work / "results.csv")
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)
    return summary
