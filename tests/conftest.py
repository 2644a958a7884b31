"""Tiny shared settings: a 2-block, 32-wide ViT on 28-px digits keeps each test in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ropim.harness.backbone import ViTBackbone

TINY_MODEL = {"depth": 2, "embed_dim": 32, "num_heads": 2}
PROJECT_ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = PROJECT_ROOT / "configs" / "ropim_tiny.yaml"  # the same model, for whole runs


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


def tiny_backbone(img_size: int = 28, patch_size: int = 7, **kw) -> ViTBackbone:
    torch.manual_seed(0)
    return ViTBackbone("vit_tiny_patch16_224", img_size, patch_size, **(TINY_MODEL | kw))


class SimulatedCrash(RuntimeError):
    """Raised by :func:`crash_after` in place of a killed process."""


def crash_after(step: int):
    """An ``after_step`` callback that stops training dead right after ``step`` (checkpoints
    written up to then stay; nothing in memory survives: the resume rebuilds everything)."""

    def callback(done: int) -> None:
        if done == step:
            raise SimulatedCrash(f"simulated crash after step {step}")

    return callback


def evaluate(task: str, run_dir, raw: dict, results, after_step=()) -> list[dict]:
    """Run one downstream task the way the suite does; returns the rows it appended."""
    from downstream.tasks import task_named
    from ropim.suite.evaluate import evaluate_run

    spec = task_named(task)
    return evaluate_run(spec, run_dir, spec.parse_settings({task: raw}), results, after_step)
