"""The recipe card: every setting each method trains and is evaluated with, and where each value
comes from (official repository file:line, paper section, the suite's default, or the config).

Protocols: ``pretrain`` (the method's :class:`Recipe`, with a comparison config's values over
it), and the classification protocols ``finetune``, ``linear``, ``knn`` (the adapter's settings
with the method's published protocol recipe filling what the config leaves unset).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pandas as pd

from downstream.classification.settings import ClassificationSettings, settings_for_method
from ropim.harness.config import read_yaml
from ropim.harness.errors import ConfigError
from ropim.harness.registry import available_methods, method_class
from ropim.suite.compare import RECIPE_KEYS, RECIPE_OWNED

PROTOCOLS = ("pretrain", "finetune", "linear", "knn")
CARD_COLUMNS = ["method", "protocol", "key", "value", "source"]
# Config keys that override a pre-training recipe value of the same name: those a method may
# set in a comparison, and the schedule.
_TRAIN_KEYS = (*sorted(RECIPE_KEYS), "schedule", "decay_at")


def _pretrain_rows(method: str, raw: dict[str, Any]) -> list[dict[str, Any]]:
    recipe = method_class(method).recipe
    compare = raw.get("compare") or {}
    own = ((compare.get("methods") or {}).get(method) or {}).get("train") or {}
    shared = raw.get("train") or {}
    forced = compare.get("force_shared") or []
    overrides = {k: v for k, v in shared.items() if k in _TRAIN_KEYS} | {
        k: v for k, v in own.items() if k in _TRAIN_KEYS
    }
    for key in RECIPE_OWNED:
        section, name = key.split(".")
        if key in forced and name in (raw.get(section) or {}):
            overrides[name] = raw[section][name]
    rows = []
    for key, value in recipe.values().items():
        if key in overrides:
            rows.append({"key": key, "value": overrides[key], "source": "config"})
        else:
            rows.append({"key": key, "value": value, "source": recipe.source_of(key)})
    if "min_lr" in shared:
        rows.append({"key": "min_lr", "value": shared["min_lr"], "source": "config"})
    return rows


def _protocol_rows(method: str, raw: dict[str, Any], protocol: str) -> list[dict[str, Any]]:
    settings = ClassificationSettings.parse(raw.get("classification"), "classification")
    resolved, sources = settings_for_method(settings, method_class(method).protocol_recipes)
    section = getattr(resolved, protocol)
    return [
        {"key": key, "value": value, "source": sources[protocol][key]}
        for key, value in vars(section).items()
    ]


def recipe_card(
    methods: list[str] | None = None,
    protocols: list[str] | None = None,
    config: str | Path | None = None,
) -> pd.DataFrame:
    """One row per (method, protocol, key): the resolved value and its source."""
    known = available_methods()
    methods = methods or known
    protocols = protocols or list(PROTOCOLS)
    for name in methods:
        if name not in known:
            raise ConfigError(f"unknown method {name!r} (--method); choose from {known}")
    for name in protocols:
        if name not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {name!r} (--protocol); choose from {PROTOCOLS}")
    raw = read_yaml(config) if config else {}
    rows = []
    for method in methods:
        for protocol in protocols:
            found = (
                _pretrain_rows(method, raw)
                if protocol == "pretrain"
                else _protocol_rows(method, raw, protocol)
            )
            rows += [{"method": method, "protocol": protocol} | row for row in found]
    card = pd.DataFrame(rows, columns=CARD_COLUMNS)
    card["value"] = card["value"].map(_text)
    return card


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    return "null" if value is None else str(value)


def format_card(card: pd.DataFrame, fmt: str) -> str:
    if fmt == "csv":
        buffer = io.StringIO()
        card.to_csv(buffer, index=False)
        return buffer.getvalue()
    return card.to_string(index=False)
