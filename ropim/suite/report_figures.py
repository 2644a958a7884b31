"""The report's figures, in one style for a paper or a slide: each metric on its own axis, seeds
as points (never bars, whose error bars can cross the metric's range), the random-init floor
drawn the same way everywhere (a thick grey dashed line, never a seed's style), text legible at
slide width, and each figure saved as PNG and SVG."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

FLOOR = "random_init"
FLOOR_COLOR = "0.45"
FLOOR_LINE = {"color": FLOOR_COLOR, "linestyle": "--", "linewidth": 2.0}
SEED_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
PANEL_WIDTH = 3.4  # inches; four panels fit a 16:9 slide at full width
DPI = 150


def use_style() -> None:
    """One theme for every figure (called before each is drawn: seaborn's theme is global)."""
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.15)
    plt.rcParams.update({"axes.titlesize": 10, "svg.fonttype": "none"})


def palette(methods: Sequence[str]) -> dict[str, object]:
    """A fixed colour per method (colour-blind safe), the floor always grey."""
    colors = iter(sns.color_palette("colorblind", max(len(methods), 1)))
    return {m: (FLOOR_COLOR if m == FLOOR else next(colors)) for m in methods}


def save(figure: plt.Figure, out_dir: Path, name: str) -> str:
    """``<name>.png`` and ``<name>.svg``; returns the PNG's file name (the report embeds it)."""
    figure.savefig(out_dir / f"{name}.png", dpi=DPI, bbox_inches="tight")
    figure.savefig(out_dir / f"{name}.svg", bbox_inches="tight")
    plt.close(figure)
    return f"{name}.png"


def _wrap(title: str, width: int = 28) -> str:
    return "\n".join(textwrap.wrap(title, width)) or title


def _grid(panels: int, height: float, columns: int = 4) -> tuple[plt.Figure, list[plt.Axes]]:
    columns = max(1, min(columns, panels))
    rows = -(-panels // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(PANEL_WIDTH * columns, height * rows), squeeze=False
    )
    flat = list(axes.flat)
    for extra in flat[panels:]:
        extra.set_visible(False)
    return figure, flat[:panels]


def _percent_limits(ax: plt.Axes, values: pd.Series) -> None:
    """A score axis within [0, 100], padded around the values (never below 0 or above 100)."""
    low, high = float(values.min()), float(values.max())
    pad = max((high - low) * 0.15, 1.0)
    ax.set_ylim(max(0.0, low - pad), min(100.0, high + pad))


def _legend(
    figure: plt.Figure,
    methods: Sequence[str],
    colors: dict,
    seeds: Sequence,
    lines: bool = False,
    columns: int = 8,
) -> None:
    """Below the panels: a colour per method (lines, with the floor's dashed line, where the
    figure draws curves) and a marker per seed."""
    style = {"linewidth": 2} if lines else {"marker": "o", "linestyle": ""}
    handles = [plt.Line2D([], [], color=colors[m], label=m, **style) for m in methods]
    if lines:
        handles.append(plt.Line2D([], [], label="floor: step 0 (random init)", **FLOOR_LINE))
    handles += [
        plt.Line2D([], [], color="0.2", marker=SEED_MARKERS[i % len(SEED_MARKERS)],
                   linestyle="", label=f"seed {s}")
        for i, s in enumerate(seeds)
    ]  # fmt: skip
    figure.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                  ncol=min(len(handles), columns), frameon=False)  # fmt: skip


def scores(rows: pd.DataFrame, methods: Sequence[str], out_dir: Path, scale: str) -> str:
    """One panel per measure, its own axis: each seed a point, the mean ± sd a line through
    them (an sd cannot leave the metric's range as a bar's whisker can)."""
    use_style()
    colors = palette(methods)
    measures = list(dict.fromkeys(rows["measure"]))
    seeds = sorted(rows["seed"].dropna().unique())
    figure, axes = _grid(len(measures), 3.0)
    present = [m for m in methods if m in set(rows["method"])]
    for ax, measure in zip(axes, measures, strict=True):
        part = rows[rows["measure"] == measure]
        spread: list[float] = []
        for x, method in enumerate(present):
            values = part[part["method"] == method]
            for i, seed in enumerate(seeds):
                chosen = values[values["seed"] == seed]["value"]
                ax.scatter(
                    [x + (i - (len(seeds) - 1) / 2) * 0.12] * len(chosen),
                    chosen,
                    color=colors[method],
                    marker=SEED_MARKERS[i % len(SEED_MARKERS)],
                    s=22,
                    alpha=0.8,
                    zorder=3,
                )
            if len(values):
                mean, sd = values["value"].mean(), values["value"].std()
                sd = 0.0 if pd.isna(sd) else sd
                # clipped to the metric's range: a score's spread never reaches below 0 or 100
                below, above = min(sd, mean), min(sd, 100.0 - mean)
                ax.errorbar(
                    x, mean, yerr=[[below], [above]], color="black", capsize=4, marker="_",
                    markersize=16, linewidth=1.2, zorder=4,
                )  # fmt: skip
                spread.extend([mean - below, mean + above])
        ax.set_xticks(range(len(present)), present, rotation=30, ha="right")
        ax.set_title(_wrap(measure))
        ax.set_ylabel("%" if ax is axes[0] else "")
        _percent_limits(ax, pd.concat([part["value"], pd.Series(spread, dtype=float)]))
    figure.suptitle("Scores per seed (points) and mean ± sd (black)", y=1.02)
    _legend(figure, [], colors, seeds)
    figure.tight_layout()
    return save(figure, out_dir, f"table2_{scale}_scores")


def accuracy_vs_time(rows: pd.DataFrame, methods: Sequence[str], out_dir: Path, scale: str) -> str:
    """Each run's score against its pre-training seconds, one panel (own axis) per measure."""
    use_style()
    colors = palette(methods)
    measures = list(dict.fromkeys(rows["measure"]))
    seeds = sorted(rows["seed"].dropna().unique())
    figure, axes = _grid(len(measures), 3.0)
    for ax, measure in zip(axes, measures, strict=True):
        part = rows[rows["measure"] == measure]
        for method in [m for m in methods if m in set(part["method"])]:
            values = part[part["method"] == method]
            for i, seed in enumerate(seeds):
                chosen = values[values["seed"] == seed]
                ax.scatter(
                    chosen["pretrain_seconds"],
                    chosen["value"],
                    color=colors[method],
                    marker=SEED_MARKERS[i % len(SEED_MARKERS)],
                    s=28,
                    alpha=0.85,
                )
        ax.set_title(_wrap(measure))
        ax.set_xlabel("pre-training time (s)")
        ax.set_ylabel("%" if ax is axes[0] else "")
        _percent_limits(ax, part["value"])
    figure.suptitle("Score against pre-training time (machine-specific)", y=1.02)
    present = [m for m in methods if m in set(rows["method"])]
    _legend(figure, present, colors, seeds)
    figure.tight_layout()
    return save(figure, out_dir, f"table2_{scale}_accuracy_vs_time")


def forest(frame: pd.DataFrame, out_dir: Path, scale: str) -> str:
    """Each paired difference with its 95% interval, one panel per measure (two columns, so it
    stays readable at slide width), a line at zero; green/red where the interval excludes 0."""
    use_style()
    measures = list(dict.fromkeys(frame["measure"]))
    pairs = list(dict.fromkeys(frame["difference"]))
    figure, axes = _grid(len(measures), 0.42 * len(pairs) + 1.3, columns=2)
    figure.set_size_inches(5.2 * min(2, len(measures)), figure.get_size_inches()[1])
    for ax, measure in zip(axes, measures, strict=True):
        part = frame[frame["measure"] == measure].set_index("difference").reindex(pairs)
        for row, (_, d) in enumerate(part.iterrows()):
            if pd.isna(d["mean"]):
                continue
            color = {"better": "tab:green", "worse": "tab:red"}.get(d["verdict"], "0.35")
            if pd.notna(d["low"]) and d["high"] > d["low"]:
                ax.plot([d["low"], d["high"]], [row, row], color=color, linewidth=2.2)
            ax.plot(d["mean"], row, "o", color=color, markersize=6)
        ax.axvline(0, color="black", linewidth=0.9)
        ax.set_yticks(range(len(pairs)), pairs)
        ax.set_ylim(len(pairs) - 0.5, -0.5)
        ax.set_title(_wrap(measure, 40))
        ax.set_xlabel("difference (points), 95% CI")
    figure.suptitle("Paired differences over seeds (green/red: the interval excludes 0)", y=1.02)
    figure.tight_layout()
    return save(figure, out_dir, f"table2_{scale}_forest")


def _curves_panel(
    ax: plt.Axes, curves: pd.DataFrame, x: str, metric: str, methods: Sequence[str], colors: dict
) -> None:
    """One line per run (colour: method, marker: seed) and the floor (the encoder at step 0)."""
    floor = curves[curves["step"] == 0][metric].mean() * 100
    curves = curves[curves[x] > 0] if x == "training_flops" else curves  # log axis: no zero
    seeds = sorted(curves["seed"].unique())
    for method in [m for m in methods if m in set(curves["method"])]:
        for i, seed in enumerate(seeds):
            run = curves[(curves["method"] == method) & (curves["seed"] == seed)].sort_values(x)
            ax.plot(
                run[x],
                run[metric] * 100,
                color=colors[method],
                linewidth=1.3,
                alpha=0.9,
                marker=SEED_MARKERS[i % len(SEED_MARKERS)],
                markersize=4,
            )
    ax.axhline(floor, **FLOOR_LINE)


def _curves_figure(
    curves: pd.DataFrame,
    methods: Sequence[str],
    metric: str,
    axes_of: Sequence[tuple[str, str]],
    title: str,
    size: tuple[float, float],
) -> plt.Figure:
    """One panel of k-NN curves per (curve column, axis label), the floor and a legend."""
    use_style()
    colors = palette(methods)
    figure, axes = _grid(len(axes_of), size[1], columns=len(axes_of))
    figure.set_size_inches(*size)
    for ax, (x, label) in zip(axes, axes_of, strict=True):
        _curves_panel(ax, curves, x, metric, methods, colors)
        if x == "training_flops":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        _percent_limits(ax, curves[metric] * 100)
    axes[0].set_ylabel(f"k-NN top-1 (%, {metric.removeprefix('knn_')} features)")
    figure.suptitle(title, y=1.02)
    present = [m for m in methods if m in set(curves["method"])]
    _legend(figure, present, colors, sorted(curves["seed"].unique()), lines=True, columns=4)
    figure.tight_layout()
    return figure


def learning_curves(
    curves: pd.DataFrame, methods: Sequence[str], out_dir: Path, scale: str, metric: str
) -> str:
    """k-NN during pre-training against epochs and against seconds (two panels)."""
    axes_of = [("epoch", "pre-training epochs"), ("train_seconds", "pre-training seconds")]
    title = "k-NN on the validation split during pre-training"
    figure = _curves_figure(curves, methods, metric, axes_of, title, (2 * PANEL_WIDTH, 3.2))
    return save(figure, out_dir, f"table2_{scale}_learning_curves")


def accuracy_vs_flops(
    curves: pd.DataFrame, methods: Sequence[str], out_dir: Path, scale: str, metric: str
) -> str:
    """The same curves against training FLOPs spent (log x), each ending at its run's total."""
    axes_of = [("training_flops", "training FLOPs spent (counted, all devices)")]
    title = "k-NN against pre-training compute"
    figure = _curves_figure(curves, methods, metric, axes_of, title, (6.4, 3.6))
    return save(figure, out_dir, f"table2_{scale}_accuracy_vs_flops")
