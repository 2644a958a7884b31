"""The recipe card: every value each method trains and is evaluated with, and where each comes
from (official repository file:line, paper section, the suite's default, or the config).

It resolves through the very functions runs use — :func:`resolve_pretraining` for pre-training
(architecture, init, masking/projection settings, view, epochs, batch, optimiser, schedule)
and each task's :meth:`TaskSettings.card` (classification per protocol with the method's
published recipes, UperNet, ViTDet) — on the runs a preset plans, so it cannot drift from
them. Published reference numbers are listed beside, each with the protocol that produced it.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pandas as pd

from downstream.tasks import all_tasks
from ropim.harness.config import Config, apply_overrides, load_config_dict, read_yaml
from ropim.harness.errors import ConfigError
from ropim.harness.pretrain import resolve_pretraining
from ropim.harness.registry import available_methods, method_class
from ropim.harness.resolution import given_keys
from ropim.suite.compare import plan_comparison
from ropim.suite.report import read_references, reference_settings

CARD_COLUMNS = ["method", "protocol", "key", "value", "source"]


def protocols() -> list[str]:
    """``pretrain``, then each task's card protocols (classification: ``knn``, ``linear``,
    ``finetune``; the others under their task's name)."""
    found = ["pretrain"]
    for task in all_tasks():
        found += list(task.read_settings({}).card(task.name, {}))
    return found


def preset_runs(
    config: str | Path | None, methods: list[str], overrides: list[str]
) -> tuple[dict[str, tuple[Config, set[str] | None]], dict[str, Any]]:
    """Per method, the config its first planned run trains with and the keys the preset set."""
    if config is None:
        raw = apply_overrides({}, overrides)
        runs = {}
        for method in methods:
            one = copy.deepcopy(raw) | {"method": {"name": method}}
            runs[method] = (load_config_dict(one), given_keys(one))
        return runs, raw
    raw = apply_overrides(read_yaml(config), overrides)
    if "compare" not in raw:
        cfg = load_config_dict(copy.deepcopy(raw), str(config))
        return {cfg.method.get("name", ""): (cfg, given_keys(raw))}, raw
    runs: dict[str, tuple[Config, set[str] | None]] = {}
    for planned in plan_comparison(config, overrides):
        if planned.pretrained and planned.method not in runs:
            runs[planned.method] = (planned.config, planned.given)
    return runs, raw


def _reference_rows(method: str) -> list[dict[str, Any]]:
    references = read_references()
    if references is None:
        return []
    rows = []
    for ref in references[references["method"] == method].itertuples():
        protocol = ref.protocol if ref.task == "classification" else ref.task
        where = str(ref.source)
        rows.append(
            {
                "protocol": protocol,
                "key": f"reference.{ref.metric}",
                "value": ref.value,
                "source": where,
            }
        )
        rows.append(
            {
                "protocol": protocol,
                "key": "reference.protocol",
                "value": ref.protocol_detail,
                "source": where,
            }
        )
        if isinstance(ref.feature, str):  # a frozen-feature protocol: the settings that match
            rows.append(
                {
                    "protocol": protocol,
                    "key": "reference.settings",
                    "value": reference_settings(ref.feature, ref.layer),
                    "source": where,
                }
            )
    return rows


def recipe_card(
    methods: list[str] | None = None,
    chosen: list[str] | None = None,
    config: str | Path | None = None,
    devices: int = 1,
    overrides: list[str] | None = None,
) -> pd.DataFrame:
    """One row per (method, protocol, key): the resolved value and its source. ``devices``:
    the world size the lr and batch totals are resolved for; ``overrides``: ``key=value``
    settings over the preset, as every command takes them."""
    known = available_methods()
    every = protocols()
    for name in methods or []:
        if name not in known:
            raise ConfigError(f"unknown method {name!r} (--method); choose from {known}")
    for name in chosen or []:
        if name not in every:
            raise ConfigError(f"unknown protocol {name!r} (--protocol); choose from {every}")
    if devices < 1:
        raise ConfigError(f"--devices={devices} must be at least 1")
    runs, raw = preset_runs(config, methods or known, list(overrides or []))
    if methods:
        missing = [m for m in methods if m not in runs]
        if missing:
            raise ConfigError(f"method {missing[0]!r} is not in {config}; it plans {list(runs)}")
    rows: list[dict[str, Any]] = []
    for method, (cfg, given) in runs.items():
        if methods and method not in methods:
            continue
        found = [{"protocol": "pretrain"} | row for row in _pretrain_rows(cfg, devices, given)]
        recipes = method_class(method).protocol_recipes
        for task in all_tasks():
            for protocol, resolution in task.read_settings(raw).card(task.name, recipes).items():
                found += [{"protocol": protocol} | row for row in resolution.rows()]
        found += _reference_rows(method)
        rows += [{"method": method} | row for row in found if row["protocol"] in (chosen or every)]
    card = pd.DataFrame(rows, columns=CARD_COLUMNS)
    card["value"] = card["value"].map(card_text)
    return card


def _pretrain_rows(cfg: Config, devices: int, given: set[str] | None) -> list[dict[str, Any]]:
    return resolve_pretraining(copy.deepcopy(cfg), devices, given=given).card.rows()


def card_text(value: Any) -> str:
    """A value as the card prints it (lists and tuples alike, None as null)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(card_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {card_text(v)}" for k, v in value.items()) + "}"
    return "null" if value is None else str(value)


def format_card(card: pd.DataFrame, fmt: str) -> str:
    if fmt == "csv":
        buffer = io.StringIO()
        card.to_csv(buffer, index=False)
        return buffer.getvalue()
    return card.to_string(index=False)
