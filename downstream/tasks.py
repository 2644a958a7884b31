"""The downstream tasks: every ``downstream/<name>/`` package whose ``__init__`` declares
``TASK``, in their declared order. Adding a task is adding such a package."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

from ropim.harness.errors import ConfigError
from ropim.harness.tasks import TaskSpec


@functools.lru_cache(maxsize=1)
def all_tasks() -> tuple[TaskSpec, ...]:
    import downstream

    found = []
    for info in pkgutil.iter_modules(downstream.__path__):
        if info.ispkg:
            spec = getattr(importlib.import_module(f"downstream.{info.name}"), "TASK", None)
            if isinstance(spec, TaskSpec):
                found.append(spec)
    return tuple(sorted(found, key=lambda spec: spec.order))


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
