"""Load a pre-trained encoder from a run directory for downstream tasks (no unpickling)."""

from __future__ import annotations

from pathlib import Path

from ropim.backbone import ViTBackbone
from ropim.checkpoint import WEIGHTS_FILE, CheckpointDir, check_architecture, read_weights
from ropim.config import Config, load_config
from ropim.errors import CheckpointError
from ropim.trainer import build_encoder


def load_pretrained_encoder(
    run_dir: str | Path, drop_path: float | None = None
) -> tuple[ViTBackbone, Config]:
    """The run's backbone with the weights of its newest checkpoint, and the run's config;
    ``drop_path`` rebuilds it with another stochastic-depth rate (fine-tuning)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a pre-training run (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    latest = CheckpointDir(run_dir).latest()
    if latest is None:
        raise CheckpointError(f"{run_dir} holds no checkpoint")
    if drop_path is not None:
        cfg.model.drop_path = drop_path
    backbone = build_encoder(cfg)
    path = latest / WEIGHTS_FILE
    tensors, metadata = read_weights(path)
    check_architecture(metadata, backbone, path)
    prefix = "backbone."
    weights = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing, unexpected = backbone.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit the encoder: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return backbone, cfg
