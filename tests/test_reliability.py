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
from tests.conftest import PROJECT_ROOT, TINY_CONFIG, SimulatedCrash, crash_after, evaluate


def _cfg(out, *extra: str):
    return load_config(
        TINY_CONFIG, [f"run.output_dir={out}", "train.reconstruction_images=0", *extra]
    )


def test_a_diverged_run_writes_nothing_and_resumes_with_a_lower_learning_rate(tmp_path):
    """ROPIM clips at 5: the non-finite gradient is caught before clipping could raise."""
    with pytest.raises(SimulatedCrash):
        pretrain(_cfg(tmp_path), after_step=[crash_after(3)])  # checkpoint at step 3
    pattern = (
        r"not finite at step \d+ .*step_00000003, weights finite.*resume with a lower learning"
    )
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


def test_after_a_divergence_a_checkpoint_with_blown_up_weights_is_not_offered(tmp_path):
    """Weights can grow huge while the loss is still finite: the checkpoint named for the resume
    must hold sane weights, and ``latest`` is moved back to it so the resume just works."""
    from safetensors.torch import save_file

    with pytest.raises(SimulatedCrash):
        pretrain(_cfg(tmp_path), after_step=[crash_after(6)])  # checkpoints at steps 3 and 6
    folder = tmp_path / "ropim_tiny" / "checkpoints"
    weights_file = folder / "step_00000006" / "model.safetensors"
    tensors, metadata = load_file(str(weights_file)), None
    from safetensors import safe_open

    with safe_open(str(weights_file), framework="pt") as handle:
        metadata = handle.metadata()
    name = next(k for k in tensors if k.endswith("patch_embed.proj.weight"))
    tensors[name] = tensors[name] * 6e10  # finite, blown up
    save_file(tensors, str(weights_file), metadata=metadata)
    pattern = (
        r"step_00000003, weights finite and below 1e\+04; step_00000006 \(max \|w\| "
        r"[0-9.]+e\+\d+\) blew up before the loss did, so 'latest' now names step_00000003"
    )
    with pytest.raises(TrainingError, match=pattern):
        pretrain(_cfg(tmp_path, "train.base_lr=1e12"), resume=True)
    assert (folder / "latest").read_text() == "step_00000003"
    run_dir = pretrain(_cfg(tmp_path, "train.base_lr=5e-4"), resume=True)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished" and record["resume_changes"][0]["from_step"] == 3


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
    # A row cut inside an open quote is one bad line: it does not swallow the rows after it.
    cut = lines[-1].replace("c/a_seed1,", 'c/a_seed2,"a,vit')[:40]
    path.write_text(good + cut + "\n" + lines[-1].replace("a_seed1", "a_seed3") + "\n")
    table = read_results(path)
    assert list(table["run_id"]) == ["c/a_seed0", "c/a_seed1", "c/a_seed3"]
    assert f"{path}:4: an unterminated quote" in capsys.readouterr().err
    path.write_text("a,b\n1,2\n")
    with pytest.raises(Exception, match="not a results file of this suite"):
        read_results(path)


def test_a_crash_between_the_rows_and_the_mark_does_not_duplicate_the_rows(tmp_path, monkeypatch):
    """The rows are appended, then ``<task>.json`` marks the task done; a crash in between
    re-runs the task, whose rows replace that attempt's. A row of an earlier run of the same
    name (recorded before this run finished) stays."""
    import ropim.suite.evaluate as evaluate_module

    run = pretrain(_cfg(tmp_path / "runs"))
    results = tmp_path / "results.csv"
    earlier = _row(run_id=f"runs/{run.name}", task="classification", protocol="knn")
    append_results(results, [earlier | {"recorded_at": "2000-01-01T00:00:00+00:00"}])
    original = evaluate_module.write_json

    def crash(path, payload):
        if path.name == "classification.json":
            raise SimulatedCrash("killed before the mark")
        return original(path, payload)

    monkeypatch.setattr(evaluate_module, "write_json", crash)
    with pytest.raises(SimulatedCrash):
        evaluate("classification", run, {"protocols": ["knn"], "knn": {"k": 10}}, results)
    monkeypatch.setattr(evaluate_module, "write_json", original)
    evaluate("classification", run, {"protocols": ["knn"], "knn": {"k": 10}}, results)
    table = read_results(results)
    new = table[table["recorded_at"].str[:4] != "2000"]
    assert len(table) - len(new) == 1 and len(new) >= 1  # the earlier run's row stays
    assert not new.duplicated(["protocol", "metric"]).any(), new
    assert (run / "classification.json").is_file()


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


def test_a_failed_json_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from ropim.harness.records import write_json

    path = tmp_path / "run.json"
    write_json(path, {"status": "running"})

    def full(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(CheckpointError, match="could not write .*run.json .*No space left"):
        write_json(path, {"status": "finished"})
    monkeypatch.undo()

    def interrupted(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"status": "finished"})
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
    assert json.loads(path.read_text()) == {"status": "running"}


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


# Values of the right type that cannot work: each was a traceback (or a silent wrong run) once.
BROKEN_SETTINGS = {
    "num_heads not dividing the width": "model.kwargs.num_heads=3",
    "a device this machine lacks": "train.accelerator=mps",
    "crop_ratio [0, 0]": "data.crop_ratio=[0,0]",
    "crop_ratio [2, 1]": "data.crop_ratio=[2,1]",
    "knn_k -5": "probe.knn_k=-5",
    "knn_k 0": "probe.knn_k=0",
    "one input channel": "model.in_chans=1",
    "depth -1": "model.kwargs.depth=-1",
    "depth 0": "model.kwargs.depth=0",
    "depth 1e9": "model.kwargs.depth=1000000000",
    "embed_dim 0": "model.kwargs.embed_dim=0",
    "img_size abc": "model.img_size=abc",
    "betas [2, 3]": "train.betas=[2,3]",
    "betas [0.9]": "train.betas=[0.9]",
    "an unclosed list": "train.betas=[0.9, 0.95",
    "an unclosed list (epochs)": "train.epochs=[1,",
    "an alias": "model.kwargs={a: &x [1], b: *x}",
    "hflip 5": "data.hflip=5",
    "std 0": "data.std=[0,0,0]",
    "std of two channels": "data.std=[1,1]",
    "mean null": "data.mean=[null,1,1]",
    "max_iter -1": "probe.max_iter=-1",
    "run.name ../../x": "run.name=../../x",
    "an absolute run.name": "run.name={parent}/escaped",
    "an empty run.name": "run.name=",
}


def _local_dir(tmp_path, export, name: str, edit) -> str:
    """A copy of ``export`` with its config.json edited by ``edit`` (and, with
    ``strip_weights_metadata``, a weights file that no longer records the model arguments)."""
    folder = tmp_path / name
    shutil.copytree(export, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    if config.pop("strip", False):
        from safetensors.torch import save_file

        save_file(load_file(str(folder / "model.safetensors")), str(folder / "model.safetensors"))
    return f"local-dir:{folder}"


def _broken_external_inputs(tmp_path, run, export) -> dict[str, list[str]]:
    """Run folders and imported weights that were edited or are not what they claim."""
    tiny, results = str(TINY_CONFIG), str(tmp_path / "r.csv")
    out = f"run.output_dir={tmp_path / 'imported'}"

    def weights(name, edit):
        spec = _local_dir(tmp_path, export, name, edit)
        return ["evaluate", "--weights", spec, "--config", tiny, out, "--results", results]

    def drop_record(config):
        config.pop("ropim_model_args")
        config["strip"] = True

    no_architecture = tmp_path / "no_architecture"
    shutil.copytree(run, no_architecture)
    record = json.loads((no_architecture / "run.json").read_text())
    del record["architecture"]
    (no_architecture / "run.json").write_text(json.dumps(record))
    return {
        "evaluate --name ../../../x": [
            "evaluate", "--weights", str(export / "model.safetensors"), "--config", tiny,
            "--name", "../../../x", out, "--results", results,
        ],
        "knn k 0": [
            "evaluate", str(run), "--results", results, "--task", "classification",
            "--set", "classification.knn.k=0",
        ],
        "num_heads edited, record removed": weights(
            "heads", lambda c: (c.pop("ropim_model_args"), c["model_args"].update(num_heads=4))
        ),
        "depth 1e9, no record anywhere": weights(
            "deep", lambda c: (drop_record(c), c["model_args"].update(depth=10**9))
        ),
        "img_size abc, no record anywhere": weights(
            "abc", lambda c: (drop_record(c), c["model_args"].update(img_size="abc"))
        ),
        "a resnet18": weights("resnet", lambda c: c.update(architecture="resnet18")),
        "pretrained_cfg.mean null": weights(
            "mean", lambda c: c["pretrained_cfg"].update(mean=None)
        ),
        "run.json without architecture": ["evaluate", str(no_architecture), "--results", results],
        "bench-step --steps -1": ["bench-step", "--config", tiny, "--steps", "-1"],
        "compare.name /etc": [
            "compare", "--config", str(PROJECT_ROOT / "configs" / "table2_tiny.yaml"),
            "--dry-run", "compare.name=/etc",
        ],
        "compare.seeds []": ["compare", "--config", "table2_tiny", "--dry-run", "compare.seeds=[]"],
        "compare.seeds [0, 0]": [
            "compare", "--config", "table2_tiny", "--dry-run", "compare.seeds=[0,0]",
        ],
        "compare.random_init maybe": [
            "compare", "--config", "table2_tiny", "--dry-run", "compare.random_init=maybe",
        ],
    }  # fmt: skip


def _one_error_line(args: list[str], capsys) -> tuple[int, str] | None:
    """None when ``args`` fail with one ``error:`` line; else the status and what was said."""
    try:
        code = main(args)
    except BaseException as exc:  # noqa: BLE001 - a traceback is what this test counts
        return -1, f"{type(exc).__name__}: {exc}"[:300]
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    one_line = len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    return None if code not in (0, None) and one_line else (code, err[-300:])


def test_every_command_with_broken_input_is_one_error_line_and_loses_nothing(tmp_path, capsys):
    results = tmp_path / "results.csv"
    append_results(results, [_row()])
    before = results.read_bytes()
    failed = {}
    for command, args in _broken_invocations(tmp_path).items():
        if (problem := _one_error_line(args, capsys)) is not None:
            failed[command] = problem
    assert not failed, failed
    assert results.read_bytes() == before


def test_broken_settings_and_edited_inputs_are_one_error_line_and_write_nothing(tmp_path, capsys):
    """The second sweep's cases: every one an ``error:`` line naming the key or file, nothing
    written outside the folders named (run.name=../../x, an absolute name) or at all."""
    run = pretrain(_cfg(tmp_path / "runs"))
    export = tmp_path / "export"
    assert main(["export", str(run), str(export)]) == 0
    capsys.readouterr()
    siblings = sorted(p.name for p in tmp_path.parent.iterdir())
    failed = {}
    for label, override in BROKEN_SETTINGS.items():
        out = tmp_path / "settings" / label.replace(" ", "_").replace("/", "_")
        override = override.replace("{parent}", str(tmp_path.parent))
        args = ["pretrain", "--config", str(TINY_CONFIG), f"run.output_dir={out}", override]
        if (problem := _one_error_line(args, capsys)) is not None:
            failed[label] = problem
        elif out.exists():
            failed[label] = ("wrote", sorted(p.name for p in out.rglob("*")))
    for label, args in _broken_external_inputs(tmp_path, run, export).items():
        if (problem := _one_error_line(args, capsys)) is not None:
            failed[label] = problem
    assert not failed, failed
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == siblings
    assert not (tmp_path / "imported").exists() and not (tmp_path / "r.csv").exists()


def test_a_report_from_a_missing_or_foreign_results_file_leaves_the_report_alone(tmp_path, capsys):
    compare = str(PROJECT_ROOT / "configs" / "table2_tiny.yaml")
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "table2_tiny.md").write_text("the table a long run produced\n")
    before = {p.name: p.read_bytes() for p in reports.iterdir()}
    base = ["report", "--config", compare, "--reports", str(reports), "--results"]
    err = _error_line(capsys, [*base, str(tmp_path / "missing.csv")])
    assert "missing.csv does not exist" in err and "nothing was written" in err
    other = tmp_path / "other.csv"
    append_results(other, [_row(run_id="another_comparison/ropim_seed0")])
    assert "holds no result row of comparison 'table2_tiny'" in _error_line(
        capsys, [*base, str(other)]
    )
    assert {p.name: p.read_bytes() for p in reports.iterdir()} == before


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


def test_an_unfinished_run_is_not_exported_and_an_export_is_readable_by_others(tmp_path, capsys):
    with pytest.raises(SimulatedCrash):
        pretrain(_cfg(tmp_path / "a"), after_step=[crash_after(3)])
    err = _error_line(capsys, ["export", str(tmp_path / "a" / "ropim_tiny"), str(tmp_path / "x")])
    assert "has not finished pre-training (status 'running')" in err
    assert not (tmp_path / "x").exists()
    run = pretrain(_cfg(tmp_path / "b"))
    previous = os.umask(0o022)
    try:
        assert main(["export", str(run), str(tmp_path / "out")]) == 0
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_data_mean_or_std_set_alone_is_used():
    from ropim.harness.data.datasets import MNIST_MEAN, dataset_stats

    cfg = load_config(TINY_CONFIG, ["data.std=[0.5, 0.5, 0.5]"])
    assert dataset_stats(cfg.data) == (MNIST_MEAN, [0.5, 0.5, 0.5])
