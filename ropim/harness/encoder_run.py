"""A finished run that holds an encoder without pre-training it: the random-initialisation floor
of a comparison, or weights brought from outside. Downstream tasks read it like any run."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ropim.harness.backbone import ViTBackbone
from ropim.harness.checkpoint import STATE_FILE, WEIGHTS_FILE, backbone_signature, save_weights
from ropim.harness.config import Config, save_config
from ropim.harness.errors import TrainingError
from ropim.harness.records import code_version, hardware, library_versions, write_json
from ropim.harness.runtime import launch_rank


class _AsMethod(nn.Module):
    """Holds the encoder as ``backbone`` so the keys match a method checkpoint's."""

    def __init__(self, encoder: ViTBackbone) -> None:
        super().__init__()
        self.backbone = encoder


WAIT_S = 600.0  # how long other ranks wait for rank 0's run.json


def write_encoder_run(cfg: Config, encoder: ViTBackbone, record: dict[str, Any]) -> Path:
    """``<output_dir>/<name>/`` with config, one checkpoint (step 0) and a finished run.json;
    ``record`` names the method and anything else worth keeping (it wins over the defaults).

    Under ``torchrun`` rank 0 writes the run and the other ranks wait for its ``run.json``:
    every rank writing the same files raced (one rank's rename found the other's temporary
    file gone)."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    if launch_rank() != 0:
        _wait_for(run_dir / "run.json", WAIT_S)
        return run_dir
    step_dir = run_dir / "checkpoints" / "step_00000000"
    step_dir.mkdir(parents=True, exist_ok=True)
    signature = backbone_signature(encoder)
    save_weights(_AsMethod(encoder), step_dir / WEIGHTS_FILE, signature | {"step": "0"})
    torch.save({"step": 0}, step_dir / STATE_FILE)
    (run_dir / "checkpoints" / "latest").write_text(step_dir.name)
    save_config(cfg, run_dir / "config.yaml")
    defaults: dict[str, Any] = {
        "status": "finished",
        "run_name": cfg.run.name,
        "seed": cfg.run.seed,
        "architecture": signature,
        "dataset": {"name": cfg.data.dataset, "root": cfg.data.root, "images": None},
        "budget": {"epochs": 0, "time_budget_s": None, "stopped_by": "no pre-training"},
        "steps": 0,
        "epochs_completed": 0.0,
        "train_time_s": 0.0,
        "images_per_s": 0.0,
        "code": code_version(),
        "libraries": library_versions(),
        "hardware": hardware(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }
    write_json(run_dir / "run.json", defaults | record)
    return run_dir


def _wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TrainingError(
                f"{path} did not appear within {seconds:.0f} s: rank 0 should have written it; "
                "see rank 0's error"
            )
        time.sleep(0.2)
