"""Comparison reports from tidy result rows: a markdown + CSV table and seaborn figures.

Methods are rows; each task/protocol gives ``mean ± std (n seeds)``; the pre-training cost
sits beside it; published values (each with its source) sit in their own columns and are never
mixed into the measured ones. Methods or seeds without rows show as missing.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

REFERENCES = Path(__file__).resolve().parent.parent / "reports" / "references.csv"
PROTOCOL_ORDER = ("knn", "linear", "finetune")


def accuracy_rows(results: pd.DataFrame, comparison: str) -> pd.DataFrame:
    """Top-1 rows of one comparison, the newest measurement per run and protocol, in percent."""
    rows = results[
        (results["metric"] == "top1") & results["run_id"].str.startswith(f"{comparison}/")
    ]
    rows = rows.sort_values("recorded_at").drop_duplicates(["run_id", "protocol"], keep="last")
    return rows.assign(value=rows["value"] * 100)


def build_table(
    results: pd.DataFrame,
    comparison: str,
    methods: list[str],
    seeds: list[int],
    references: pd.DataFrame | None = None,
) -> pd.DataFrame:
    rows = accuracy_rows(results, comparison)
    order = {name: i for i, name in enumerate(PROTOCOL_ORDER)}
    found = rows["protocol"].unique() if len(rows) else []
    protocols = sorted(found, key=lambda p: (order.get(p, len(order)), p))
    table = pd.DataFrame(index=pd.Index(methods, name="method"))
    for protocol in protocols:
        stats = (
            rows[rows["protocol"] == protocol]
            .groupby("method")["value"]
            .agg(["mean", "std", "count"])
        )
        table[f"{protocol} top-1 (%)"] = [
            _cell(stats.loc[m]) if m in stats.index else "missing" for m in methods
        ]
    cost = (
        rows.drop_duplicates("run_id")
        .groupby("method")[["epochs_completed", "pretrain_seconds", "pretrain_images_per_s"]]
        .mean()
    )
    table["seeds"] = [
        f"{rows[rows['method'] == m]['seed'].nunique()}/{len(seeds)}" for m in methods
    ]
    table["pre-train epochs"] = [_num(cost, m, "epochs_completed", 2) for m in methods]
    table["pre-train s"] = [_num(cost, m, "pretrain_seconds", 0) for m in methods]
    table["pre-train img/s"] = [_num(cost, m, "pretrain_images_per_s", 0) for m in methods]
    if references is not None and len(references):
        for protocol in ("finetune", "linear"):
            ref = references[
                (references["task"] == "classification") & (references["protocol"] == protocol)
            ].set_index("method")
            table[f"published {protocol} (ViT-B/16, IN-1k)"] = [
                f"{ref.loc[m, 'value']:.1f}" if m in ref.index else "" for m in methods
            ]
    return table


def _cell(stats: pd.Series) -> str:
    if stats["count"] < 2:
        return f"{stats['mean']:.1f} (n=1)"
    return f"{stats['mean']:.1f} ± {stats['std']:.1f} (n={int(stats['count'])})"


def _num(frame: pd.DataFrame, method: str, column: str, digits: int) -> str:
    if method not in frame.index or pd.isna(frame.loc[method, column]):
        return "missing"
    return f"{frame.loc[method, column]:.{digits}f}"


def write_report(
    results: pd.DataFrame,
    comparison: str,
    methods: list[str],
    seeds: list[int],
    out_dir: str | Path,
    scale: str,
    header: str = "",
) -> Path:
    """``table2_<scale>.md`` and ``.csv`` plus two figures; returns the markdown path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    references = pd.read_csv(REFERENCES) if REFERENCES.is_file() else None
    table = build_table(results, comparison, methods, seeds, references)
    table.to_csv(out_dir / f"table2_{scale}.csv")
    rows = accuracy_rows(results, comparison)
    figures = _figures(rows, out_dir, scale) if len(rows) else []
    lines = [f"# Table 2 ({scale}): {', '.join(methods)} under one budget", ""]
    if header:
        lines += [header, ""]
    lines += [table.to_markdown(), ""]
    if references is not None:
        lines += [
            "Published values are ViT-B/16 on ImageNet-1k and are not comparable with a "
            "smaller scale; sources:",
            "",
        ]
        lines += [
            f"- {r.method} {r.protocol}: {r.value} — {r.source}"
            for r in references.itertuples()
            if r.task == "classification"
        ]
        lines.append("")
    lines += [f"![{name}]({name})" for name in figures]
    path = out_dir / f"table2_{scale}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _figures(rows: pd.DataFrame, out_dir: Path, scale: str) -> list[str]:
    sns.set_theme(style="whitegrid")
    time_plot = sns.relplot(
        data=rows,
        x="pretrain_seconds",
        y="value",
        hue="method",
        col="protocol",
        kind="scatter",
        height=3.2,
        s=60,
    )
    time_plot.set_axis_labels("pre-training time (s)", "top-1 (%)")
    time_name = f"table2_{scale}_accuracy_vs_time.png"
    time_plot.savefig(out_dir / time_name, dpi=110)
    plt.close(time_plot.figure)
    bars = sns.catplot(
        data=rows,
        x="protocol",
        y="value",
        hue="method",
        kind="bar",
        errorbar="sd",
        height=3.5,
        aspect=1.6,
    )
    bars.set_axis_labels("protocol", "top-1 (%), mean ± sd over seeds")
    bar_name = f"table2_{scale}_bars.png"
    bars.savefig(out_dir / bar_name, dpi=110)
    plt.close(bars.figure)
    return [time_name, bar_name]
