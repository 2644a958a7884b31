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
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ropim.harness.errors import CheckpointError, DataError

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


def append_results(
    path: str | Path,
    rows: Iterable[dict[str, Any]],
    supersedes: Callable[[dict[str, str]], bool] | None = None,
) -> int:
    """Append ``rows`` (keys from :data:`RESULT_COLUMNS`); returns how many were written.

    ``supersedes`` names earlier rows the new ones replace (under the same lock): an evaluation
    that crashed after appending its rows but before marking itself done is re-run, and its
    rows must then be in the file once, not twice."""
    rows = list(rows)
    for row in rows:
        unknown = set(row) - set(RESULT_COLUMNS)
        if unknown:
            raise ValueError(f"unknown result columns {sorted(unknown)}; allowed: {RESULT_COLUMNS}")
        fields = ["" if row.get(c) is None else str(row.get(c)) for c in RESULT_COLUMNS]
        problem = _row_problem(fields)
        if problem:  # never write a row the reader would have to skip
            raise ValueError(f"result row {row} is incomplete: {problem}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = path.read_bytes() if path.is_file() else b""
        if supersedes is not None and old:
            old = _without(old, supersedes)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\n")
        if not old:
            writer.writeheader()
        writer.writerows(rows)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(old)
                if old and not old.endswith(b"\n"):
                    handle.write(b"\n")
                handle.write(buffer.getvalue().encode())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:  # a full disk: the old file stays whole, no temporary is left
            tmp.unlink(missing_ok=True)
            raise CheckpointError(
                f"could not append {len(rows)} result row(s) to {path} "
                f"({exc.strerror or exc}); the file is unchanged: free space, then evaluate "
                f"again (finished evaluations are redone only where rows are missing)"
            ) from None
    return len(rows)


def _without(old: bytes, supersedes: Callable[[dict[str, str]], bool]) -> bytes:
    """``old`` less the well-formed data rows ``supersedes`` names; every other line byte-exact."""
    kept = []
    for number, line in enumerate(old.splitlines(keepends=True)):
        if number > 0:
            try:
                fields = next(csv.reader([line.decode("utf-8", "replace")], strict=True), [])
            except csv.Error:
                fields = []
            if len(fields) == len(RESULT_COLUMNS) and supersedes(
                dict(zip(RESULT_COLUMNS, fields, strict=True))
            ):
                continue
        kept.append(line)
    return b"".join(kept)


# Columns that must hold numbers (empty allowed where a value is optional).
NUMERIC = {
    "budget_epochs": True,
    "budget_seconds": True,
    "epochs_completed": True,
    "pretrain_seconds": True,
    "pretrain_images_per_s": True,
    "value": False,
    "seed": False,
}


def _row_problem(fields: list[str]) -> str | None:
    if len(fields) != len(RESULT_COLUMNS):
        return f"{len(fields)} fields where {len(RESULT_COLUMNS)} are expected"
    if any("\n" in field or "\r" in field for field in fields):
        return "a line break inside a value"
    row = dict(zip(RESULT_COLUMNS, fields, strict=True))
    for column, optional in NUMERIC.items():
        text = row[column].strip()
        if not text and optional:
            continue
        try:
            float(text)
        except ValueError:
            return f"{column}={row[column]!r} is not a number"
    for column in ("run_id", "method", "task", "protocol", "metric", "recorded_at"):
        if not row[column].strip():
            return f"{column} is empty"
    return None


def read_results(path: str | Path):
    """All rows as a pandas DataFrame (empty, with the columns, when the file is missing).

    Read defensively: a row with the wrong number of fields, a non-number where a number
    belongs, or an empty key (half a row from a killed writer, a hand edit) is reported with
    its file and line on stderr and left out, so it can neither hide a run nor stop a report."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=RESULT_COLUMNS)
    # One physical line is one row (the writer refuses line breaks inside a value), so a row cut
    # inside an open quote is one bad line instead of a field that swallows every later row.
    lines = []
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            lines.append(next(csv.reader([text], strict=True), []))
        except csv.Error:
            lines.append(None)
    if not lines:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    if lines[0] != RESULT_COLUMNS:
        raise DataError(
            f"{path}:1 has the columns {lines[0][:4]}..., not a results file of this suite "
            f"(expected {RESULT_COLUMNS[:4]}...); point --results at one, or move it away"
        )
    good, bad = [], []
    for number, fields in enumerate(lines[1:], start=2):
        if fields == []:
            continue
        problem = "an unterminated quote (a cut row)" if fields is None else _row_problem(fields)
        if problem:
            bad.append(f"{path}:{number}: {problem}")
        else:
            good.append(fields)
    for message in bad[:10]:
        print(f"warning: skipped malformed result row {message}", file=sys.stderr)
    if len(bad) > 10:
        print(f"warning: {len(bad) - 10} more malformed rows in {path} skipped", file=sys.stderr)
    table = pd.DataFrame(good, columns=RESULT_COLUMNS)
    for column in NUMERIC:
        values = table[column]
        table[column] = pd.to_numeric(values.mask(values.str.strip() == ""))
    return table
