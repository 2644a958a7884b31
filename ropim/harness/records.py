"""What every run writes beside its results: provenance, hardware, cost, and a metrics log."""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write via a temporary file so a crash never leaves half a JSON document (named per
    process, so two processes writing one file cannot take each other's temporary)."""
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def code_version() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


def library_versions() -> dict[str, str]:
    import lightning_fabric
    import timm
    import torchvision

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "lightning_fabric": lightning_fabric.__version__,
    }


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_devices": [],
    }
    if torch.cuda.is_available():
        info["cuda_devices"] = [
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        ]
        info["cuda_version"] = torch.version.cuda
    return info


class MetricsLog:
    """A CSV of one row per logged step (``metrics.csv``, ``evaluations.csv``); the columns are
    those of the first row; resuming drops rows past the checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _columns(self) -> list[str] | None:
        if not self.path.is_file():
            return None
        with self.path.open(newline="") as handle:
            return next(csv.reader(handle), None)

    def truncate_after(self, step: int) -> None:
        columns = self._columns()
        if columns is None:
            return
        with self.path.open(newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= step]
        self._write(rows, columns, mode="w")

    def append(self, row: dict[str, Any]) -> None:
        self._write([row], self._columns() or list(row), mode="a")

    def _write(self, rows: list[dict[str, Any]], columns: list[str], mode: str) -> None:
        new_file = mode == "w" or not self.path.is_file()
        with self.path.open(mode, newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerows(rows)
