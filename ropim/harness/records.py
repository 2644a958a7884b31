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

from ropim.harness.errors import CheckpointError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; a ValueError saying what is wrong with it otherwise."""
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(found, dict):
        raise ValueError(f"{path} holds no JSON object")
    return found


def read_run_record(run_dir: str | Path, finished: bool = False) -> dict[str, Any]:
    """A run's ``run.json``; a missing or damaged one (or, with ``finished``, a run whose
    pre-training has not finished) is one :class:`CheckpointError` line naming the file."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise CheckpointError(f"{Path(run_dir)} is not a pre-training run (no run.json)")
    try:
        record = json_object(path)
    except ValueError as exc:
        raise CheckpointError(
            f"{path} cannot be read ({exc}); restore it, or delete {Path(run_dir)} and "
            f"pre-train again"
        ) from None
    if finished and record.get("status") != "finished":
        raise CheckpointError(
            f"{Path(run_dir)} has not finished pre-training (status "
            f"{record.get('status')!r}); resume it with ropim pretrain --resume, or run the "
            f"comparison again, before evaluating it"
        )
    return record


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write via a temporary file so a crash never leaves half a JSON document (named per
    process, so two processes writing one file cannot take each other's temporary)."""
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


PACKAGE = "ropim-bench"


def package_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def _suite_checkout() -> bool:
    """Whether this code runs from the suite's own git checkout (not from an installed copy
    that happens to sit inside someone else's repository)."""
    project = PROJECT_ROOT / "pyproject.toml"
    try:
        return (PROJECT_ROOT / ".git").exists() and f'name = "{PACKAGE}"' in project.read_text()
    except OSError:
        return False


def code_version() -> dict[str, Any]:
    """The package version always; the suite's commit and dirty flag only from its own
    checkout (None otherwise, never another repository's commit)."""
    if not _suite_checkout():
        return {"package_version": package_version(), "git_commit": None, "git_dirty": None}

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
    return {
        "package_version": package_version(),
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
    }


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
