"""Every user mistake ends in one `error:` line naming the file, key or value; runs survive a
failed checkpoint write, a tampered training state and Ctrl-C."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ropim.cli import main
from ropim.harness import checkpoint as checkpoint_module
from ropim.harness.config import load_config
from ropim.harness.errors import CheckpointError
from ropim.harness.loop import TrainStep
from ropim.harness.pretrain import pretrain
from tests.conftest import TINY_CONFIG


def _error_line(capsys, args: list[str], code: int = 2) -> str:
    assert main(args) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _pretrain_args(tmp_path, *extra: str) -> list[str]:
    return ["pretrain", "--config", str(TINY_CONFIG), f"run.output_dir={tmp_path}", *extra]


def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 1\n  batch_size: [32\nmodel: {}\n")
    err = _error_line(capsys, ["pretrain", "--config", str(bad)])
    assert str(bad) in err and "line 4" in err
    err = _error_line(capsys, ["compare", "--config", str(bad)])
    assert str(bad) in err


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.batch_size=0", "train.batch_size=0 must be a positive"),
        ("train.base_lr=-1", "train.base_lr=-1.0 must be a positive"),
        ("train.epochs=-1", "train.epochs=-1.0 must be a positive"),
        ("train.checkpoint_every=0", "train.checkpoint_every=0 must be a positive"),
        ("train.min_lr=-0.1", "train.min_lr=-0.1 must be a finite number, zero or more"),
        ("data.on_bad_image=ignore", "data.on_bad_image='ignore' must be error or skip"),
        ("train.epochs=.nan", "train.epochs=nan must be a positive, finite number"),
        ("train.epochs=.inf", "train.epochs=inf must be a positive, finite number"),
        ("train.base_lr=.nan", "train.base_lr=nan must be a positive, finite number"),
        ("train.precision=fp7", "train.precision='fp7' must be one of"),
        ("train.accelerator=tpu9", "train.accelerator='tpu9' must be one of"),
        ("train.clip_grad=0", "train.clip_grad=0.0 must be a positive max norm; false turns"),
        ("train.clip_grad=true", "train.clip_grad=True must be a positive max norm"),
        ("data.limit=-5", "data.limit=-5 must be a positive, finite number"),
        ("method={name: ../evil}", "method name '../evil' (method.name) must be a Python"),
    ],
)
def test_values_that_cannot_work_are_refused_by_name(tmp_path, capsys, override, named):
    assert named in _error_line(capsys, _pretrain_args(tmp_path, override))


class _NotATensor:
    pass


def test_a_tampered_training_state_is_refused_without_unpickling(tmp_path, capsys):
    pretrain(load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", "train.epochs=0.5"]))
    state = tmp_path / "ropim_tiny" / "checkpoints" / "step_00000004" / "state.pt"
    state.write_bytes(pickle.dumps({"step": _NotATensor()}))
    err = _error_line(capsys, [*_pretrain_args(tmp_path, "train.epochs=0.5"), "--resume"])
    assert "not a training state written by this suite" in err and str(state) in err
    assert "weights_only=False" not in err


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_resumes(tmp_path, monkeypatch):
    straight = pretrain(load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", "run.name=a"]))
    real_save = checkpoint_module.save_file
    calls = []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the checkpoint of step 6; step 3's is written
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    cfg = load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", "run.name=b"])
    with pytest.raises(CheckpointError, match="step 6 .*No space left.*step_00000003\\) is intact"):
        pretrain(cfg)
    monkeypatch.setattr(checkpoint_module, "save_file", real_save)
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step_00000003"
    assert not list((tmp_path / "b" / "checkpoints").glob(".staging*"))
    resumed = pretrain(cfg, resume=True)
    a = load_file(str(straight / "checkpoints" / "step_00000008" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step_00000008" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    real_call = TrainStep.__call__

    def interrupted(self, batch, step):
        if step == 4:
            raise KeyboardInterrupt
        return real_call(self, batch, step)

    monkeypatch.setattr(TrainStep, "__call__", interrupted)
    err = _error_line(capsys, _pretrain_args(tmp_path), code=130)
    assert "interrupted" in err and "--resume" in err
    monkeypatch.setattr(TrainStep, "__call__", real_call)
    assert main([*_pretrain_args(tmp_path), "--resume"]) == 0
    assert "resuming from step 3" in capsys.readouterr().out


def _image_folder(root, bad: bool):
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(6):
                shade = (40 * i, 100 if label == "a" else 200, 50)
                Image.new("RGB", (32, 32), shade).save(folder / f"{i}.jpg", quality=90)
    if bad:
        train = root / "train" / "a"
        (train / "corrupt.jpg").write_bytes(b"not a jpeg at all")
        whole = (train / "0.jpg").read_bytes()
        (train / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
        Image.new("CMYK", (32, 32), (0, 50, 100, 0)).save(train / "cmyk.jpg")


def test_check_data_finds_corrupt_truncated_and_cmyk_files(tmp_path, capsys):
    from ropim.harness.data_check import check_folder

    _image_folder(tmp_path / "data", bad=True)
    report = check_folder(tmp_path / "data" / "train", workers=1)
    problems = {status.path.rsplit("/", 1)[-1]: status.problem for status in report.bad}
    assert set(problems) == {"corrupt.jpg", "truncated.jpg"}
    assert problems["truncated.jpg"].startswith("truncated")
    assert report.modes["CMYK"] == 1 and report.fatal
    args = [
        "check-data",
        "--config",
        str(TINY_CONFIG),
        "data.dataset=imagefolder",
        f"data.root={tmp_path / 'data'}",
        "--workers",
        "1",
    ]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and "data.on_bad_image=skip" in captured.err
    assert "corrupt.jpg" in captured.out and "mode CMYK will be converted" in captured.out
    # The folder alone, no config: the dataset root (train/ and val/), or one split folder.
    assert main(["check-data", str(tmp_path / "data"), "--workers", "1"]) == 1
    assert "corrupt.jpg" in capsys.readouterr().out
    _image_folder(tmp_path / "good", bad=False)
    assert main(["check-data", str(tmp_path / "good" / "train")]) == 0
    assert capsys.readouterr().out.rstrip().endswith("ok: every image decodes")
    assert main(["check-data", str(tmp_path / "nothing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_skip_leaves_bad_images_out_and_records_each(tmp_path):
    _image_folder(tmp_path / "data", bad=True)
    overrides = [
        f"run.output_dir={tmp_path}",
        "data.dataset=imagefolder",
        f"data.root={tmp_path / 'data'}",
        "data.on_bad_image=skip",
        "train.batch_size=4",
        "data.limit=null",
    ]
    run_dir = pretrain(load_config(TINY_CONFIG, overrides))
    dataset = json.loads((run_dir / "run.json").read_text())["dataset"]
    assert dataset["skipped_count"] == 2 and dataset["images"] == 13
    assert sorted(p.rsplit("/", 1)[-1] for p in dataset["skipped_images"]) == [
        "corrupt.jpg",
        "truncated.jpg",
    ]


def test_every_command_is_dispatched_from_the_table():
    import argparse

    from ropim.cli import COMMANDS, _parser

    (sub,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(COMMANDS) == set(sub.choices)


def test_overrides_may_follow_options(tmp_path):
    from ropim.cli import _parse

    args = _parse(["evaluate", "runs/a", "--task", "classification", "classification.knn.k=5"])
    assert args.runs == ["runs/a", "classification.knn.k=5"]
    args = _parse(["pretrain", "train.epochs=1", "--config", "c.yaml", "train.batch_size=8"])
    assert args.overrides == ["train.epochs=1", "train.batch_size=8"]
    with pytest.raises(SystemExit):
        _parse(["pretrain", "--config", "c.yaml", "--nope"])
    with pytest.raises(SystemExit):
        _parse(["tasks", "a=b"])  # a command without overrides


def test_every_option_of_every_command_is_described_in_help():
    import argparse

    from ropim.cli import _parser

    parser = _parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    undescribed = [
        f"{name} {action.option_strings or action.dest}"
        for name, command in commands.choices.items()
        for action in command._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert not undescribed, undescribed
    assert {c.dest for c in commands._choices_actions} == set(commands.choices)  # each has help
    assert all(c.help for c in commands._choices_actions)
