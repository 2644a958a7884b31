"""The downstream tasks, one registry: each ``downstream/<name>/`` package declares ``TASK`` in
its ``__init__``; adding a task is adding such a package and naming it in ``TASKS``."""

from __future__ import annotations

from typing import Any

from downstream import classification, detection, segmentation
from ropim.harness.errors import ConfigError
from ropim.harness.tasks import TaskSpec

TASKS: tuple[TaskSpec, ...] = tuple(
    sorted((classification.TASK, segmentation.TASK, detection.TASK), key=lambda spec: spec.order)
)


def all_tasks() -> tuple[TaskSpec, ...]:
    return TASKS


def task_named(name: str) -> TaskSpec:
    for spec in all_tasks():
        if spec.name == name:
            return spec
    names = [spec.name for spec in all_tasks()]
    raise ConfigError(f"unknown task {name!r}; choose from {names}")


def configured_tasks(raw: dict[str, Any]) -> list[TaskSpec]:
    """Tasks that run always, and every other task whose section the config holds; when
    ``compare.tasks`` lists names, only those (a preset can keep a section one override away)."""
    chosen = (raw.get("compare") or {}).get("tasks")
    specs = [spec for spec in all_tasks() if spec.always or spec.name in raw]
    if chosen is None:
        return specs
    names = [spec.name for spec in specs]
    if not isinstance(chosen, list) or not set(chosen) <= set(names):
        raise ConfigError(
            f"compare.tasks={chosen!r} must list tasks this config has sections for: {names}"
        )
    return [spec for spec in specs if spec.name in chosen]
