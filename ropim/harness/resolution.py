"""The one rule that turns a config and a method's published recipe into the values a run uses,
each with where it came from: a value the config sets wins; a key it leaves unset takes the
method's recipe; anything else is the suite's default. Pre-training, every task and the recipe
card (``ropim recipes``) all resolve through :func:`fill_section` and :func:`choose`, so the
card cannot drift from what runs use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

CONFIG = "config"


@dataclass
class Resolution:
    """Resolved values by (dotted) key, and the source of each: ``config``, a repository
    ``file:line`` or paper section from a method's recipe, or the suite's default and why."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def set(self, key: str, value: Any, source: str) -> None:
        self.values[key] = value
        self.sources[key] = source

    def merge(self, other: Resolution, prefix: str = "") -> None:
        for key, value in other.values.items():
            self.set(prefix + key, value, other.sources[key])

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"key": key, "value": value, "source": self.sources[key]}
            for key, value in self.values.items()
        ]

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """``{key: {"value": …, "source": …}}``, as runs record it."""
        return {row["key"]: {"value": row["value"], "source": row["source"]} for row in self.rows()}


def choose(config_value: Any, recipe_value: Any, recipe_source: str) -> tuple[Any, str]:
    """A value the config sets (anything but None) wins over the method's recipe."""
    if config_value is not None:
        return config_value, CONFIG
    return recipe_value, recipe_source


def _leaves(section: Any, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """(dotted key, owner, attribute) for every field, nested dataclasses flattened."""
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _leaves(value, f"{prefix}{item.name}.")
        else:
            yield f"{prefix}{item.name}", section, item.name


def fill_section(
    section: Any,
    given: Collection[str],
    recipe: Mapping[str, Any] | None,
    recipe_source: Callable[[str], str],
    default_source: Callable[[str], str],
) -> Resolution:
    """Resolve a settings dataclass in place: keys in ``given`` (what the config set) keep
    their value; others take ``recipe[key]`` when the recipe has it; the rest keep the
    section's default. Nested dataclasses resolve by dotted key (``scenes.canvas``)."""
    resolution = Resolution()
    for key, owner, name in _leaves(section):
        if key in given:
            resolution.set(key, getattr(owner, name), CONFIG)
        elif recipe is not None and key in recipe:
            setattr(owner, name, recipe[key])
            resolution.set(key, recipe[key], recipe_source(key))
        else:
            resolution.set(key, getattr(owner, name), default_source(key))
    return resolution


def given_keys(raw: Mapping[str, Any] | None, prefix: str = "") -> set[str]:
    """Dotted keys a config mapping sets (``{"scenes": {"canvas": 48}}`` → ``scenes.canvas``,
    and ``scenes`` itself)."""
    found: set[str] = set()
    for key, value in (raw or {}).items():
        found.add(prefix + key)
        if isinstance(value, Mapping):
            found |= given_keys(value, f"{prefix}{key}.")
    return found
