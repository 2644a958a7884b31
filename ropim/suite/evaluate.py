"""Evaluate a pre-training run with one downstream task and record it: tidy rows appended to
the results CSV and ``<run>/<task>.json`` (the "evaluated" mark), both from rank 0."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ropim.harness.config import load_config
from ropim.harness.records import (
    code_label,
    code_version,
    loaded_module_files,
    read_run_record,
    write_json,
)
from ropim.harness.runtime import launch_rank
from ropim.harness.tasks import TaskSettings, TaskSpec
from ropim.harness.tracking import Tracker
from ropim.suite.results import append_results


class RunRows:
    """Collects rows that share the run's identity and cost; rank 0 alone writes them."""

    def __init__(self, run_dir: str | Path, task: str) -> None:
        run_dir = Path(run_dir)
        record = read_run_record(run_dir, finished=True)
        budget = record.get("budget", {})
        arch = record["architecture"]
        self.run_dir = run_dir
        self.task = task
        self.base = {
            "run_id": f"{run_dir.parent.name}/{run_dir.name}",
            "method": record["method"]["name"],
            "backbone": f"{arch['model']}@{arch['img_size']}/p{arch['patch_size']}"
            f"/d{arch['depth']}",
            "dataset": record["dataset"]["name"],
            "budget_epochs": budget.get("epochs"),
            "budget_seconds": budget.get("time_budget_s"),
            "epochs_completed": round(record["epochs_completed"], 4),
            "pretrain_seconds": round(record["train_time_s"], 2),
            "pretrain_images_per_s": round(record["images_per_s"], 2),
            "task": task,
            "seed": record["seed"],
            "code_version": code_label(record.get("code")),
        }
        self.rows: list[dict[str, Any]] = []
        self.code_files: list[Path] = []  # the task's modules, recorded in <task>.json
        self.final_step = int(record.get("total_steps") or 0)
        self.finished_at = str(record.get("finished_at") or "")

    def add(self, protocol: str, metric: str, value: float) -> None:
        self.rows.append(
            self.base
            | {
                "protocol": protocol,
                "metric": metric,
                "value": round(float(value), 6),
                "recorded_at": datetime.now(timezone.utc).isoformat(),
            }
        )

    def write(self, results_path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Append to ``results_path`` and write ``<run>/<task>.json`` (the "evaluated" mark)."""
        if launch_rank() != 0:  # under torchrun every rank evaluates
            return
        append_results(results_path, self.rows, supersedes=self._earlier_attempt)
        payload = {"code": code_version(self.code_files), "rows": self.rows} | (extra or {})
        write_json(self.run_dir / f"{self.task}.json", payload)
        self._track()

    def _earlier_attempt(self, row: dict[str, str]) -> bool:
        """A row this task wrote for this very run (after it finished pre-training) in an
        attempt that never wrote ``<task>.json``: the re-run's rows replace it. Rows of an
        earlier run under the same name (recorded before this one finished) are kept."""
        return (
            row["run_id"] == self.base["run_id"]
            and row["task"] == self.task
            and bool(self.finished_at)
            and row["recorded_at"] >= self.finished_at
        )

    def _track(self) -> None:
        """The scores beside the run's training curves, at its last pre-training step."""
        settings = load_config(self.run_dir / "config.yaml").log
        tracker = Tracker(self.run_dir, settings, self.run_dir.name)
        scores = {f"{row['protocol']}/{row['metric']}": row["value"] for row in self.rows}
        tracker.log(f"results/{self.task}", scores, self.final_step)
        tracker.close()


def evaluate_run(
    task: TaskSpec,
    run_dir: str | Path,
    settings: TaskSettings,
    results_path: str | Path,
    after_step: Sequence[Callable[[int], None]] = (),
) -> list[dict[str, Any]]:
    """Run ``task`` on ``run_dir``; returns the rows it appended to ``results_path``."""
    rows = RunRows(run_dir, task.name)  # reads run.json: a wrong folder fails before training
    outcome = task.evaluate(run_dir, settings, after_step)
    rows.code_files = loaded_module_files([task.run().__module__.rpartition(".")[0]])
    for protocol, metric, value in outcome.measurements:
        rows.add(protocol, metric, value)
    rows.write(results_path, outcome.details)
    return rows.rows
