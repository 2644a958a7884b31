"""The report's CSVs, for readers that compute: numbers only (the markdown keeps the display
strings such as ``39.1 ± 1.9 (n=3)``) under plain identifier headers (``knn_top1_mean``), ASCII,
no spaces, no ``%``."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd

from ropim.harness.tasks import TaskSpec

# The table's fixed columns (display title -> identifier).
FIXED = {
    "seeds": "seeds",
    "pre-train epochs": "pretrain_epochs",
    "training FLOPs": "training_flops",
    "pre-train s": "pretrain_seconds",
    "pre-train img/s": "pretrain_images_per_s",
}


def identifier(text: str) -> str:
    """``"k-NN top-1 (%)"`` -> ``"k_nn_top1"``: lower case, letters, digits and underscores."""
    text = text.lower().replace("top-1", "top1").replace("%", "pct")
    text = re.sub(r"[^a-z0-9]+", "_", text).strip("_")
    return f"m_{text}" if text[:1].isdigit() else text


def measure_ids(tasks: Sequence[TaskSpec]) -> dict[str, str]:
    """Each measured and published column title -> ``<protocol>_<metric>`` (with the task in
    front where two tasks share one), published ones as ``published_<protocol>_<metric>``."""
    ids: dict[str, str] = {}
    for prefix, kind in (("", "headlines"), ("published_", "published")):
        columns = [(t.name, c) for t in tasks for c in getattr(t, kind)]
        names = [f"{c.protocol}_{c.metric}" for _, c in columns]
        for (task, column), name in zip(columns, names, strict=True):
            shared = names.count(name) > 1
            ids[column.title] = identifier(prefix + (f"{task}_{name}" if shared else name))
    return ids


def numeric_table(
    table: pd.DataFrame, rows: pd.DataFrame, methods: list[str], tasks: Sequence[TaskSpec]
) -> pd.DataFrame:
    """One row per method: ``<measure>_mean``/``_sd``/``_n`` for each measured column, seeds done
    and planned, cost, and the published values (``_other_protocol`` where marked †)."""
    ids = measure_ids(tasks)
    out = pd.DataFrame(index=pd.Index(methods, name="method"))
    stats = (
        rows.groupby(["measure", "method"])["value"].agg(["mean", "std", "count"])
        if len(rows)
        else pd.DataFrame(columns=["mean", "std", "count"])
    )
    for column in table.columns:
        if column in FIXED:
            name = FIXED[column]
            if name == "seeds":
                done_planned = table[column].astype(str).str.split("/", expand=True)
                out["seeds_done"] = pd.to_numeric(done_planned[0]).to_numpy()
                out["seeds_planned"] = pd.to_numeric(done_planned[1]).to_numpy()
            else:
                out[name] = pd.to_numeric(table[column].replace("", None), errors="coerce")
        elif column.startswith("published"):
            name = ids.get(column, identifier(column))
            cells = table[column].astype(str)
            out[name] = pd.to_numeric(cells.str.rstrip("†").replace("", None), errors="coerce")
            if cells.str.endswith("†").any():
                out[f"{name}_other_protocol"] = cells.str.endswith("†").to_numpy()
        else:
            name = ids.get(column, identifier(column))
            for suffix, statistic in (("mean", "mean"), ("sd", "std"), ("n", "count")):
                out[f"{name}_{suffix}"] = [
                    stats.loc[(column, m), statistic] if (column, m) in stats.index else None
                    for m in methods
                ]
    return out


def paired_rows(differences: Sequence, tasks: Sequence[TaskSpec]) -> pd.DataFrame:
    """One row per paired difference: method, reference, measure id, mean, low, high, n,
    verdict."""
    ids = measure_ids(tasks)
    return pd.DataFrame(
        [
            {
                "method": d.method,
                "reference": d.reference,
                "measure": ids.get(d.measure, identifier(d.measure)),
                "mean": d.mean,
                "low": d.low,
                "high": d.high,
                "n": d.seeds,
                "verdict": d.verdict,
            }
            for d in differences
        ]
    )
