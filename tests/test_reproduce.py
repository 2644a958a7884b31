"""The tiny Table 2 preset end to end (one process and two under torchrun), and reports that
survive missing methods and seeds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from downstream.encoder import load_pretrained_encoder
from downstream.tasks import all_tasks
from ropim.harness.runtime import build_encoder, weights_digest
from ropim.suite.report import build_table
from ropim.suite.reproduce import make_report, reproduce
from ropim.suite.results import read_results
from tests.conftest import PROJECT_ROOT, evaluate

TINY = PROJECT_ROOT / "configs" / "table2_tiny.yaml"


def test_tiny_preset_under_torchrun_matches_one_process_where_it_should(tmp_path):
    """Two CPU processes (gloo), all three tasks. Equal to one process: the random-init floor's
    encoder, and every frozen-encoder protocol (k-NN, linear probe) of any checkpoint, whose
    evaluation must not depend on the world size. Not equal, by design: pre-training and the
    fine-tunes, because each rank draws its own sketches, masks, drop path and mixup (seeded per
    rank) and BatchNorm statistics stay per process on CPU (SyncBN needs GPUs)."""
    runs, results = tmp_path / "runs", tmp_path / "results.csv"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "ropim", "reproduce", "--config", str(TINY), f"run.output_dir={runs}",
        "compare.seeds=[0]", "compare.methods={ropim: {method: {ratio: 0.25}}}",
        "--results", str(results), "--reports", str(tmp_path / "reports"),
    ]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_results(results)
    assert set(rows["task"]) == {"classification", "segmentation", "detection"}
    assert set(rows["method"]) == {"ropim", "random_init"}
    record = json.loads((runs / "table2_tiny" / "ropim_seed0" / "run.json").read_text())
    assert record["world_size"] == 2 and record["optim"]["total_batch"] == 64
    digests = record["weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # DDP kept the ranks in step

    floor = runs / "table2_tiny" / "random_init_seed0"
    encoder, cfg = load_pretrained_encoder(floor)
    assert weights_digest(encoder) == weights_digest(build_encoder(cfg))
    raw = yaml.safe_load(TINY.read_text())["classification"] | {"protocols": ["knn", "linear"]}
    for run in ("ropim_seed0", "random_init_seed0"):
        alone = evaluate("classification", runs / "table2_tiny" / run, raw, tmp_path / "one.csv")
        method = "ropim" if run.startswith("ropim") else "random_init"
        ddp = rows[(rows["method"] == method) & (rows["task"] == "classification")]
        for row in alone:
            if row["metric"] == "top1":
                (value,) = ddp[(ddp["protocol"] == row["protocol"]) & (ddp["metric"] == "top1")][
                    "value"
                ]
                assert value == row["value"], (run, row["protocol"], value, row["value"])


def test_tiny_preset_pretrains_evaluates_and_reports(tmp_path):
    results = tmp_path / "results" / "results.csv"
    reports = tmp_path / "reports"
    path = reproduce(TINY, [f"run.output_dir={tmp_path}/runs"], results, reports)
    rows = read_results(results)
    top1 = rows[rows["metric"] == "top1"]
    assert len(top1) == 4 * 2 * 3  # (methods + random init) x seeds x protocols
    assert set(top1["method"]) == {"ropim", "mae", "simmim", "random_init"}
    floor = read_results(results)
    floor = floor[(floor["method"] == "random_init") & (floor["task"] == "classification")]
    assert (floor["epochs_completed"] == 0).all() and (floor["pretrain_seconds"] == 0).all()
    assert set(top1["run_id"].str.split("/").str[0]) == {"table2_tiny"}
    miou = rows[rows["metric"] == "mIoU"]
    assert len(miou) == 4 * 2 and set(miou["task"]) == {"segmentation"}
    assert miou["value"].between(0, 1).all()
    ap = rows[rows["metric"].isin(["box_AP", "mask_AP"])]
    assert len(ap) == 4 * 2 * 2 and set(ap["task"]) == {"detection"}
    text = path.read_text()
    assert path.name == "table2_tiny.md" and "± " in text and "(n=2)" in text
    assert "Paired per-seed differences" in text and "mae − ropim" in text
    assert "random_init − ropim" in text and "mae − random_init" in text
    assert "ropim − random_init" not in text and "the floor each method must beat" in text
    assert "Learning curves" in text
    assert "table2_tiny/<method>_seed<s>/run.json` (`recipe`, `optim`)" in text
    figures = ["table2_tiny_accuracy_vs_time.png", "table2_tiny_scores.png"]
    figures += ["table2_tiny_learning_curves.png", "table2_tiny_paired.csv"]
    figures += ["table2_tiny_forest.png", "table2_tiny_accuracy_vs_flops.png"]
    assert "under one budget (equal epochs)" in text and "**Equal epochs**" in text
    assert "Accuracy against training FLOPs" in text and "Equal time (machine-specific" in text
    assert "Equal compute (from the curves; the same on every machine)" in text
    compute = pd.read_csv(reports / "table2_tiny_equal_compute.csv")
    assert compute["at_training_flops"].nunique() == 1 and compute["at_training_flops"][0] > 0
    finetune = json.loads(
        (tmp_path / "runs" / "table2_tiny" / "ropim_seed0" / "classification.json").read_text()
    )["finetune"]
    assert finetune["flops_per_step"] > 0
    assert finetune["training_flops"] == finetune["flops_per_step"] * finetune["steps"]
    for name in ("table2_tiny.csv", *figures):
        assert (reports / name).stat().st_size > 0
        if name.endswith(".png"):  # each figure also as SVG, for a paper
            assert (reports / name.replace(".png", ".svg")).stat().st_size > 0
    table = pd.read_csv(reports / "table2_tiny.csv", index_col="method")
    for csv in reports.glob("*.csv"):  # headers a program can use: identifiers, ASCII
        header = csv.read_text().splitlines()[0].split(",")
        assert all(re.fullmatch(r"[a-z][a-z0-9_]*", h) for h in header), (csv.name, header)
    assert list(table.index) == ["ropim", "mae", "simmim", "random_init"]
    assert table.loc["mae", "training_flops"] < table.loc["ropim", "training_flops"]
    assert table.loc["mae", "published_finetune_top1_best"] == 83.6
    assert pd.isna(table.loc["ropim", "published_finetune_top1_best"])  # no source
    assert table.loc["ropim", "upernet_miou_n"] == 2
    assert table.loc["mae", "published_upernet_miou"] == 48.1
    assert table.loc["simmim", "vitdet_mask_rcnn_mask_ap_n"] == 2
    assert table.loc["mae", "published_vitdet_mask_rcnn_box_ap"] == 51.6
    assert "floor the segmentation column must beat" in text
    # Numbers (the markdown has the display strings); two seeds give no verdict.
    assert table.loc["ropim", "knn_top1_n"] == 2
    assert table.loc["ropim", "knn_top1_mean"] == pytest.approx(
        100 * top1[(top1["method"] == "ropim") & (top1["protocol"] == "knn")]["value"].mean()
    )
    paired = pd.read_csv(reports / "table2_tiny_paired.csv")
    assert list(paired.columns) == [
        "method", "reference", "measure", "mean", "low", "high", "n", "verdict",
    ]  # fmt: skip
    assert set(paired["measure"]) >= {"knn_top1", "linear_top1", "upernet_miou"}
    assert not paired["verdict"].isin(["better", "worse"]).any()  # n=2 is not enough
    # A second run trains and evaluates nothing again: the rows stay as they are.
    reproduce(TINY, [f"run.output_dir={tmp_path}/runs"], results, reports)
    assert len(read_results(results)) == len(rows)
    _records_equal_the_recipe_card(
        tmp_path / "runs" / "table2_tiny", [f"run.output_dir={tmp_path}/runs"]
    )

    # Drop one method entirely and one seed of another: the report shows them as missing.
    partial = rows[
        (rows["method"] != "simmim") & ~((rows["method"] == "mae") & (rows["seed"] == 1))
    ]
    partial.to_csv(results, index=False)
    make_report(TINY, [], results, reports)
    table = pd.read_csv(reports / "table2_tiny.csv", index_col="method")
    assert pd.isna(table.loc["simmim", "knn_top1_n"]) and table.loc["simmim", "seeds_done"] == 0
    assert table.loc["mae", "seeds_done"] == 1 and table.loc["mae", "seeds_planned"] == 2
    assert table.loc["mae", "knn_top1_n"] == 1
    assert "| simmim      | missing" in (reports / "table2_tiny.md").read_text()


def _flat(mapping: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and key != "kwargs":
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def _records_equal_the_recipe_card(runs, overrides):
    """Every value each run recorded (run.json, config.yaml and each task's json) equals what
    ``ropim recipes`` resolves for the same preset."""
    from ropim.suite.recipes import card_text, recipe_card

    card = recipe_card(config=TINY, overrides=overrides)
    checked = 0
    for method in ("ropim", "mae", "simmim"):
        run = runs / f"{method}_seed0"
        record = json.loads((run / "run.json").read_text())
        mine = card[card["method"] == method].set_index(["protocol", "key"])["value"]
        recorded = {("pretrain", k): v["value"] for k, v in record["resolved"].items()}
        # The same values from the records that do not go through the card's resolver.
        recorded |= {("pretrain", f"optim.{k}"): v for k, v in record["optim"].items()}
        recorded |= {("pretrain", f"method.{k}"): v for k, v in record["method"].items()}
        saved = yaml.safe_load((run / "config.yaml").read_text())
        for section in ("model", "data", "train"):
            recorded |= {
                ("pretrain", f"{section}.{k}"): v
                for k, v in saved[section].items()
                if ("pretrain", f"{section}.{k}") in mine.index
            }
        recorded[("pretrain", "train.precision")] = record["precision"]  # auto, resolved
        recorded[("pretrain", "train.devices")] = record["world_size"]
        classification = json.loads((run / "classification.json").read_text())["settings"]
        for protocol in ("knn", "linear", "finetune"):
            recorded |= {(protocol, k): v for k, v in classification[protocol].items()}
            if protocol != "finetune":
                recorded[(protocol, "feature")] = classification["feature"]
        for task in ("segmentation", "detection"):
            settings = json.loads((run / f"{task}.json").read_text())["settings"]
            recorded |= {(task, k): v for k, v in _flat(settings).items()}
        settings_rows = mine[~mine.index.get_level_values("key").str.startswith("reference.")]
        missing = sorted(set(settings_rows.index) - set(recorded))
        assert not missing, f"{method}: the card lists values no record holds: {missing}"
        wrong = {
            key: (value, card_text(recorded[key]))
            for key, value in settings_rows.items()
            if card_text(recorded[key]) != value
        }
        assert not wrong, f"{method}: card vs. record: {wrong}"
        checked += len(settings_rows)
    assert checked > 300


def test_report_from_no_results_at_all_does_not_crash():
    results = read_results("/nonexistent/results.csv")
    table = build_table(results, "x", ["ropim", "mae"], [0], all_tasks())
    assert list(table.index) == ["ropim", "mae"]
    assert (table["pre-train s"] == "missing").all()


def test_a_users_results_never_go_to_a_tracked_file():
    """Every command's default results file is ignored by git and not tracked, so a run leaves
    the checkout clean; the committed reference rows live in a file no default points at."""
    import argparse

    from ropim.cli import _parser

    (commands,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    defaults = {
        action.default
        for command in commands.choices.values()
        for action in command._actions
        if action.dest == "results"
    }
    assert defaults == {"results/results.csv"}
    tracked = subprocess.run(
        ["git", "ls-files", "results"], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    assert "results/results.csv" not in tracked.stdout.split()
    assert "results/reference.csv" in tracked.stdout.split()
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/results.csv"], cwd=PROJECT_ROOT)
    assert ignored.returncode == 0
