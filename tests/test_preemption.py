"""Pre-emption: SIGTERM or SIGUSR1 writes a checkpoint at the next step boundary and stops with
status 128 + signal; the resumed run ends with the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from ropim.cli import main
from ropim.harness.config import load_config
from ropim.harness.preemption import Preempted
from ropim.harness.pretrain import pretrain
from tests.conftest import TINY_CONFIG, evaluate
from tests.test_classification import AUGMENTED_FINETUNE


def signal_at(step: int, signum: int = signal.SIGTERM):
    def callback(done: int) -> None:
        if done == step:
            os.kill(os.getpid(), signum)

    return callback


def _latest_weights(folder):
    return load_file(str(folder / (folder / "latest").read_text() / "model.safetensors"))


def _cfg(out):
    return load_config(TINY_CONFIG, [f"run.output_dir={out}", "train.reconstruction_images=0"])


def test_sigterm_checkpoints_pretraining_and_the_resume_is_bit_identical(
    tmp_path, capsys, monkeypatch
):
    straight = _latest_weights(pretrain(_cfg(tmp_path / "a")) / "checkpoints")
    with pytest.raises(Preempted, match="stopped by SIGTERM at step 5") as stop:
        pretrain(_cfg(tmp_path / "b"), after_step=[signal_at(5)])
    assert stop.value.exit_status == 143
    folder = tmp_path / "b" / "ropim_tiny" / "checkpoints"
    assert (folder / "latest").read_text() == "step_00000005"  # not a multiple of 3: on request
    resumed = _latest_weights(pretrain(_cfg(tmp_path / "b"), resume=True) / "checkpoints")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # The command line turns it into one line and the signal's status (SIGUSR1: 138).
    args = ["pretrain", "--config", str(TINY_CONFIG), f"run.output_dir={tmp_path / 'c'}"]
    import ropim.harness.pretrain as module

    original = module.pretrain

    def with_signal(cfg, **kw):
        return original(cfg, **kw | {"after_step": [signal_at(2, signal.SIGUSR1)]})

    monkeypatch.setattr(module, "pretrain", with_signal)
    assert main(args) == 138
    err = capsys.readouterr().err
    assert err.startswith("error: stopped by SIGUSR1 at step 2") and err.count("\n") == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_sigterm_checkpoints_a_fine_tune_and_the_resume_is_bit_identical(tmp_path):
    cfg = load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", "train.epochs=0.5"])
    run_dir = pretrain(cfg)
    evaluate("classification", run_dir, AUGMENTED_FINETUNE, tmp_path / "a.csv")
    folder = run_dir / "classification_finetune" / "checkpoints"
    straight = _latest_weights(folder)
    shutil.rmtree(run_dir / "classification_finetune")
    with pytest.raises(Preempted, match="stopped by SIGTERM at step 4"):
        evaluate("classification", run_dir, AUGMENTED_FINETUNE, tmp_path / "b.csv", [signal_at(4)])
    assert (folder / "latest").read_text() == "step_00000004"
    evaluate("classification", run_dir, AUGMENTED_FINETUNE, tmp_path / "b.csv")
    resumed = _latest_weights(folder)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_signal_during_the_last_step_still_stops_the_command(tmp_path):
    """The last step's evaluation and checkpoint are where a pre-emption most often lands; the
    signal must still end the command (so a driver does not start the next unit and the job is
    requeued), and the resumed run completes with the weights of an uninterrupted one."""
    straight = _latest_weights(pretrain(_cfg(tmp_path / "a")) / "checkpoints")
    with pytest.raises(Preempted, match="stopped by SIGTERM at step 8"):  # 256 / 32: the last
        pretrain(_cfg(tmp_path / "b"), after_step=[signal_at(8)])
    run_dir = tmp_path / "b" / "ropim_tiny"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000008"
    pretrain(_cfg(tmp_path / "b"), resume=True)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    resumed = _latest_weights(run_dir / "checkpoints")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
