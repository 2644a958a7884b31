"""Comparison reports from tidy result rows: a markdown + CSV table and seaborn figures.

Methods are rows; each task/protocol gives ``mean ± std (n seeds)``; the pre-training cost
sits beside it; published values (each with its source) sit in their own columns and are never
mixed into the measured ones. Methods or seeds without rows show as missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from ropim.harness.registry import available_methods, method_class
from ropim.harness.tasks import TaskSpec
from ropim.suite import report_figures as figures_of
from ropim.suite.compare import RANDOM_INIT
from ropim.suite.report_csv import numeric_table, paired_rows
from ropim.suite.stats import paired_table, summary_sentences


def headline_titles(tasks: Sequence[TaskSpec]) -> dict[tuple[str, str, str], str]:
    """The table's measured columns, in order: (task, protocol, metric) -> column title."""
    return {(t.name, c.protocol, c.metric): c.title for t in tasks for c in t.headlines}


def published_titles(tasks: Sequence[TaskSpec]) -> dict[tuple[str, str, str], str]:
    """Published values shown beside the measured ones: (task, protocol, metric) -> title."""
    return {(t.name, c.protocol, c.metric): c.title for t in tasks for c in t.published}


REFERENCE_COLUMNS = [
    "method", "backbone", "pretrain_data", "pretrain_epochs", "task", "protocol", "metric",
    "value", "source", "protocol_detail", "feature", "layer",
]  # fmt: skip


def read_references(method_dirs: Sequence[str | Path] = ()) -> pd.DataFrame | None:
    """Every registered method's published numbers (``MaskingMethod.references``), one row
    each; None when no method declares any."""
    rows = []
    for name in available_methods(method_dirs):
        for ref in method_class(name, method_dirs).references:
            rows.append({"method": name} | asdict(ref))
    if not rows:
        return None
    table = pd.DataFrame(rows)[REFERENCE_COLUMNS]
    return table.astype({"feature": object, "layer": object}).where(table.notna(), None)


def reference_settings(feature: str, layer: Any) -> str:
    """The settings that probe as a reference row did."""
    block = _probe_of(feature, layer)[1]
    return f"classification.feature={feature} classification.linear.layer=" + (
        "null" if block == "last" else block
    )


def probe_protocol(raw: dict[str, Any]) -> dict[str, Any]:
    """The frozen-feature protocol a config's linear probe uses (feature, block)."""
    classification = raw.get("classification") or {}
    layer = (classification.get("linear") or {}).get("layer")
    return {"feature": classification.get("feature", "cls"), "layer": layer}


def _probe_of(feature: Any, layer: Any) -> tuple[str, str]:
    block = "last" if str(layer) in ("last", "nan", "None", "") else str(int(float(layer)))
    return str(feature), block


def protocol_mismatches(references: pd.DataFrame, probe: dict[str, Any]) -> dict[int, str]:
    """Reference rows (by index) measured under another frozen-feature protocol than this
    comparison's probe, each with a sentence saying how they differ."""
    ours = _probe_of(probe.get("feature", "cls"), probe.get("layer"))
    found = {}
    for index, ref in references.iterrows():
        if ref["protocol"] != "linear" or not isinstance(ref.get("feature"), str):
            continue
        theirs = _probe_of(ref["feature"], ref["layer"])
        if theirs != ours:
            found[index] = (
                f"{ref['method']} {ref['protocol']} {ref['value']}: measured on block "
                f"{theirs[1]}'s {theirs[0]} features, this table's probe reads block {ours[1]}'s "
                f"{ours[0]} ({reference_settings(*theirs)} matches it)"
            )
    return found


BUDGET_COLUMNS = ["backbone", "dataset", "budget_epochs", "budget_seconds"]


def _newest(results: pd.DataFrame, comparison: str) -> pd.DataFrame:
    """The newest row per run and measure, from the run's newest pre-training budget only: a
    preset whose model or epochs changed never mixes its old rows into the new table."""
    rows = results[results["run_id"].astype(str).str.startswith(f"{comparison}/")]
    rows = rows.sort_values("recorded_at")
    if rows.empty:
        return rows
    budget = pd.Series(
        ["|".join(map(str, values)) for values in rows[BUDGET_COLUMNS].to_numpy()],
        index=rows.index,
    )
    current = budget.groupby(rows["run_id"]).transform("last")
    rows = rows[budget == current]
    keys = ["run_id", "task", "protocol", "metric"]
    return rows.drop_duplicates(keys, keep="last")


def headline_rows(
    results: pd.DataFrame, comparison: str, tasks: Sequence[TaskSpec]
) -> pd.DataFrame:
    """Headline rows of one comparison (newest per run and measure) in percent, with a
    ``measure`` column naming the table column they fill."""
    rows = _newest(results, comparison)
    headlines = headline_titles(tasks)
    titles = [
        headlines.get((t, p, m))
        for t, p, m in zip(rows["task"], rows["protocol"], rows["metric"], strict=True)
    ]
    rows = rows.assign(measure=titles).dropna(subset=["measure"])
    return rows.assign(value=rows["value"] * 100)


def floor_sentences(results: pd.DataFrame, comparison: str, tasks: Sequence[TaskSpec]) -> list[str]:
    """One sentence per measured floor of a task (e.g. the majority-class mIoU)."""
    rows = _newest(results, comparison)
    sentences = []
    for task in tasks:
        for floor in task.floors:
            chosen = rows[
                (rows["task"] == task.name)
                & (rows["protocol"] == floor.protocol)
                & (rows["metric"] == floor.metric)
            ]
            if len(chosen):
                sentences.append(
                    f"{floor.description} scores {chosen['value'].mean() * 100:.1f} "
                    f"({floor.metric}, %) on the same validation set: the floor the {task.name} "
                    f"column must beat."
                )
    return sentences


def build_table(
    results: pd.DataFrame,
    comparison: str,
    methods: list[str],
    seeds: list[int],
    tasks: Sequence[TaskSpec],
    references: pd.DataFrame | None = None,
    probe: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Mean ± sd per method and headline measure, cost, and the published values (marked †
    where measured under another protocol than this comparison's probe)."""
    rows = headline_rows(results, comparison, tasks)
    found = set(rows["measure"]) if len(rows) else set()
    table = pd.DataFrame(index=pd.Index(methods, name="method"))
    for measure in [title for title in headline_titles(tasks).values() if title in found]:
        stats = rows[rows["measure"] == measure].groupby("method")["value"]
        stats = stats.agg(["mean", "std", "count"])
        table[measure] = [_cell(stats.loc[m]) if m in stats.index else "missing" for m in methods]
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
    measured_tasks = _measured_tasks(rows, tasks)
    if references is not None and len(references):
        for (task, protocol, metric), title in published_titles(tasks).items():
            if task not in measured_tasks:
                continue
            ref = references[
                (references["task"] == task)
                & (references["protocol"] == protocol)
                & (references["metric"] == metric)
            ]
            other = protocol_mismatches(ref, probe or {})
            cells = {
                r["method"]: f"{r['value']:.1f}" + ("†" if index in other else "")
                for index, r in ref.iterrows()
            }
            table[title] = [cells.get(m, "") for m in methods]
    return table


def _measured_tasks(rows: pd.DataFrame, tasks: Sequence[TaskSpec]) -> set[str]:
    """Tasks with rows; with none yet, the tasks that always run."""
    if len(rows):
        return set(rows["task"])
    return {t.name for t in tasks if t.always}


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
    tasks: Sequence[TaskSpec],
    comparison: str,
    methods: list[str],
    seeds: list[int],
    out_dir: str | Path,
    scale: str,
    header: str = "",
    curves: pd.DataFrame | None = None,
    curve_metric: str = "knn_cls",
    mode: str = "identical_budget",
    probe: dict[str, Any] | None = None,
    budget: str = "epochs",
) -> Path:
    """``table2_<scale>.md`` and ``.csv`` plus the figures; returns the markdown path.
    ``budget``: the shared budget's kind (epochs, flops: equal compute, seconds)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    references = read_references()
    table = build_table(results, comparison, methods, seeds, tasks, references, probe)
    if curves is not None and "training_flops" in curves:
        spent = curves.groupby(["method", "seed"])["training_flops"].max().groupby("method").mean()
        position = table.columns.get_loc("pre-train s")
        table.insert(
            position,
            "training FLOPs",
            [f"{spent[m]:.3g}" if m in spent.index and spent[m] > 0 else "" for m in methods],
        )
    rows = headline_rows(results, comparison, tasks)
    numeric_table(table, rows, methods, tasks).to_csv(out_dir / f"table2_{scale}.csv")
    figures = (
        [figures_of.scores(rows, methods, out_dir, scale),
         figures_of.accuracy_vs_time(rows, methods, out_dir, scale)]
        if len(rows)
        else []
    )  # fmt: skip
    kinds = {"epochs": "equal epochs", "flops": "equal compute", "seconds": "equal time"}
    title = (
        f"under one budget ({kinds.get(budget, budget)})"
        if mode == "identical_budget"
        else "each at its published recipe"
    )
    lines = [f"# Table 2 ({scale}): {', '.join(methods)} {title}", ""]
    if header:
        lines += [header, ""]
    lines += [table.to_markdown(), ""]
    lines += _paired_section(
        rows,
        methods,
        list(dict.fromkeys(rows["measure"])) if len(rows) else [],
        out_dir,
        scale,
        tasks,
    )
    if RANDOM_INIT in methods:
        lines += [
            "`random_init` is the same encoder at its seeded initialisation, evaluated with no "
            "pre-training through every protocol with the same seeds: the floor each method "
            "must beat for its pre-training to count.",
            "",
        ]
    for sentence in floor_sentences(results, comparison, tasks):
        lines += [sentence, ""]
    if references is not None:
        measured_tasks = _measured_tasks(rows, tasks)
        lines += [
            "Published values are ViT-B/16 pre-trained on ImageNet-1k and are not comparable "
            "with a smaller scale; sources:",
            "",
        ]
        lines += [
            f"- {r.method} {r.task} {r.protocol} {r.metric}: {r.value} — {r.source}"
            for r in references.itertuples()
            if r.task in measured_tasks
        ]
        lines.append("")
        shown = references[references["task"].isin(measured_tasks)]
        mismatches = protocol_mismatches(shown, probe or {})
        if mismatches:
            lines += ["† Measured under another protocol than this table's, so not comparable:", ""]
            lines += [f"- {sentence}" for sentence in mismatches.values()]
            lines.append("")
    if curves is not None and len(curves):
        metric = curve_metric if curve_metric in curves else _first_knn(curves)
        figures.append(figures_of.learning_curves(curves, methods, out_dir, scale, metric))
        lines += [
            f"Learning curves: k-NN top-1 ({metric.removeprefix('knn_')} features) on the "
            "validation split during pre-training (probe.knn_every; step 0 is the encoder "
            "before training, the random-init floor), one line per seed, against epochs and "
            "against training seconds.",
            "",
        ]
        if "training_flops" in curves and curves["training_flops"].notna().any():
            figures.append(figures_of.accuracy_vs_flops(curves, methods, out_dir, scale, metric))
            lines += [
                "Accuracy against training FLOPs (log scale): the same k-NN curves against "
                "the FLOPs each run had spent (its counted FLOPs per step x steps; run.json "
                "`flops_per_step`), each ending at its run's total: the view that is the "
                "same on every machine.",
                "",
            ]
        if budget != "flops":  # under a FLOPs budget every run ends at the same compute
            lines += _equal_budget_section(curves, metric, methods, out_dir, scale, "flops")
        lines += _equal_budget_section(curves, metric, methods, out_dir, scale, "seconds")
    lines += [f"![{name}]({name})" for name in figures]
    path = out_dir / f"table2_{scale}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _paired_section(
    rows: pd.DataFrame,
    methods: list[str],
    measures: list[str],
    out_dir: Path,
    scale: str,
    tasks: Sequence[TaskSpec],
) -> list[str]:
    """Per-seed paired differences against the first method (ROPIM in the presets) and, when
    the comparison has it, the random-initialisation floor, with 95% Student-t intervals; the
    sentences claim only what the intervals support."""
    references = [*methods[:1], *[m for m in methods[1:] if m == RANDOM_INIT]]
    table, differences = paired_table(rows, methods, references, measures)
    if not differences:
        return []
    paired_rows(differences, tasks).to_csv(out_dir / f"table2_{scale}_paired.csv", index=False)
    forest = figures_of.forest(pd.DataFrame([d.numbers() for d in differences]), out_dir, scale)
    return [
        f"![paired differences]({forest})",
        "",
        f"Paired per-seed differences (points; mean [95% CI, Student t over the seeds both "
        f"have]) against {', '.join(references)}; a verdict needs the interval to exclude 0:",
        "",
        table.to_markdown(),
        "",
        *summary_sentences(differences),
        "",
    ]


def _first_knn(curves: pd.DataFrame) -> str:
    return next(c for c in curves.columns if str(c).startswith("knn_"))


# The views of the k-NN curves at one shared budget: (curve column, label, CSV column).
EQUAL_VIEWS = {
    "seconds": ("train_seconds", "Equal time", "at_seconds"),
    "flops": ("training_flops", "Equal compute", "at_training_flops"),
}


def equal_budget_rows(
    curves: pd.DataFrame, metric: str, methods: list[str], kind: str = "seconds"
) -> pd.DataFrame:
    """Each pre-trained run's k-NN at the budget every run reached (the least total training
    seconds, or training FLOPs, of any run): its last monitor point at or before it, never an
    interpolation. The random-init floor is each seed's step-0 point (the shared encoder
    before training). Columns: method, seed, measure, value (%), epoch, budget."""
    column = EQUAL_VIEWS[kind][0]
    budget = float(curves.groupby(["method", "seed"])[column].max().min())
    reached = curves[curves[column] <= budget * (1 + 1e-9) + 1e-9].sort_values(column)
    rows = reached.groupby(["method", "seed"]).tail(1)
    if RANDOM_INIT in methods:
        first = curves[curves["method"] == curves["method"].iloc[0]]
        floor = first[first["step"] == 0].assign(method=RANDOM_INIT)
        rows = pd.concat([rows, floor], ignore_index=True)
    shown = f"{budget:.0f} s" if kind == "seconds" else f"{budget:.3g} FLOPs"
    measure = f"k-NN top-1 at {shown} (%)"
    return rows.assign(measure=measure, value=rows[metric] * 100, budget=budget)[
        ["method", "seed", "measure", "value", "epoch", "budget"]
    ]


def equal_time_rows(curves: pd.DataFrame, metric: str, methods: list[str]) -> pd.DataFrame:
    """:func:`equal_budget_rows` at the shortest run's training seconds."""
    rows = equal_budget_rows(curves, metric, methods, "seconds")
    return rows.rename(columns={"budget": "seconds"})


EQUAL_VIEW_TEXT = {
    "seconds": "(machine-specific: seconds differ between machines, FLOPs do not): the same "
    "comparison after {shown} of pre-training (the shortest run's total), from the k-NN "
    "curves: each run's last monitor point at or before that time. Methods that are cheaper "
    "per epoch have seen more epochs.",
    "flops": "(from the curves; the same on every machine): each run's k-NN at {shown}, the "
    "training FLOPs the cheapest run spent in all, its last monitor point at or before them. "
    "The costlier methods are read mid-schedule there (their learning rate had not decayed "
    "yet); `train.flops_budget` gives every method that compute with its schedule run to its "
    "end (`make reproduce-table2 SCALE=smoke_compute`).",
}


def _equal_budget_section(
    curves: pd.DataFrame, metric: str, methods: list[str], out_dir: Path, scale: str, kind: str
) -> list[str]:
    """An equal-time or equal-compute view beside the equal-epoch table: what each method
    reached at the same pre-training seconds or FLOPs, with paired differences as in the main
    table."""
    column, label, csv_column = EQUAL_VIEWS[kind]
    if column not in curves or curves[column].isna().all():
        return []
    rows = equal_budget_rows(curves.dropna(subset=[column]), metric, methods, kind)
    if rows.empty:
        return []
    measure = rows["measure"].iloc[0]
    present = [m for m in methods if m in set(rows["method"])]
    summary = rows.groupby("method").agg(
        value=("value", "mean"), sd=("value", "std"), n=("value", "size"), epoch=("epoch", "mean")
    )
    table = pd.DataFrame(
        {
            measure: [
                _cell(summary.loc[m].rename({"value": "mean", "sd": "std", "n": "count"}))
                for m in present
            ],
            "pre-training epochs reached": [f"{summary.loc[m, 'epoch']:.1f}" for m in present],
        },
        index=pd.Index(present, name="method"),
    )
    name = "equal_time" if kind == "seconds" else "equal_compute"
    pd.DataFrame(
        {
            "method": present,
            "knn_top1_mean": [summary.loc[m, "value"] for m in present],
            "knn_top1_sd": [summary.loc[m, "sd"] for m in present],
            "knn_top1_n": [int(summary.loc[m, "n"]) for m in present],
            csv_column: rows["budget"].iloc[0],
            "epochs_reached": [summary.loc[m, "epoch"] for m in present],
        }
    ).to_csv(out_dir / f"table2_{scale}_{name}.csv", index=False)
    references = [*present[:1], *[m for m in present[1:] if m == RANDOM_INIT]]
    paired, differences = paired_table(rows, present, references, [measure])
    shown = measure.removeprefix("k-NN top-1 at ").removesuffix(" (%)")
    return [
        f"{label} " + EQUAL_VIEW_TEXT[kind].format(shown=shown),
        "",
        table.to_markdown(),
        "",
        paired.to_markdown(),
        "",
        *summary_sentences(differences),
        "",
    ]
