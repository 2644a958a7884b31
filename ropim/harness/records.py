"""What every run writes beside its results: provenance, hardware, cost, and a metrics log."""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
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
            f"comparison again, before evaluating or exporting it"
        )
    if finished:
        _check_finished_record(path, record)
    return record


# What a finished run.json must hold for evaluation and export (name -> required sub-keys).
FINISHED_FIELDS: dict[str, tuple[str, ...]] = {
    "architecture": ("model", "img_size", "patch_size", "depth"),
    "method": ("name",),
    "dataset": ("name",),
    "seed": (),
    "epochs_completed": (),
    "train_time_s": (),
    "images_per_s": (),
}


def _check_finished_record(path: Path, record: dict[str, Any]) -> None:
    for key, inner in FINISHED_FIELDS.items():
        value = record.get(key)
        missing = key if value is None else None
        if missing is None and inner:
            gaps = [k for k in inner if not isinstance(value, dict) or value.get(k) is None]
            missing = f"{key}.{gaps[0]}" if gaps else None
        if missing is not None:
            raise CheckpointError(
                f"{path} lacks {missing!r}: it was edited or written by another program; "
                f"restore it, or pre-train the run again"
            )


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` via a temporary file renamed over ``path``, so a crash never leaves half
    a file (named per process, so two processes writing one file cannot take each other's
    temporary); on any failure the temporary is removed and ``path`` is unchanged."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, a lost mount
        tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"could not write {path} ({exc.strerror or exc}); it is unchanged: free space or "
            f"fix the folder, then run the same command again"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write a JSON document atomically (:func:`write_atomic`)."""
    write_atomic(path, json.dumps(payload, indent=2, default=str))


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


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _method_package_dirs() -> list[Path]:
    """The folders of the declared method packages (``ropim.method_packages``)."""
    import importlib.metadata
    import importlib.util

    from ropim.harness.registry import PACKAGE_GROUP  # the registry's own group name

    found = []
    for point in importlib.metadata.entry_points(group=PACKAGE_GROUP):
        spec = importlib.util.find_spec(point.value)
        found += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    return found


def _display(path: Path) -> str:
    """A code file's path relative to the checkout, or to the installed packages' folder
    (site-packages), else as given."""
    path = path.resolve()
    for root in (PROJECT_ROOT, *[Path(p) for p in sys.path if p]):
        try:
            return str(path.relative_to(Path(root).resolve()))
        except ValueError:
            continue
    return str(path)


def _sha256(path: Path) -> str | None:
    import hashlib

    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def code_label(code: dict[str, Any] | None) -> str:
    """The code a run came from, in one token: the commit in a checkout, else the installed
    package's version (an install from a wheel has no commit)."""
    code = code or {}
    if code.get("git_commit"):
        return str(code["git_commit"])
    version = code.get("package_version")
    return f"{PACKAGE}=={version}" if version else "unknown"


def code_version(files: Sequence[str | Path] = ()) -> dict[str, Any]:
    """The package version always; the suite's commit and dirty flag only from its own
    checkout (None otherwise, never another repository's commit). ``files``: the method and
    task modules a run imported, each recorded with its path and sha256. ``git_dirty`` counts
    modified tracked files, untracked files under the method packages, and any of ``files``
    that git does not track (a method file outside the checkout included): a run of a new
    method is never recorded as clean. ``unrecorded`` lists those files."""
    paths = [Path(f).resolve() for f in files]
    records = [{"path": _display(p), "sha256": _sha256(p)} for p in paths]
    if not _suite_checkout():
        inside = [str(p) for p in paths if _under(p, PROJECT_ROOT)]
        outside = [r["path"] for r, p in zip(records, paths, strict=True) if str(p) not in inside]
        return {
            "package_version": package_version(),
            "git_commit": None,
            "git_dirty": True if outside else None,
            "unrecorded": outside,
            "files": records,
        }
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    watched = [p for p in _method_package_dirs() if _under(p, PROJECT_ROOT)]
    inside = [p for p in paths if _under(p, PROJECT_ROOT)]
    unrecorded = [_display(p) for p in paths if not _under(p, PROJECT_ROOT)]
    names = [str(p.relative_to(PROJECT_ROOT)) for p in [*watched, *inside]]
    if names:
        tracked = set((_git("ls-files", "--", *names) or "").splitlines())
        changed = _git("status", "--porcelain", "--untracked-files=all", "--", *names) or ""
        unrecorded += sorted({line[3:] for line in changed.splitlines() if line.strip()})
        unrecorded += [
            str(p.relative_to(PROJECT_ROOT))
            for p in inside
            if str(p.relative_to(PROJECT_ROOT)) not in tracked
        ]  # ignored files
    unrecorded = sorted(set(unrecorded))
    dirty = None if status is None else bool(status) or bool(unrecorded)
    return {
        "package_version": package_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "unrecorded": unrecorded,
        "files": records,
    }


def _under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def loaded_module_files(packages: Sequence[str], prefixes: Sequence[str] = ()) -> list[Path]:
    """The files of the modules loaded so far from ``packages`` (and of modules whose names
    start with one of ``prefixes``): what a run actually imported of its method or task."""
    found = set()
    for name, module in list(sys.modules.items()):
        wanted = any(name == p or name.startswith(p + ".") for p in packages)
        if wanted or any(name.startswith(p) for p in prefixes):
            file = getattr(module, "__file__", None)
            if file:
                found.add(Path(file).resolve())
    return sorted(found)


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
