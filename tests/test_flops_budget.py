"""Equal compute: every pre-training counts its FLOPs per step, records them, and can train to
a budget in training FLOPs whose schedule runs to its end."""

from __future__ import annotations

import csv
import json
import math

import pytest

from ropim.harness.config import load_config
from ropim.harness.errors import ConfigError
from ropim.harness.pretrain import pretrain
from ropim.suite.compare import plan_comparison
from tests.conftest import TINY_CONFIG, SimulatedCrash, crash_after

TINY_TABLE = "configs/table2_tiny.yaml"


def _record(run_dir) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def _rows(path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _final_lr(record: dict) -> float:
    import torch

    from ropim.harness.optim import OptimSettings, pretrain_scheduler

    optim = record["optim"] | {
        "betas": tuple(record["optim"]["betas"]),
        "decay_at": tuple(record["optim"]["decay_at"]),
    }
    settings = OptimSettings(**optim)
    total, per_epoch = record["total_steps"], record["steps_per_epoch"]
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=settings.lr)
    scheduler = pretrain_scheduler(
        optimizer, settings, total, round(settings.warmup_epochs * per_epoch)
    )
    scheduler.step_update(total - 1)
    return optimizer.param_groups[0]["lr"]


def test_the_count_is_recorded_identical_across_runs_and_resume_and_logged(tmp_path):
    def cfg(name: str):
        return load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", f"run.name={name}"])

    a = _record(pretrain(cfg("a")))
    b = _record(pretrain(cfg("b")))
    with pytest.raises(SimulatedCrash):
        pretrain(cfg("c"), after_step=[crash_after(5)])
    c = _record(pretrain(cfg("c"), resume=True))
    assert a["flops_per_step"] > 0 and "FlopCounterMode" in a["flops_counted_by"]
    assert a["flops_per_step"] == b["flops_per_step"] == c["flops_per_step"]
    assert a["training_flops"] == a["steps"] * a["flops_per_step"] == c["training_flops"]
    metrics = _rows(tmp_path / "a" / "metrics.csv")
    assert [float(r["training_flops"]) for r in metrics] == [
        int(r["step"]) * a["flops_per_step"] for r in metrics
    ]


def test_a_flops_budget_gives_every_method_the_same_compute_and_a_finished_schedule(tmp_path):
    def planned(*overrides: str):
        runs = plan_comparison(TINY_TABLE, [f"run.output_dir={tmp_path}", *overrides])
        return {p.method: p.config for p in runs if p.pretrained and p.seed == 0}

    ropim_epoch = _record(pretrain(planned()["ropim"]))  # ROPIM's one epoch sets the budget
    budget = ropim_epoch["training_flops"]
    configs = planned(f"train.flops_budget={budget}", "compare.name=equal")
    records, steps = {}, {}
    for method, cfg in configs.items():
        run_dir = pretrain(cfg)
        record = records[method] = _record(run_dir)
        steps[method] = record["steps"]
        assert record["steps"] == math.floor(budget / record["flops_per_step"])
        assert budget - record["flops_per_step"] < record["training_flops"] <= budget
        assert record["budget"]["kind"] == "flops" and record["budget"]["epochs"] is None
        lrs = [float(r["lr"]) for r in _rows(run_dir / "metrics.csv")]
        assert int(_rows(run_dir / "metrics.csv")[-1]["step"]) == record["total_steps"]
        # The schedule spans exactly the budget's steps: the last step runs at the schedule's
        # final value (its lowest), as a schedule built for that many steps gives it.
        assert lrs[-1] == min(lrs)
        assert lrs[-1] == pytest.approx(_final_lr(record), rel=1e-9), method
    assert steps["mae"] > steps["ropim"] and steps["mae"] > steps["simmim"]  # cheaper steps
    assert steps["ropim"] == ropim_epoch["steps"]


def test_bad_flops_budgets_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="two budgets: set one"):
        load_config(TINY_CONFIG, ["train.flops_budget=1e12", "train.time_budget_s=10"])
    with pytest.raises(ConfigError, match=r"train.flops_budget=-1(\.0)? must be a positive"):
        load_config(TINY_CONFIG, ["train.flops_budget=-1"])
    cfg = load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", "train.flops_budget=1000"])
    with pytest.raises(ConfigError, match="buys no step: one step costs"):
        pretrain(cfg)


def test_a_comparison_refuses_methods_with_different_flops_budgets(tmp_path):
    from ropim.suite.compare import check_budget_parity

    configs = {
        name: load_config(TINY_CONFIG, [f"train.flops_budget={value}"])
        for name, value in (("a", 1e12), ("b", 2e12))
    }
    with pytest.raises(
        ConfigError, match="train.flops_budget is 1000000000000.0 vs. 2000000000000.0"
    ):
        check_budget_parity(configs)


def test_cost_prints_each_methods_training_flops_and_gpu_hours(capsys):
    from ropim.cli import main

    assert main(["cost", "--config", TINY_TABLE, "--images", "1000", "--mfu", "0.5"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("ropim", "mae", "simmim"))
    assert "GPU-hours at 50.0% model-FLOPs utilisation" in out
    assert main(["cost", "--config", TINY_TABLE, "--gpu", "TPU"]) == 2
    assert capsys.readouterr().err.startswith("error: --gpu 'TPU'")
    assert main(["cost", "--config", TINY_TABLE, "--devices", "0"]) == 2
    assert capsys.readouterr().err == (
        "error: ropim cost: argument --devices: 0 must be 1 or more (see ropim cost --help)\n"
    )
