"""The downstream tasks a comparison config can name, each as its own top-level section.

Imported lazily: the segmentation heads pull in ``transformers``, which takes seconds to load.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# section -> (settings builder, evaluator)
TASKS: dict[str, tuple[str, str]] = {
    "classification": (
        "downstream.classification.settings:classification_settings",
        "downstream.classification.evaluate:evaluate_classification",
    ),
    "segmentation": (
        "downstream.segmentation.settings:segmentation_settings",
        "downstream.segmentation.evaluate:evaluate_segmentation",
    ),
    "detection": (
        "downstream.detection.settings:detection_settings",
        "downstream.detection.evaluate:evaluate_detection",
    ),
}


def _resolve(target: str) -> Callable[..., Any]:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def configured_tasks(raw: dict[str, Any]) -> list[str]:
    """Classification always; every other task when its section is present."""
    return [t for t in TASKS if t == "classification" or t in raw]


def task_settings(task: str, raw: dict[str, Any]) -> Any:
    return _resolve(TASKS[task][0])(raw.get(task))


def evaluate_task(task: str, run_dir: Any, settings: Any, results_path: Any) -> list[dict]:
    return _resolve(TASKS[task][1])(run_dir, settings, results_path)


def headline_metrics(task: str) -> set[str]:
    """The metrics of ``task`` that fill the report's table (printed as they arrive)."""
    from ropim.report import HEADLINES

    return {metric for (section, _, metric) in HEADLINES if section == task}
