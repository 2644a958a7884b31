"""Nothing silently wrong: divergence stops before anything is written and a lower learning
rate resumes it; damaged results, lost checkpoint pointers, moved run folders and interrupted
evaluations are handled, each said in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ropim.cli import main
from ropim.harness.checkpoint import CheckpointDir
from ropim.harness.config import load_config
from ropim.harness.errors import CheckpointError, ConfigError, TrainingError
from ropim.harness.pretrain import pretrain
from ropim.suite.results import RESULT_COLUMNS, append_results, read_results
from tests.conftest import PROJECT_ROOT, TINY_CONFIG, SimulatedCrash, crash_after


def _cfg(out, *extra: str):
    return load_config(
        TINY_CONFIG, [f"run.output_dir={out}", "train.reconstruction_images=0", *extra]
    )


def test_a_diverged_run_writes_nothing_and_resumes_with_a_lower_learning_rate(tmp_path):
    """ROPIM clips at 5: the non-finite gradient is caught before clipping could raise."""
    with pytest.raises(SimulatedCrash):
        pretrain(_cfg(tmp_path), after_step=[crash_after(3)])  # checkpoint at step 3
    pattern = r"not finite at step \d+ .*step_00000003, finite.*resume with a lower learning"
    with pytest.raises(TrainingError, match=pattern):
        pretrain(_cfg(tmp_path, "train.base_lr=1e12"), resume=True)
    latest = CheckpointDir(tmp_path / "ropim_tiny").latest()
    assert latest.name == "step_00000003"
    weights = load_file(str(latest / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    run_dir = pretrain(_cfg(tmp_path, "train.base_lr=5e-4"), resume=True)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished" and record["steps"] == 8
    (change,) = record["resume_changes"]
    assert change == {"from_step": 3, "changes": ["train.base_lr: 0.001 -> 0.0005"]}
    with pytest.raises(ConfigError, match="other settings .*train.epochs.*a resume may change"):
        pretrain(_cfg(tmp_path, "train.epochs=2"), resume=True)


def test_a_lost_latest_pointer_resumes_from_the_newest_checkpoint(tmp_path, capsys):
    with pytest.raises(SimulatedCrash):
        pretrain(_cfg(tmp_path), after_step=[crash_after(7)])  # checkpoints 3 and 6
    folder = tmp_path / "ropim_tiny" / "checkpoints"
    (folder / "latest").unlink()
    with pytest.raises(ConfigError, match="already holds checkpoints; pass --resume"):
        pretrain(_cfg(tmp_path))  # never silently from step 0 over existing checkpoints
    assert "latest is lost; using step_00000006" in capsys.readouterr().err
    pretrain(_cfg(tmp_path), resume=True)
    names = sorted(p.name for p in folder.glob("step_*"))
    assert names == ["step_00000006", "step_00000008"]  # pruned by step, the newest kept
    assert (folder / "latest").read_text() == "step_00000008"


def test_pruning_keeps_the_highest_steps_by_number_and_never_the_newest(tmp_path):
    checkpoints = CheckpointDir(tmp_path, keep=2)
    for step in (9, 100, 12):
        (checkpoints.root / f"step_{step:08d}").mkdir(parents=True)
    newest = checkpoints.root / f"step_{12:08d}"
    checkpoints._prune(newest)
    assert sorted(p.name for p in checkpoints.root.iterdir()) == [
        "step_00000012",
        "step_00000100",
    ]


def test_a_moved_run_folder_resumes_and_step_zero_evaluations_are_not_repeated(tmp_path):
    cfg = _cfg(tmp_path / "a", "probe.knn_every=0.5", "probe.knn_train_images=64")
    with pytest.raises(SimulatedCrash):
        pretrain(cfg, after_step=[crash_after(2)])  # before the first checkpoint (step 3)
    with pytest.raises(SimulatedCrash):
        pretrain(cfg, resume=True, after_step=[crash_after(4)])
    shutil.move(tmp_path / "a", tmp_path / "b")
    run_dir = pretrain(
        _cfg(tmp_path / "b", "probe.knn_every=0.5", "probe.knn_train_images=64"), resume=True
    )
    steps = [line.split(",")[0] for line in (run_dir / "evaluations.csv").read_text().split()]
    assert steps == ["step", "0", "4", "8"]  # one step-0 row, however often it restarted


def _row(**changes) -> dict:
    row = dict.fromkeys(RESULT_COLUMNS, "x") | {
        "budget_epochs": 1,
        "budget_seconds": "",
        "epochs_completed": 1,
        "pretrain_seconds": 2,
        "pretrain_images_per_s": 3,
        "value": 0.5,
        "seed": 0,
    }
    return row | changes


def test_malformed_result_rows_are_named_and_skipped_never_hiding_a_run(tmp_path, capsys):
    path = tmp_path / "results.csv"
    append_results(path, [_row(run_id="c/a_seed0"), _row(run_id="c/a_seed1")])
    good = path.read_text()
    lines = good.splitlines()
    half = lines[-1][: len(lines[-1]) // 2]
    path.write_text(good + half + "\n" + ",".join(["1"] * 20) + "\n")
    path.write_text(path.read_text() + lines[-1].replace(",0.5,", ",abc,") + "\n")
    table = read_results(path)
    assert list(table["run_id"]) == ["c/a_seed0", "c/a_seed1"] and table["value"].dtype.kind == "f"
    err = capsys.readouterr().err
    assert f"{path}:4: " in err and f"{path}:5: 20 fields" in err
    assert f"{path}:6: value='abc' is not a number" in err
    path.write_text("a,b\n1,2\n")
    with pytest.raises(Exception, match="not a results file of this suite"):
        read_results(path)


def test_a_killed_writer_never_leaves_a_partial_row(tmp_path):
    path = tmp_path / "results.csv"
    script = (
        "import sys; from ropim.suite.results import append_results, RESULT_COLUMNS\n"
        "row = dict.fromkeys(RESULT_COLUMNS, 'x') | {'budget_epochs': 1, 'budget_seconds': '',"
        " 'epochs_completed': 1, 'pretrain_seconds': 2, 'pretrain_images_per_s': 3,"
        " 'value': 0.5, 'seed': 0}\n"
        "for i in range(100000): append_results(sys.argv[1], [row] * 50)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=PROJECT_ROOT)
    deadline = time.time() + 60
    while not (path.is_file() and path.stat().st_size > 20_000) and time.time() < deadline:
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    lines = path.read_text().splitlines()
    assert len(lines) > 50 and all(line.count(",") == len(RESULT_COLUMNS) - 1 for line in lines)


def test_a_full_disk_while_appending_results_keeps_the_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    append_results(path, [_row()])
    before = path.read_bytes()

    def full(_fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointError, match="could not append 1 result row.*No space left"):
        append_results(path, [_row()])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.csv.lock"]


def _error_line(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_damaged_or_unfinished_runs_are_one_error_line_in_every_command(tmp_path, capsys):
    with pytest.raises(SimulatedCrash):
        pretrain(_cfg(tmp_path), after_step=[crash_after(3)])
    run = tmp_path / "ropim_tiny"
    err = _error_line(capsys, ["evaluate", str(run)])
    assert "has not finished pre-training (status 'running')" in err
    (run / "run.json").write_text("{not json")
    for args in (["evaluate", str(run)], ["export", str(run), str(tmp_path / "out")]):
        assert f"{run / 'run.json'} cannot be read" in _error_line(capsys, args)
    planned = tmp_path / "cmp" / "table2_tiny" / "ropim_seed0"
    planned.mkdir(parents=True)
    (planned / "run.json").write_text("[1, 2")
    compare = PROJECT_ROOT / "configs" / "table2_tiny.yaml"
    args = ["compare", "--config", str(compare), f"run.output_dir={tmp_path / 'cmp'}"]
    assert f"{planned / 'run.json'} cannot be read" in _error_line(capsys, args)
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "config.json").write_text("{")
    err = _error_line(
        capsys, ["evaluate", "--weights", f"local-dir:{folder}", "--config", str(TINY_CONFIG)]
    )
    assert "config.json is not valid JSON" in err
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    err = _error_line(
        capsys, ["pretrain", "--config", str(TINY_CONFIG), f"run.output_dir={blocked}/x"]
    )
    assert "Not a directory" in err or "not a directory" in err.lower()


def test_one_class_data_is_refused_for_classification_and_flagged_by_check_data(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "val"):
        folder = tmp_path / "data" / split / "only"
        folder.mkdir(parents=True)
        for i in range(40):
            Image.new("RGB", (32, 32), (i * 5, 0, 0)).save(folder / f"{i}.jpg")
    data = [
        "data.dataset=imagefolder",
        f"data.root={tmp_path / 'data'}",
        "data.limit=null",
        "model.img_size=28",
    ]
    args = ["check-data", "--config", str(TINY_CONFIG), *data]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "WARN  1 class(es)" in out and "fewer than 2 classes" in out
    run_dir = pretrain(_cfg(tmp_path / "runs", *data, "train.epochs=0.1"))
    err = _error_line(capsys, ["evaluate", str(run_dir)])
    assert "classification needs at least 2 classes" in err


def test_a_probe_batch_larger_than_the_data_names_the_probe_setting():
    from torch.utils.data import TensorDataset

    from downstream.classification.linear_probe import augmented_linear_probe_accuracy
    from downstream.classification.settings import LinearSettings
    from ropim.harness.data.views import SeededViews
    from tests.conftest import tiny_backbone

    images = TensorDataset(torch.zeros(100, 3, 28, 28), torch.zeros(100, dtype=torch.long))
    views = SeededViews(images, lambda item: item, seed=0)
    features, labels = torch.zeros(10, 32), torch.zeros(10, dtype=torch.long)
    recipe = LinearSettings(batch_size=512)
    with pytest.raises(ConfigError, match="fewer than classification.linear.batch_size=512"):
        augmented_linear_probe_accuracy(
            tiny_backbone(), views, "cls", features, labels, 2, recipe, 0, torch.device("cpu")
        )


def _broken_invocations(tmp_path) -> dict[str, list[str]]:
    """Each command with an input it cannot use: a missing file, or a value that cannot work."""
    missing = str(tmp_path / "missing.yaml")
    tiny = str(TINY_CONFIG)
    compare = str(PROJECT_ROOT / "configs" / "table2_tiny.yaml")
    return {
        "pretrain": ["pretrain", "--config", tiny, "train.epochs=.nan"],
        "compare": ["compare", "--config", compare, "--dry-run", "train.batch_size=0"],
        "reproduce": ["reproduce", "--config", missing],
        "report": ["report", "--config", missing],
        "evaluate": ["evaluate", str(tmp_path / "no_run")],
        "bench-pretrain": ["bench-pretrain", "--config", compare, "train.precision=fp7"],
        "bench-data": ["bench-data", "--folder", str(tmp_path), "--count", "0"],
        "bench-loop": ["bench-loop", "--config", missing],
        "bench-dense": ["bench-dense", "--variants", "nosuch"],
        "bench-step": ["bench-step", "--config", tiny, "model.patch_size=5"],
        "export": ["export", str(tmp_path / "no_run"), str(tmp_path / "out")],
        "check-data": ["check-data", "--config", tiny, "data.dataset=imagefolder"],
        "recipes": ["recipes", "--config", missing],
        "methods": ["methods", "--method-dir", str(tmp_path / "../x/../../etc")],
    }


def test_every_command_with_broken_input_is_one_error_line_and_loses_nothing(tmp_path, capsys):
    results = tmp_path / "results.csv"
    append_results(results, [_row()])
    before = results.read_bytes()
    failed = {}
    for command, args in _broken_invocations(tmp_path).items():
        code = main(args)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        one_line = len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
        if code == 0 or not one_line:
            failed[command] = (code, err[-300:])
    assert not failed, failed
    assert results.read_bytes() == before


def test_compare_builds_every_method_before_training_anything(tmp_path, capsys):
    """A misspelt method or a setting a method cannot take fails before any method trains."""
    compare = str(PROJECT_ROOT / "configs" / "table2_tiny.yaml")
    base = ["compare", "--config", compare, "--dry-run", f"run.output_dir={tmp_path}"]
    assert main(base) == 0 and "ok: every method builds" in capsys.readouterr().out
    misspelt = "compare.methods={ropim: {method: {ratio: 0.25}}, maskfet: {}}"
    assert "unknown method name 'maskfet'" in _error_line(capsys, [*base, misspelt])
    bad = (
        "compare.methods={ropim: {method: {ratio: 0.25}}, simmim: {method: {mask_patch_size: abc}}}"
    )
    line = _error_line(capsys, [*base, bad])
    assert "method.mask_patch_size must be an integer, got 'abc'" in line
    assert not (tmp_path / "table2_tiny").exists()  # nothing trained
