"""Trackers: TensorBoard event files hold what metrics.csv and evaluations.csv hold (and each
evaluation score), a resume hides the events past its checkpoint, ``log.tensorboard: false``
writes none, and the W&B adapter logs offline."""

from __future__ import annotations

import sys
import types

import pandas as pd
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ropim.cli import main
from ropim.harness.config import LogSection, load_config
from ropim.harness.errors import ConfigError
from ropim.harness.pretrain import pretrain
from ropim.harness.tracking import Tracker
from tests.conftest import TINY_CONFIG, SimulatedCrash, crash_after, evaluate


def _scalars(folder) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def _cfg(out, *extra: str):
    settings = [f"run.output_dir={out}", "train.reconstruction_images=0", "probe.knn_every=0.5"]
    return load_config(TINY_CONFIG, [*settings, *extra])


def test_event_files_mirror_the_csvs_and_the_scores(tmp_path):
    run_dir = pretrain(_cfg(tmp_path))
    scalars = _scalars(run_dir / "tensorboard")
    metrics = pd.read_csv(run_dir / "metrics.csv")
    for column in ("loss", "lr", "images_per_s"):
        logged = scalars[f"train/{column}"]
        assert sorted(logged) == list(metrics["step"])
        assert logged == pytest.approx(dict(zip(metrics["step"], metrics[column], strict=True)))
    curve = pd.read_csv(run_dir / "evaluations.csv")
    knn = [c for c in curve.columns if c.startswith("knn")]
    assert knn and sorted(scalars[f"eval/{knn[0]}"]) == list(curve["step"])

    raw = {"protocols": ["knn"], "knn": {"k": 5}}
    (row,) = [r for r in evaluate("classification", run_dir, raw, tmp_path / "r.csv")
              if r["metric"] == "top1"]  # fmt: skip
    scores = _scalars(run_dir / "tensorboard")["results/classification/knn/top1"]
    assert list(scores.values()) == pytest.approx([row["value"]])


def test_a_resume_hides_events_past_the_checkpoint_and_false_turns_it_off(tmp_path):
    cfg = _cfg(tmp_path / "a")
    with pytest.raises(SimulatedCrash):
        pretrain(cfg, after_step=[crash_after(5)])  # logged step 4, checkpointed step 3
    run_dir = pretrain(_cfg(tmp_path / "a"), resume=True)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]  # every event, repeats included
    assert steps == list(pd.read_csv(run_dir / "metrics.csv")["step"])  # step 4 once

    off = pretrain(_cfg(tmp_path / "b", "log.tensorboard=false"))
    assert not (off / "tensorboard").exists() and (off / "metrics.csv").is_file()


def test_long_work_prints_progress_lines(tmp_path, capsys, monkeypatch):
    """Feature extraction, k-NN, every linear-probe epoch and check-data each print a line with
    a count and an ETA (here after every item: ROPIM_PROGRESS_EVERY_S=0)."""
    monkeypatch.setenv("ROPIM_PROGRESS_EVERY_S", "0")
    run_dir = pretrain(_cfg(tmp_path, "probe.knn_every=0"))
    capsys.readouterr()
    linear = {"epochs": 3, "batch_size": 64, "optimizer": "sgd"}
    raw = {"protocols": ["knn", "linear"], "linear": linear}
    evaluate("classification", run_dir, raw, tmp_path / "r.csv")
    out = capsys.readouterr().out
    for line in ("features (train): 1/", "features (val): 1/", "k-NN: 1/1 chunks (100%)"):
        assert line in out, out
    probe = [x for x in out.splitlines() if x.startswith("linear probe: ")]
    assert [x.split()[2] for x in probe] == ["1/3", "2/3", "3/3"] and "ETA" in probe[0]
    assert " epochs (" in probe[0] and "epoches" not in out
    assert all("| loss " in x for x in probe)

    folder = tmp_path / "images" / "train" / "a"
    folder.mkdir(parents=True)
    for index in range(3):
        Image.new("RGB", (8, 8)).save(folder / f"{index}.png")
    main(["check-data", "--config", str(TINY_CONFIG), "data.dataset=imagefolder",
          f"data.root={tmp_path / 'images'}", "--workers", "1"])  # fmt: skip
    assert "images/train: 3/3 images (100%)" in capsys.readouterr().out


def test_wandb_logs_offline_by_default_and_is_named_when_missing(tmp_path, monkeypatch):
    calls: dict = {"log": []}

    class FakeRun:
        def log(self, metrics, step=None):
            calls["log"].append((step, metrics))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    settings = LogSection(tensorboard=False, wandb=True)
    tracker = Tracker(tmp_path, settings, "ropim pre-train")
    tracker.log("train", {"step": 3, "loss": 0.5, "note": "text"}, 3)
    tracker.close()
    assert calls["init"]["mode"] == "offline" and calls["init"]["project"] == "ropim-bench"
    assert calls["log"] == [(3, {"train/loss": 0.5})] and calls["finished"]
    again = Tracker(tmp_path, settings, "ropim pre-train", resume_from=3)
    assert calls["init"]["id"] == (tmp_path / "wandb_id.txt").read_text()  # one run per folder
    again.log("train", {"loss": 0.4}, 3)  # already logged before the crash: not sent again
    again.log("train", {"loss": 0.3}, 4)
    assert calls["log"][-1] == (4, {"train/loss": 0.3}) and len(calls["log"]) == 2

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match=r"log.wandb=true needs .*\[wandb\]"):
        Tracker(tmp_path, settings, "x")
