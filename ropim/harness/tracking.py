"""Trackers: every row the loop writes to ``metrics.csv``/``evaluations.csv`` (and every
evaluation score) mirrored to Fabric's loggers — TensorBoard event files in
``<run>/tensorboard`` by default, Weights & Biases (offline unless ``WANDB_MODE`` says
otherwise) when ``log.wandb`` is set. The CSVs stay the source of truth; a tracker that fails
to write only warns."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ropim.harness.config import LogSection
from ropim.harness.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"


class WandbLogger:
    """The few calls of Fabric's ``Logger`` interface the loop uses, on a ``wandb`` run."""

    def __init__(self, root_dir: Path, name: str, project: str, resume_from: int) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "log.wandb=true needs Weights & Biases: pip install 'ropim-bench[wandb]' "
                "(or set log.wandb=false)"
            ) from None
        root_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            name=name,
            id=_wandb_id(root_dir),
            dir=str(root_dir),
            mode=os.environ.get("WANDB_MODE", "offline"),
            resume="allow",
        )
        self.resume_from = resume_from

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is not None and step <= self.resume_from and self.resume_from:
            return  # W&B cannot rewrite history: steps already logged before the crash
        self.run.log(dict(metrics), step=step)

    def finalize(self, status: str) -> None:
        self.run.finish()


def _wandb_id(root_dir: Path) -> str:
    """One W&B run per run folder, kept across resumes."""
    path = root_dir / "wandb_id.txt"
    if not path.is_file():
        import uuid

        path.write_text(uuid.uuid4().hex[:16])
    return path.read_text().strip()


class Tracker:
    """Scalars to every configured logger; rank 0 only (make it there)."""

    def __init__(
        self, run_dir: Path, settings: LogSection, name: str, resume_from: int = 0
    ) -> None:
        self.loggers: list[Any] = []
        self.warned = False
        if settings.tensorboard:
            from lightning_fabric.loggers import TensorBoardLogger

            # purge_step: a resumed run hides the events past its checkpoint, as metrics.csv
            # drops those rows.
            extra = {"purge_step": resume_from + 1} if resume_from else {}
            self.loggers.append(
                TensorBoardLogger(run_dir, name=TENSORBOARD_DIR, version="", **extra)
            )
        if settings.wandb:
            self.loggers.append(WandbLogger(run_dir, name, settings.wandb_project, resume_from))

    def log(self, prefix: str, row: Mapping[str, Any], step: int) -> None:
        metrics = {
            f"{prefix}/{key}": float(value)
            for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        for logger in self.loggers:
            try:
                logger.log_metrics(metrics, step=step)
                if hasattr(logger, "experiment"):  # TensorBoard: on disk now, not in 2 minutes
                    logger.experiment.flush()
            except Exception as exc:  # a tracker never stops training; the CSV has the row
                if not self.warned:
                    self.warned = True
                    print(
                        f"warning: tracker {type(logger).__name__} failed ({exc}); the CSVs "
                        "keep every row"
                    )

    def close(self) -> None:
        for logger in self.loggers:
            try:
                logger.finalize("success")
            except Exception:  # noqa: BLE001 - closing a tracker must not fail the run
                pass
