"""Whole pre-training runs on the tiny preset: artefacts, resume after a crash, torchrun."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ropim.harness.checkpoint import load_weights
from ropim.harness.config import load_config
from ropim.harness.errors import CheckpointError, ConfigError
from ropim.harness.pretrain import pretrain
from ropim.harness.registry import build_method
from ropim.harness.runtime import build_encoder
from tests.conftest import PROJECT_ROOT, TINY_CONFIG, SimulatedCrash, crash_after, tiny_backbone


def _cli(out: Path, name: str, *extra: str, env: dict | None = None, launcher=None):
    launcher = launcher or [sys.executable, "-m", "ropim"]
    cmd = [
        *launcher,
        "pretrain",
        "--config",
        str(TINY_CONFIG),
        f"run.output_dir={out}",
        f"run.name={name}",
        *extra,
    ]
    return subprocess.run(
        cmd,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})},
    )


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def test_tiny_run_writes_every_artefact(tmp_path, capsys):
    cfg = load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", "train.epochs=2"])
    run_dir = pretrain(cfg)
    printed = capsys.readouterr().out  # the resolved recipe, before the first step
    assert "ropim: lr 6.25e-05 = base_lr 0.001 x total batch 32 (1 device(s)) / 512" in printed
    assert "clip 5; 2 epochs = 16 steps" in printed
    assert (run_dir / "config.yaml").is_file()
    assert load_config(run_dir / "config.yaml") == cfg

    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(2, 17, 2))
    assert all(float(r["images_per_s"]) > 0 and float(r["lr"]) > 0 for r in rows)
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])

    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished" and record["steps"] == 16
    assert record["seed"] == 0 and record["world_size"] == 1
    assert record["method"] == {"name": "ropim", "ratio": 0.25, "scaling": "exact"}
    assert record["optim"]["lr"] == pytest.approx(1e-3 * 32 / 512)
    assert record["images_per_s"] > 0 and record["wall_time_s"] > 0
    assert set(record["libraries"]) >= {"torch", "timm", "lightning_fabric"}
    assert "git_commit" in record["code"] and "cpu_count" in record["hardware"]

    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [c.name for c in checkpoints] == ["step_00000015", "step_00000016"]  # keep 2
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000016"
    state = torch.load(checkpoints[-1] / "state.pt", weights_only=True)
    assert state["step"] == 16 and "optimizer" in state and "scheduler" in state

    fresh = build_method(cfg.method, build_encoder(cfg))
    metadata = load_weights(fresh, checkpoints[-1] / "model.safetensors")
    assert metadata["step"] == "16" and metadata["method"] == "ropim"
    with Image.open(run_dir / "reconstructions.png") as image:
        assert image.size[0] > 100 and image.size[1] > 100
        rgb = np.asarray(image.convert("RGB")).astype(int)
    # The digits are grey, and so is every row drawn of them (the reconstruction included).
    assert (
        np.abs(rgb[..., 0] - rgb[..., 1]).max() <= 1
        and np.abs(rgb[..., 1] - rgb[..., 2]).max() <= 1
    )


def test_checkpoint_from_another_architecture_is_refused(tmp_path):
    cfg = load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", "train.epochs=0.2"])
    run_dir = pretrain(cfg)
    other = build_method({"name": "ropim"}, tiny_backbone(depth=3))
    with pytest.raises(CheckpointError, match="another architecture .*depth: checkpoint '2'"):
        load_weights(other, run_dir / "checkpoints" / "step_00000002" / "model.safetensors")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"garbage")
        load_weights(other, bad)
    with pytest.raises(ConfigError, match="already holds checkpoints; pass --resume"):
        pretrain(cfg)
    changed = load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", "train.epochs=0.5"])
    with pytest.raises(ConfigError, match="other settings .*train.epochs: 0.2 -> 0.5"):
        pretrain(changed, resume=True)


def test_killed_and_resumed_run_matches_uninterrupted_run(tmp_path, capsys):
    def config(name: str):
        return load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", f"run.name={name}"])

    pretrain(config("straight"))
    with pytest.raises(SimulatedCrash):
        pretrain(config("crashed"), after_step=[crash_after(5)])
    assert (tmp_path / "crashed/checkpoints/latest").read_text() == "step_00000003"
    capsys.readouterr()
    pretrain(config("crashed"), resume=True)
    assert "resuming from step 3" in capsys.readouterr().out

    a, b = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "crashed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [int(r["step"]) for r in csv.DictReader((tmp_path / "crashed/metrics.csv").open())]
    assert steps == sorted(set(steps)) and steps[-1] == 8
    record = json.loads((tmp_path / "crashed/run.json").read_text())
    assert record["status"] == "finished" and record["steps"] == 8


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    from ropim.cli import main

    def run(*extra: str) -> str:
        args = ["pretrain", "--config", str(TINY_CONFIG), f"run.output_dir={tmp_path}", *extra]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    assert "model.img_size=30 is not divisible by model.patch_size=7" in run("model.img_size=30")
    missing = run("data.dataset=imagefolder", f"data.root={tmp_path}/none")
    assert "dataset folder not found" in missing
    assert "unknown method name 'nosuch'" in run("method.name=nosuch")


def test_knn_monitor_writes_a_learning_curve_and_leaves_the_weights_alone(tmp_path):
    plain = pretrain(load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", "run.name=a"]))
    overrides = [f"run.output_dir={tmp_path}", "run.name=b", "probe.knn_every=0.5", "probe.knn_k=5"]
    monitored = pretrain(load_config(TINY_CONFIG, overrides))
    rows = list(csv.DictReader((monitored / "evaluations.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 4, 8]  # step 0: the encoder before training
    assert float(rows[0]["train_seconds"]) == 0.0
    assert all(0.0 <= float(r["knn_avg"]) <= 1.0 for r in rows)
    assert all(float(r["train_seconds"]) > 0 for r in rows[1:])
    a, b = _final_weights(plain), _final_weights(monitored)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_encoder_run_is_written_by_rank_zero_and_awaited_by_the_others(tmp_path, monkeypatch):
    """Under torchrun every rank plans the random-init floor; rank 0 alone writes it (two ranks
    writing one run.json raced), the others wait for its record."""
    from ropim.harness import encoder_run
    from ropim.harness.errors import TrainingError

    cfg = load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", "run.name=floor"])
    monkeypatch.setattr(encoder_run, "WAIT_S", 0.5)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(TrainingError, match="rank 0 should have written it"):
        encoder_run.write_encoder_run(cfg, build_encoder(cfg), {})
    assert not (tmp_path / "floor" / "checkpoints").exists()  # rank 1 wrote nothing
    monkeypatch.setenv("RANK", "0")
    run_dir = encoder_run.write_encoder_run(cfg, build_encoder(cfg), {})
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert [p.name for p in run_dir.iterdir() if p.suffix == ".tmp"] == []
    monkeypatch.setenv("RANK", "1")
    assert encoder_run.write_encoder_run(cfg, build_encoder(cfg), {}) == run_dir
