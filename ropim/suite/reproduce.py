"""``make reproduce-table2``: pre-train every method per seed, evaluate, collect, report.

Every stage is restartable: finished pre-training runs are skipped, interrupted ones resume,
evaluated runs (``<task>.json`` present) are not evaluated twice. Tasks run one after another
over all checkpoints, so the classification columns are complete before segmentation starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import socket
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from downstream.tasks import all_tasks, configured_tasks
from ropim.harness.claims import WorkUnit, share_work
from ropim.harness.errors import DataError
from ropim.harness.records import code_label, code_version, write_json
from ropim.harness.tasks import TaskSettings, TaskSpec
from ropim.suite.compare import (
    check_methods,
    claims_dir,
    plan_runs,
    read_comparison,
    run_comparison,
)
from ropim.suite.evaluate import evaluate_run
from ropim.suite.report import probe_protocol, write_report
from ropim.suite.results import read_results
from ropim.suite.terminal import terminal_text


def reproduce(
    config_path: str | Path,
    overrides: list[str] | None = None,
    results_path: str | Path = "results/results.csv",
    reports_dir: str | Path = "reports",
    method_dirs: tuple = (),
) -> Path:
    raw = read_comparison(config_path, overrides)  # read and planned once
    tasks = [(task, task.parse_settings(raw)) for task in configured_tasks(raw)]
    planned = plan_runs(raw, config_path)
    check_methods(planned, method_dirs)  # every method builds before any trains
    run_dirs = run_comparison(planned, method_dirs)
    units = []
    for task, settings in tasks:
        for index, run_dir in enumerate(run_dirs, 1):
            units.append(
                WorkUnit(
                    key=f"{task.name}.{run_dir.name}",
                    label=f"[{task.name} {index}/{len(run_dirs)}] {run_dir.name}",
                    done=lambda run_dir=run_dir, task=task: (
                        run_dir / f"{task.name}.json"
                    ).is_file(),
                    run=lambda run_dir=run_dir, task=task, settings=settings: _evaluate(
                        task, run_dir, settings, results_path
                    ),
                )
            )
    share_work(units, claims_dir(planned))
    written: list[Path] = []
    report = WorkUnit(
        key="report",
        label="report",
        done=lambda: _report_current(claims_dir(planned), results_path, written),
        run=lambda: _write_report(
            claims_dir(planned), results_path, written,
            lambda: report_comparison(raw, planned, config_path, results_path, reports_dir),
        ),
    )  # fmt: skip
    share_work([report], claims_dir(planned), say=lambda _: None)
    return written[0]


def _evaluate(task: TaskSpec, run_dir: Path, settings: TaskSettings, results_path) -> None:
    headlines = {(c.protocol, c.metric) for c in task.headlines}
    for row in evaluate_run(task, run_dir, settings, results_path):
        if (row["protocol"], row["metric"]) in headlines:
            print(f"  {row['protocol']:<9} {row['metric']} {row['value']:.2%}", flush=True)


def _results_digest(results_path: str | Path) -> str:
    path = Path(results_path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def _report_current(claims: Path, results_path: str | Path, written: list[Path]) -> bool:
    """Whether a process sharing this folder already wrote the report from these results."""
    mark = claims / "report.done"
    if not mark.is_file() or written:
        return bool(written)
    fields = json.loads(mark.read_text())
    if fields.get("results_sha256") != _results_digest(results_path):
        return False
    if fields.get("code") != code_version():  # another version of the suite: draw it again
        return False
    written.append(Path(fields["report"]))
    print(f"report: {fields['report']} (written by {fields['by']} from the same results)")
    return True


def _write_report(
    claims: Path, results_path: str | Path, written: list[Path], make: Callable[[], Path]
) -> None:
    path = make()
    written.append(path)
    mark = {"report": str(path), "results_sha256": _results_digest(results_path)}
    mark |= {"by": f"{socket.gethostname()} pid {os.getpid()}", "code": code_version()}
    write_json(claims / "report.done", mark)


def make_report(
    config_path: str | Path,
    overrides: list[str] | None = None,
    results_path: str | Path = "results/results.csv",
    reports_dir: str | Path = "reports",
) -> Path:
    """Table and figures of one comparison from the rows collected so far. A results file
    that is missing or holds no row of this comparison is refused (a mistyped ``--results``
    must not overwrite a report with a table of "missing")."""
    raw = read_comparison(config_path, overrides)
    planned = plan_runs(raw, config_path)  # checks the compare section
    results_path = Path(results_path)
    if not results_path.is_file():
        raise DataError(
            f"results file {results_path} does not exist; point --results at the file the "
            f"runs appended to (nothing was written)"
        )
    comparison = raw["compare"].get("name") or Path(config_path).stem
    rows = read_results(results_path)
    if not rows["run_id"].astype(str).str.startswith(f"{comparison}/").any():
        raise DataError(
            f"{results_path} holds no result row of comparison {comparison!r} (run ids "
            f"'{comparison}/<method>_seed<s>'); evaluate its runs first, or point --results at "
            f"the file they appended to (nothing was written)"
        )
    return report_comparison(raw, planned, config_path, results_path, reports_dir)


def report_comparison(
    raw: dict,
    planned: list,
    config_path: str | Path,
    results_path: str | Path,
    reports_dir: str | Path,
) -> Path:
    """:func:`make_report` of a comparison already read and planned."""
    section = raw["compare"]
    methods = list(dict.fromkeys(p.method for p in planned))
    seeds = sorted({p.seed for p in planned})
    command = " ".join(shlex.quote(a) for a in sys.argv) or "reproduce()"
    header = (
        f"Produced by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d} "
        f"({os.cpu_count()} CPU cores, {platform.machine()}, code {code_label(code_version())}). "
    )
    if section.get("mode") == "published_recipe":
        header += (
            "Each method at its own published backbone, epochs, batch and schedule "
            "(compare.mode=published_recipe): compare each row with its published value, not "
            "the rows with each other; `ropim recipes` lists every setting with its source."
        )
    else:
        header += budget_sentence(planned[0].config.train)
    first = planned[0].config.run
    runs = (Path(first.output_dir) / first.name).parent / "<method>_seed<s>"
    header += (
        f" Each run's resolved recipe is in `{runs}/run.json` (`recipe`, `optim`) and its "
        f"`config.yaml`; `ropim recipes --config {config_path}` lists every value with its "
        "source."
    )
    forced = section.get("force_shared") or []
    if forced:
        header += f" Equalised for all methods here (compare.force_shared): {', '.join(forced)}."
    left_out = [t.name for t in all_tasks() if t.name in raw and t not in configured_tasks(raw)]
    if left_out:
        reasons = section.get("left_out") or {}
        why = "; ".join(f"{name}: {reasons[name]}" for name in left_out if name in reasons)
        header += (
            f" Configured but not run in this preset (compare.tasks): {', '.join(left_out)}"
            + (f". Why: {why}." if why else "; the preset's comments say why.")
        )
    header += provenance_note(planned)
    feature = probe_protocol(raw)["feature"]
    curves = learning_curves(planned)
    path = write_report(
        read_results(results_path),
        all_tasks(),
        section.get("name") or Path(config_path).stem,
        methods,
        seeds,
        reports_dir,
        section.get("scale") or Path(config_path).stem,
        header,
        curves,
        curve_metric=f"knn_{feature}",
        mode=section.get("mode", "identical_budget"),
        probe=probe_protocol(raw),
        budget=budget_kind(planned[0].config.train),
    )
    print(terminal_text(_headline_part(path.read_text())), end="")  # where the run ends
    print(f"report: {path} (the full table, sources, curves and figures)")
    return path


# Where the report's headline part (the table and what its intervals support) ends.
HEADLINE_ENDS = ("`random_init` is the same encoder", "Published values are", "Learning curves")


def _headline_part(markdown: str) -> str:
    lines = markdown.splitlines()
    end = next((i for i, line in enumerate(lines) if line.startswith(HEADLINE_ENDS)), len(lines))
    return "\n".join(lines[:end])


def budget_kind(train: Any) -> str:
    """``flops`` (train.flops_budget: equal compute), ``seconds`` or ``epochs``."""
    if train.flops_budget is not None:
        return "flops"
    return "seconds" if train.time_budget_s is not None else "epochs"


def budget_sentence(train: Any) -> str:
    """The report header's statement of the shared budget and what kind it is."""
    common = (
        "each keeps its own masking, loss, optimiser, schedule, crops and drop path (its "
        "published recipe)."
    )
    kind = budget_kind(train)
    if kind == "flops":
        return (
            f"**Equal compute**: every method trains for the same {train.flops_budget:.4g} "
            "training FLOPs (train.flops_budget; each run's steps are floor(budget / its "
            "counted FLOPs per step), and its schedule spans exactly those steps, so every "
            "schedule reaches its end); same backbone, data, flips and batch for every method; "
            + common
        )
    if kind == "seconds":
        return (
            f"**Equal time** (machine-specific): every method trains for "
            f"{train.time_budget_s:g} s on this machine (train.time_budget_s); same backbone, "
            "data, flips and batch; " + common
        )
    return (
        f"**Equal epochs**: same backbone, data, flips, batch and {train.epochs:g} epochs for "
        "every method (methods cheaper per step spend fewer training FLOPs: run.json "
        "`training_flops`); " + common
    )


def provenance_note(planned: list) -> str:
    """A header sentence naming the runs whose code no commit holds (a modified checkout, or a
    method or task file git does not track); empty when every run's code is committed."""
    unrecorded: dict[str, list[str]] = {}
    for run in planned:
        path = Path(run.config.run.output_dir) / run.config.run.name / "run.json"
        try:
            code = json.loads(path.read_text()).get("code") or {}
        except (OSError, ValueError):
            continue
        if code.get("git_dirty") or code.get("unrecorded"):
            unrecorded[run.label] = code.get("unrecorded") or ["modified tracked files"]
    if not unrecorded:
        return ""
    named = "; ".join(f"{label}: {', '.join(files[:3])}" for label, files in unrecorded.items())
    return (
        f" **Not reproducible from a commit**: these runs used code no commit holds (each "
        f"file's sha256 is in its run.json `code.files`): {named}."
    )


def learning_curves(planned: list) -> pd.DataFrame:
    """Every planned run's ``evaluations.csv`` (the k-NN monitor), with method and seed."""
    frames = []
    for run in planned:
        path = Path(run.config.run.output_dir) / run.config.run.name / "evaluations.csv"
        if path.is_file():
            frames.append(pd.read_csv(path).assign(method=run.method, seed=run.seed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
