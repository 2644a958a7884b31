"""Tidy results: one CSV row per measurement, appended atomically and never rewritten in place.

An append writes the old rows plus the new ones to a temporary file in the same folder, flushes
it to disk and renames it over the original, under an exclusive lock: a crash at any point
leaves either the old file or the new one, never half of a row.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RESULT_COLUMNS = [
    "run_id",
    "method",
    "backbone",
    "dataset",
    "budget_epochs",
    "budget_seconds",
    "epochs_completed",
    "pretrain_seconds",
    "pretrain_images_per_s",
    "task",
    "protocol",
    "metric",
    "value",
    "seed",
    "code_version",
    "recorded_at",
]


def append_results(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Append ``rows`` (keys from :data:`RESULT_COLUMNS`); returns how many were written."""
    rows = list(rows)
    for row in rows:
        unknown = set(row) - set(RESULT_COLUMNS)
        if unknown:
            raise ValueError(f"unknown result columns {sorted(unknown)}; allowed: {RESULT_COLUMNS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = path.read_bytes() if path.is_file() else b""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\n")
        if not old:
            writer.writeheader()
        writer.writerows(rows)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(old)
            if old and not old.endswith(b"\n"):
                handle.write(b"\n")
            handle.write(buffer.getvalue().encode())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    return len(rows)


def read_results(path: str | Path):
    """All rows as a pandas DataFrame (empty, with the columns, when the file is missing)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=RESULT_COLUMNS)
    return pd.read_csv(path)
