"""The authors' released checkpoints through the suite's protocols, beside their published
numbers: the strongest check that the protocols are faithful.

A preset's ``published`` section names each checkpoint (its file inside the folder given with
``--checkpoints``, its layout, the architecture, and the method whose published rows in
``references`` it should land on); its task sections are the paper's protocols. Each file is
imported once (re-imported if its sha256 changes), each task evaluated once, and
``reports/<name>.md``/``.csv`` list, per headline measure: our value, the published value, the
difference, and whether the published value was measured under the same protocol.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from downstream.tasks import all_tasks, configured_tasks
from ropim.harness.config import apply_overrides, read_yaml
from ropim.harness.errors import ConfigError
from ropim.suite.evaluate import evaluate_run
from ropim.suite.external import import_weights
from ropim.suite.report import probe_protocol, protocol_mismatches, read_references
from ropim.suite.weights_files import sha256_of

ENTRY_KEYS = {"file", "reference", "layout", "model", "optional", "source", "tasks"}


def _entries(raw: dict[str, Any], path: str | Path) -> dict[str, dict[str, Any]]:
    section = raw.get("published")
    if not isinstance(section, dict) or not isinstance(section.get("checkpoints"), dict):
        raise ConfigError(f"{path} needs a published section with published.checkpoints")
    for label, entry in section["checkpoints"].items():
        if not isinstance(entry, dict) or "file" not in entry or "model" not in entry:
            raise ConfigError(f"published.checkpoints.{label} in {path} needs file and model")
        names = [task.name for task in all_tasks()]
        if not set(entry.get("tasks", [])) <= set(names):
            raise ConfigError(
                f"published.checkpoints.{label}.tasks={entry['tasks']!r} in {path}: choose "
                f"from {names}"
            )
        unknown = sorted(set(entry) - ENTRY_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown key published.checkpoints.{label}.{unknown[0]} in {path}; allowed: "
                f"{sorted(ENTRY_KEYS)}"
            )
    return section["checkpoints"]


def _imported(file: Path, raw: dict[str, Any], label: str, entry: dict[str, Any]) -> Path:
    """The checkpoint's run folder; imported again (evaluations dropped) if the file changed."""
    output_dir = (raw.get("run") or {}).get("output_dir", "runs")
    run_raw = raw | {"model": entry["model"]}
    digest = sha256_of(file)
    for earlier in (Path(output_dir) / "external").glob(f"{label}_*"):
        record_file = earlier / "run.json"
        if record_file.is_file():
            record = json.loads(record_file.read_text())
            if record.get("weights_sha256") == digest and record.get("weights_source") == str(file):
                return earlier
        shutil.rmtree(earlier)
    return import_weights(
        str(file), run_raw, output_dir, label, entry.get("layout"), entry.get("reference")
    )


def evaluate_published(
    config_path: str | Path,
    checkpoints: str | Path,
    overrides: list[str] | None = None,
    results_path: str | Path = "results/results.csv",
    reports_dir: str | Path = "reports",
) -> Path:
    raw = apply_overrides(read_yaml(config_path), list(overrides or []))
    entries = _entries(raw, config_path)
    folder = Path(checkpoints).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"--checkpoints {folder}: no such folder (the downloaded checkpoints)")
    tasks = [(task, task.parse_settings(raw)) for task in configured_tasks(raw)]
    measured: list[dict[str, Any]] = []
    for label, entry in entries.items():
        file = folder / entry["file"]
        if not file.is_file():
            if entry.get("optional"):
                print(f"{label}: {file} not found, skipped (optional)")
                continue
            where = f" (from {entry['source']})" if entry.get("source") else ""
            raise ConfigError(f"published.checkpoints.{label}: {file} not found{where}")
        run_dir = _imported(file, raw, label, entry)
        for task, settings in tasks:
            if task.name not in entry.get("tasks", [t.name for t, _ in tasks]):
                continue
            done = run_dir / f"{task.name}.json"
            if done.is_file():
                print(f"[{task.name}] {label}: evaluated earlier")
                rows = json.loads(done.read_text())["rows"]
            else:
                print(f"[{task.name}] {label}", flush=True)
                rows = evaluate_run(task, run_dir, settings, results_path)
            headlines = {(c.protocol, c.metric) for c in task.headlines}
            measured += [
                row | {"label": label, "reference": entry.get("reference", label)}
                for row in rows
                if (row["protocol"], row["metric"]) in headlines
            ]
    table = published_table(pd.DataFrame(measured), probe_protocol(raw))
    name = (raw.get("published") or {}).get("name") or Path(config_path).stem
    return write_published(table, Path(reports_dir), name, str(config_path))


def published_table(measured: pd.DataFrame, probe: dict[str, Any]) -> pd.DataFrame:
    """One row per checkpoint and headline measure: ours, published, difference, protocol."""
    references = read_references()
    rows = []
    for row in measured.to_dict("records") if len(measured) else []:
        ours = 100 * float(row["value"])
        found = pd.DataFrame()
        if references is not None:
            found = references[
                (references["method"] == row["reference"])
                & (references["task"] == row["task"])
                & (references["protocol"] == row["protocol"])
                & (references["metric"] == row["metric"])
            ]
        published = float(found["value"].iloc[0]) if len(found) else None
        mismatch = protocol_mismatches(found, probe) if len(found) else {}
        rows.append(
            {
                "checkpoint": row["label"],
                "task": row["task"],
                "protocol": row["protocol"],
                "metric": row["metric"],
                "ours": round(ours, 2),
                "published": published,
                "difference": None if published is None else round(ours - published, 2),
                "same_protocol": None if published is None else not mismatch,
                "note": next(iter(mismatch.values()), "")
                if mismatch
                else ("" if len(found) else "no published value"),
            }
        )
    return pd.DataFrame(rows)


def write_published(table: pd.DataFrame, out_dir: Path, name: str, config: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / f"{name}.csv", index=False)
    lines = [
        f"# The authors' checkpoints through this suite's protocols ({name})",
        "",
        f"Produced by `ropim published --config {config}`. `ours` is this suite's measurement "
        "of the released checkpoint (in %), `published` the paper's value "
        "(the method's `references`, with its source), `difference` = ours − published. A "
        "difference is a finding only where `same_protocol` is true; the note says how the "
        "protocols differ otherwise.",
        "",
        table.to_markdown(index=False) if len(table) else "No checkpoint was evaluated.",
        "",
    ]
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(lines))
    print(table.to_string(index=False) if len(table) else "no rows")
    print(f"report: {path}")
    return path
