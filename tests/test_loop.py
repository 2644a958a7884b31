"""The one training loop on a toy regression: evaluation hook, loss terms, resume checks."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ropim.harness.data.views import SeededViews
from ropim.harness.errors import ConfigError, TrainingError
from ropim.harness.loop import Hooks, LoopPlan, train_loop
from ropim.harness.optim import build_scheduler
from ropim.harness.runtime import make_fabric


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)


def _views() -> SeededViews:
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return SeededViews(TensorDataset(x, y), lambda item: item, seed=0)


def _run(out_dir, fingerprint=None, scale=1.0, evaluate=None, epochs=4.0):
    fabric = make_fabric("cpu", "32-true")
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    plan = LoopPlan(
        steps=None, epochs=epochs, batch_size=8, seed=0, log_every=4, checkpoint_every=8
    )
    scheduler = build_scheduler(optimizer, 32, 0)

    def loss(net, batch, step):
        x, y = batch
        error = (net.linear(x).squeeze(-1) - y * scale).pow(2).mean()
        return error, {"half": error / 2}

    hooks = Hooks(loss=loss, evaluate=evaluate, evaluate_every=8)
    return train_loop(
        fabric,
        model,
        optimizer,
        scheduler,
        _views(),
        plan,
        hooks,
        out_dir,
        {"model": "toy"},
        fingerprint or {"lr": 0.05},
    )


def test_evaluation_hook_and_loss_terms_are_logged(tmp_path):
    calls = []

    def evaluate(model, step):
        calls.append((step, model.training))
        return {"weight_norm": float(model.linear.weight.norm())}

    result = _run(tmp_path, evaluate=evaluate)
    assert result.progress.step == result.total_steps == 32
    assert calls == [(0, False), (8, False), (16, False), (24, False), (32, False)]  # eval mode
    rows = list(csv.DictReader((tmp_path / "evaluations.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 8, 16, 24, 32]  # 0: before training
    metrics = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["step"]) for r in metrics] == list(range(4, 33, 4))
    first, last = metrics[0], metrics[-1]
    assert float(first["half"]) == pytest.approx(float(first["loss"]) / 2)
    assert float(last["loss"]) < 0.1 * float(first["loss"])


def test_resume_refuses_other_settings_and_continues_same_ones(tmp_path):
    _run(tmp_path, epochs=2.0)  # 16 steps, checkpoint at 16
    with pytest.raises(ConfigError, match=r"other settings \(lr: 0.05 -> 0.1\)"):
        _run(tmp_path, fingerprint={"lr": 0.1}, epochs=2.0)
    again = _run(tmp_path, epochs=2.0)
    assert again.progress.step == 16  # nothing left to train


def test_a_loss_that_is_no_longer_finite_stops_training_with_advice(tmp_path):
    with pytest.raises(TrainingError, match="not finite at step 1 .*last checkpoint: none yet"):
        _run(tmp_path, scale=float("nan"))
    assert not (tmp_path / "checkpoints").exists()  # nothing was written
