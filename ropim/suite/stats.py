"""Paired comparisons over seeds: every method of a comparison shares seeds, data order and
augmentation per seed, so the per-seed difference is the quantity to test.

For each measure and each (method, reference) pair: the mean per-seed difference, its 95%
confidence interval from Student's t over the seeds both have, and a verdict that claims a
difference only where the interval excludes zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from scipy import stats

MIN_SEEDS = 3  # a verdict needs at least this many paired seeds


@dataclass(frozen=True)
class PairedDifference:
    method: str
    reference: str
    measure: str
    seeds: int
    mean: float
    low: float
    high: float

    @property
    def degenerate(self) -> bool:
        """Every per-seed difference equal: a zero-width interval that says nothing about the
        spread (two seeds can agree by chance, or the measure cannot vary)."""
        return self.seeds >= 2 and self.high - self.low < 1e-12

    @property
    def verdict(self) -> str:
        if self.seeds < 2:
            return "n/a (1 seed)"
        if self.degenerate:
            return "no verdict (degenerate interval: equal differences)"
        if self.seeds < MIN_SEEDS:
            return f"no verdict (n={self.seeds}; needs {MIN_SEEDS} seeds)"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "no difference at 95%"

    @property
    def supported(self) -> bool:
        return self.verdict in ("better", "worse")

    def cell(self) -> str:
        if self.seeds < 2:
            return f"{self.mean:+.1f} (n=1)"
        if self.degenerate:
            return f"{self.mean:+.1f} [degenerate] no verdict"
        return f"{self.mean:+.1f} [{self.low:+.1f}, {self.high:+.1f}] {self.verdict}"

    def numbers(self) -> dict[str, object]:
        """The same as numbers, for CSVs: mean, low, high, n, verdict."""
        return {
            "difference": f"{self.method} − {self.reference}",
            "measure": self.measure,
            "mean": self.mean,
            "low": self.low,
            "high": self.high,
            "n": self.seeds,
            "verdict": self.verdict,
            "display": self.cell(),
        }


def paired_difference(
    rows: pd.DataFrame, method: str, reference: str, measure: str, confidence: float = 0.95
) -> PairedDifference | None:
    """``rows``: headline rows with ``method``, ``seed``, ``measure``, ``value`` (one per run)."""
    chosen = rows[rows["measure"] == measure]
    a = chosen[chosen["method"] == method].groupby("seed")["value"].mean()
    b = chosen[chosen["method"] == reference].groupby("seed")["value"].mean()
    shared = sorted(set(a.index) & set(b.index))
    if not shared:
        return None
    diffs = (a.loc[shared] - b.loc[shared]).to_numpy(dtype=float)
    mean = float(diffs.mean())
    if len(diffs) < 2:
        return PairedDifference(method, reference, measure, 1, mean, math.nan, math.nan)
    half = float(
        stats.t.ppf(0.5 + confidence / 2, len(diffs) - 1)
        * diffs.std(ddof=1)
        / math.sqrt(len(diffs))
    )
    return PairedDifference(method, reference, measure, len(diffs), mean, mean - half, mean + half)


def paired_table(
    rows: pd.DataFrame, methods: list[str], references: list[str], measures: list[str]
) -> tuple[pd.DataFrame, list[PairedDifference]]:
    """One row per (method vs. reference), one column per measure; and the differences."""
    found: list[PairedDifference] = []
    table_rows = {}
    done: set[frozenset[str]] = set()
    for reference in references:
        for method in methods:
            if method == reference or frozenset((method, reference)) in done:
                continue  # each pair once: b − a is a − b with the sign turned
            done.add(frozenset((method, reference)))
            cells = {}
            for measure in measures:
                diff = paired_difference(rows, method, reference, measure)
                if diff is not None:
                    found.append(diff)
                    cells[measure] = diff.cell()
            if cells:
                table_rows[f"{method} − {reference}"] = cells
    table = pd.DataFrame.from_dict(table_rows, orient="index").reindex(columns=measures)
    table.index.name = "difference (points)"
    return table.fillna("missing"), found


def summary_sentences(differences: list[PairedDifference]) -> list[str]:
    """What the table supports, and only that."""
    if not differences:
        return []
    claims = [d for d in differences if d.supported]
    seeds = sorted({d.seeds for d in differences})
    lines = []
    if claims:
        lines += [
            f"- {d.method} scores {'higher' if d.verdict == 'better' else 'lower'} than "
            f"{d.reference} on {d.measure}: {d.mean:+.1f} points [{d.low:+.1f}, {d.high:+.1f}] "
            f"over {d.seeds} seeds."
            for d in claims
        ]
    else:
        lines.append("- No difference between methods is supported at 95% confidence.")
    degenerate = [d for d in differences if d.degenerate]
    if degenerate:
        named = ", ".join(f"{d.method} − {d.reference} on {d.measure}" for d in degenerate)
        lines.append(
            f"- Degenerate intervals (every seed's difference equal), no verdict: {named}."
        )
    smallest = min(seeds)
    if smallest >= 2:
        factor = stats.t.ppf(0.975, smallest - 1)
        lines.append(
            f"- With {smallest} seeds the interval is ±{factor:.2f} × sd/√{smallest} of the "
            f"per-seed differences: wide; raise `compare.seeds` to narrow it."
        )
    return lines
