"""Paired per-seed differences: the interval and the verdict follow Student's t."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy import stats

from ropim.suite.stats import paired_difference, paired_table, summary_sentences


def _rows(values: dict[str, list[float]], measure: str = "knn top-1 (%)") -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"method": m, "seed": s, "measure": measure, "value": v}
            for m, vs in values.items()
            for s, v in enumerate(vs)
        ]
    )


def test_interval_is_the_t_interval_of_the_per_seed_differences():
    rows = _rows({"ropim": [70.0, 72.0, 71.0], "mae": [60.0, 63.0, 60.5]})
    diff = paired_difference(rows, "mae", "ropim", "knn top-1 (%)")
    d = [-10.0, -9.0, -10.5]
    sd = pd.Series(d).std()
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert diff.mean == pytest.approx(sum(d) / 3)
    assert (diff.low, diff.high) == pytest.approx((diff.mean - half, diff.mean + half))
    assert diff.verdict == "worse"


def test_pairing_removes_the_seed_effect_that_unpaired_spreads_would_keep():
    # Seeds differ a lot, but mae is 0.5 above ropim on every seed.
    rows = _rows({"ropim": [60.0, 70.0, 80.0], "mae": [60.5, 70.5, 80.4]})
    assert paired_difference(rows, "mae", "ropim", "knn top-1 (%)").verdict == "better"
    noisy = _rows({"ropim": [60.0, 70.0, 80.0], "mae": [61.0, 69.0, 80.5]})
    assert paired_difference(noisy, "mae", "ropim", "knn top-1 (%)").verdict == (
        "no difference at 95%"
    )


def test_only_shared_seeds_count_and_one_seed_gives_no_verdict():
    rows = _rows({"ropim": [70.0, 71.0], "mae": [60.0]})
    diff = paired_difference(rows, "mae", "ropim", "knn top-1 (%)")
    assert diff.seeds == 1 and diff.verdict == "n/a (1 seed)"


def test_summary_claims_only_supported_differences():
    rows = _rows({"ropim": [70.0, 72.0, 71.0], "mae": [60.0, 63.0, 60.5], "simmim": [71, 70, 73]})
    table, diffs = paired_table(rows, ["ropim", "mae", "simmim"], ["ropim"], ["knn top-1 (%)"])
    assert list(table.index) == ["mae − ropim", "simmim − ropim"]
    assert "worse" in table.loc["mae − ropim", "knn top-1 (%)"]
    text = "\n".join(summary_sentences(diffs))
    assert "mae scores lower than ropim" in text and "simmim" not in text.split("\n")[0]
    assert "±4.30" in text


def test_each_pair_appears_once():
    rows = _rows({"ropim": [70.0, 72.0], "mae": [60.0, 63.0], "random_init": [65.0, 64.0]})
    table, _ = paired_table(
        rows, ["ropim", "mae", "random_init"], ["ropim", "random_init"], ["knn top-1 (%)"]
    )
    assert list(table.index) == ["mae − ropim", "random_init − ropim", "mae − random_init"]


def test_report_keeps_only_rows_of_each_runs_newest_budget():
    from ropim.suite.report import _newest

    def row(run, budget, task, value, when):
        return {
            "run_id": f"cmp/{run}",
            "backbone": "vit@28/p4/d6",
            "dataset": "mnist",
            "budget_epochs": budget,
            "budget_seconds": float("nan"),
            "task": task,
            "protocol": "p",
            "metric": "m",
            "value": value,
            "recorded_at": when,
        }

    results = pd.DataFrame(
        [
            row("ropim_seed0", 5.0, "segmentation", 0.1, "2026-01-01"),  # an older budget
            row("ropim_seed0", 5.0, "classification", 0.2, "2026-01-02"),
            row("ropim_seed0", 12.0, "classification", 0.3, "2026-02-01"),
            row("ropim_seed0", 12.0, "classification", 0.4, "2026-02-02"),  # re-evaluated
            row("mae_seed0", 5.0, "segmentation", 0.5, "2026-01-01"),
        ]
    )
    kept = _newest(results, "cmp")
    assert sorted(zip(kept["run_id"], kept["task"], kept["value"], strict=True)) == [
        ("cmp/mae_seed0", "segmentation", 0.5),
        ("cmp/ropim_seed0", "classification", 0.4),
    ]


def test_compare_tasks_restricts_which_configured_tasks_run():
    from downstream.tasks import configured_tasks
    from ropim.harness.errors import ConfigError

    raw = {"compare": {"tasks": ["classification"]}, "classification": {}, "segmentation": {}}
    assert [t.name for t in configured_tasks(raw)] == ["classification"]
    assert {t.name for t in configured_tasks({"segmentation": {}})} >= {"segmentation"}
    with pytest.raises(ConfigError, match="compare.tasks=.*detection"):
        configured_tasks(raw | {"compare": {"tasks": ["detection"]}})


def test_equal_time_view_takes_each_runs_last_point_within_the_shortest_run():
    from ropim.suite.report import equal_time_rows

    def curve(method, seed, seconds, values):
        return [
            {
                "method": method,
                "seed": seed,
                "step": i * 10,
                "epoch": i,
                "train_seconds": t,
                "knn_cls": v,
            }
            for i, (t, v) in enumerate(zip(seconds, values, strict=True))
        ]

    curves = pd.DataFrame(
        curve("ropim", 0, [0, 50, 100], [0.30, 0.40, 0.50])
        + curve("mae", 0, [0, 30, 60, 90], [0.30, 0.35, 0.45, 0.55])
        + curve("ropim", 1, [0, 40, 80], [0.31, 0.41, 0.45])
    )
    rows = equal_time_rows(curves, "knn_cls", ["ropim", "mae", "random_init"])
    assert set(rows["seconds"]) == {80.0}  # the shortest run's total
    got = {(r.method, r.seed): (round(r.value, 6), r.epoch) for r in rows.itertuples()}
    assert got == {
        ("ropim", 0): (40.0, 1),  # 50 s <= 80 s < 100 s
        ("mae", 0): (45.0, 2),  # 60 s
        ("ropim", 1): (45.0, 2),  # its own end
        ("random_init", 0): (30.0, 0),  # step 0: the encoder before training
        ("random_init", 1): (31.0, 0),
    }


def test_a_verdict_needs_three_seeds_and_a_degenerate_interval_gets_none():
    """Two seeds whose differences are equal gave "+1.2 [+1.2, +1.2] better" (tiny preset)."""
    equal = paired_difference(_rows({"ropim": [70.0, 71.0], "mae": [71.2, 72.2]}), "mae", "ropim",
                              "knn top-1 (%)")  # fmt: skip
    assert equal.degenerate and "degenerate" in equal.verdict and not equal.supported
    assert equal.cell() == "+1.2 [degenerate] no verdict"
    two = paired_difference(_rows({"ropim": [70.0, 71.0], "mae": [75.0, 76.2]}), "mae", "ropim",
                            "knn top-1 (%)")  # fmt: skip
    assert two.low > 0 and two.verdict == "no verdict (n=2; needs 3 seeds)"
    three = _rows({"ropim": [70.0, 71.0, 72.0], "mae": [71.0, 72.0, 73.0]})
    diff = paired_difference(three, "mae", "ropim", "knn top-1 (%)")
    assert diff.degenerate and "Degenerate intervals" in "\n".join(summary_sentences([diff]))
    assert diff.numbers()["n"] == 3 and diff.numbers()["mean"] == pytest.approx(1.0)


def test_equal_compute_view_reads_each_run_at_the_cheapest_runs_total_flops():
    from ropim.suite.report import equal_budget_rows

    curves = pd.DataFrame(
        [
            {"method": m, "seed": 0, "step": i, "epoch": i, "training_flops": f, "knn_cls": v}
            for m, flops, values in (
                ("ropim", [0, 3e9, 6e9], [0.30, 0.40, 0.50]),
                ("mae", [0, 1e9, 2e9, 4e9], [0.30, 0.33, 0.36, 0.44]),
            )
            for i, (f, v) in enumerate(zip(flops, values, strict=True))
        ]
    )
    rows = equal_budget_rows(curves, "knn_cls", ["ropim", "mae"], "flops")
    assert set(rows["budget"]) == {4e9}  # MAE's total: the cheapest run's
    got = {r.method: round(r.value, 6) for r in rows.itertuples()}
    assert got == {"ropim": 40.0, "mae": 44.0}  # ROPIM's 3e9 point: the last within 4e9
