"""The interface a downstream task implements: it declares itself once (name, protocols, the
table columns it fills, published-value columns, floors) and the suite reads that declaration;
nothing outside the task names its protocols or metrics.

A task package ``downstream/<name>/`` exposes ``TASK = TaskSpec(...)`` in its ``__init__``;
its settings class and its ``run`` function come from two small loader functions that import
them when first used (segmentation pulls in ``transformers``, which takes seconds to load).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ropim.harness.config import build_section
from ropim.harness.errors import ConfigError
from ropim.harness.resolution import Resolution, fill_section, given_keys

SettingsT = TypeVar("SettingsT", bound="TaskSettings")
OPERATIONAL = {"log_every", "checkpoint_every", "num_workers"}  # how a run goes, not what it is


def default_source_of(key: str, fallback: str) -> str:
    """Where a default comes from on the recipe card: operational keys change no result."""
    return "suite setting (no effect on the result)" if key in OPERATIONAL else fallback


@dataclass
class TaskSettings:
    """Base of every task's settings section: parsed with unknown keys refused, then checked.

    ``SOURCES`` names where each default comes from (repository file:line), ``DEFAULT_SOURCE``
    the rest; the recipe card reads them."""

    DEFAULT_SOURCE: ClassVar[str] = "suite default"
    SOURCES: ClassVar[dict[str, str]] = {}

    @classmethod
    def read(cls: type[SettingsT], raw: dict[str, Any] | None, section: str) -> SettingsT:
        """The section with unknown keys refused but not checked (the recipe card lists a
        preset's values even where a data folder is left for the user to set)."""
        settings = build_section(cls, raw or {}, f"{section}.")
        settings.given = given_keys(raw)  # type: ignore[attr-defined]  # not a config key
        return settings

    @classmethod
    def parse(cls: type[SettingsT], raw: dict[str, Any] | None, section: str) -> SettingsT:
        settings = cls.read(raw, section)
        settings.check(section)
        return settings

    def default_source(self, key: str) -> str:
        return default_source_of(key, self.SOURCES.get(key, self.DEFAULT_SOURCE))

    def card(self, section: str, recipes: Mapping[str, Any]) -> dict[str, Resolution]:
        """What a run of this task uses for a method with these published protocol recipes,
        by card protocol, each value with its source. Tasks without per-method recipes list
        their settings under their own name."""
        given = getattr(self, "given", set())
        return {section: fill_section(copy.deepcopy(self), given, None, str, self.default_source)}

    def check(self, section: str) -> None:
        """Raise :class:`ConfigError` naming ``section.key`` for a value that cannot work."""


@dataclass
class TrainingSettings(TaskSettings):
    """What every downstream training run sets. ``batch_size`` is per device, as in
    ``train.batch_size``: the total is batch_size × devices, recorded in each result."""

    batch_size: int = 32
    log_every: int = 20
    checkpoint_every: int = 2000  # steps
    num_workers: int = 0

    def check(self, section: str) -> None:
        for name in ("batch_size", "log_every", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{section}.{name}={getattr(self, name)} must be positive")
        if self.num_workers < 0:
            raise ConfigError(f"{section}.num_workers={self.num_workers} must be >= 0")


@dataclass(frozen=True)
class Column:
    """One (protocol, metric) the task measures, and the title of its report column."""

    protocol: str
    metric: str
    title: str


@dataclass(frozen=True)
class Floor:
    """A measured score no useful model should fall to (e.g. predicting the majority class)."""

    protocol: str
    metric: str
    description: str  # "Predicting the most frequent class everywhere"


@dataclass
class TaskOutcome:
    """What a task run measured: ``(protocol, metric, value)`` rows plus details for
    ``<run>/<task>.json``."""

    measurements: list[tuple[str, str, float]]
    details: dict[str, Any] = field(default_factory=dict)


# run_dir, settings, after_step -> what the task measured
RunTask = Callable[[Path, Any, Sequence[Callable[[int], None]]], TaskOutcome]


@dataclass(frozen=True)
class TaskSpec:
    name: str  # also the config section and the ``task`` column of results
    order: int  # position in tables and in a reproduction
    settings: Callable[[], type[TaskSettings]]  # imports and returns the settings class
    run: Callable[[], RunTask]  # imports and returns the function that runs the task
    protocols: tuple[str, ...]
    headlines: tuple[Column, ...]  # measured columns of the report, in order
    published: tuple[Column, ...] = ()  # columns filled from the published references
    floors: tuple[Floor, ...] = ()
    always: bool = False  # run even when the config has no section for it

    def parse_settings(self, raw: dict[str, Any] | None) -> TaskSettings:
        """This task's section of a config mapping (``raw[self.name]``), parsed and checked."""
        return self.settings().parse((raw or {}).get(self.name), self.name)

    def read_settings(self, raw: dict[str, Any] | None) -> TaskSettings:
        """The same section, unchecked (for the recipe card)."""
        return self.settings().read((raw or {}).get(self.name), self.name)

    def evaluate(
        self,
        run_dir: str | Path,
        settings: TaskSettings,
        after_step: Sequence[Callable[[int], None]] = (),
    ) -> TaskOutcome:
        return self.run()(Path(run_dir), settings, after_step)
