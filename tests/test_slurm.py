"""srun as a launcher: the tasks it starts form one world (emulated with the environment srun
sets, two CPU processes on gloo), and a multi-task allocation that did not use srun is refused
in one line instead of running N separate jobs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from ropim.harness.errors import ConfigError
from ropim.harness.runtime import launch_rank, launch_world
from tests.conftest import PROJECT_ROOT, TINY_CONFIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _srun_env(rank: int, tasks: int = 2, port: int = 0) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return clean | {
        "SLURM_NTASKS": str(tasks),
        "SLURM_NNODES": "1",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "SLURM_NODEID": "0",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "ropim",
        "SLURM_NODELIST": "localhost",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }


def test_two_srun_tasks_train_as_one_world(tmp_path):
    port = _free_port()
    command = [
        sys.executable, "-m", "ropim", "pretrain", "--config", str(TINY_CONFIG),
        f"run.output_dir={tmp_path}", "train.reconstruction_images=0",
    ]  # fmt: skip
    tasks = [
        subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=_srun_env(rank, port=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [task.communicate(timeout=600) for task in tasks]
    for task, (_, err) in zip(tasks, outputs, strict=True):
        assert task.returncode == 0, err[-3000:]
    record = json.loads((tmp_path / "ropim_tiny" / "run.json").read_text())
    assert record["world_size"] == 2
    assert record["steps"] == 4  # 256 images / (32 per task x 2 tasks)
    first, second = record["weights_sha256_per_rank"]
    assert first == second  # the ranks ended in step


def test_srun_environment_is_read_and_an_allocation_without_srun_is_refused(monkeypatch):
    for key, value in _srun_env(1, tasks=8).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_NNODES", "2")
    assert launch_world() == (4, 2) and launch_rank() == 1
    monkeypatch.delenv("SLURM_STEP_ID")  # the batch script itself, not an srun step
    with pytest.raises(
        ConfigError, match="SLURM_NTASKS=8 but this process was not started by srun"
    ):
        launch_world()
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # salloc's shell: one process
    assert launch_world() == (1, 1)


STUB_SRUN = """#!/bin/bash
# srun stand-in: run the task, pass SIGTERM/SIGUSR1 on to it, exit with its status.
"$@" &
child=$!
trap 'kill -TERM $child 2>/dev/null' TERM
trap 'kill -USR1 $child 2>/dev/null' USR1
while :; do
    wait $child
    status=$?
    kill -0 $child 2>/dev/null || break
done
exit $status
"""

STUB_SCONTROL = """#!/bin/bash
echo "$@" >> "$SCONTROL_LOG"
"""


def _stub_scheduler(folder) -> dict[str, str]:
    """``srun`` and ``scontrol`` stand-ins on PATH; scontrol's calls go to a log."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SCONTROL_LOG": str(folder / "scontrol.log"),
        "SLURM_JOB_ID": "777",
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }


def test_the_packaged_sbatch_script_requeues_on_sigterm_and_the_requeued_job_resumes(tmp_path):
    """The batch script as a lab submits it, under a stub scheduler: SIGTERM to every process of
    the job (what SLURM sends at pre-emption) -> a checkpoint, exit 143, ``scontrol requeue``;
    the requeued script finishes the comparison with the weights of an uninterrupted one."""
    from safetensors.torch import load_file

    from ropim.cli import main

    script = tmp_path / "job.sbatch"
    assert main(["slurm", "single_node", "--out", str(script)]) == 0
    assert main(["slurm", "single_node", "--out", str(script)]) == 2  # never overwritten
    args = (
        "compare.seeds=[0] compare.random_init=false compare.tasks=[classification] "
        'classification.protocols=[knn] compare.methods={"ropim":{"method":{"ratio":0.25}}} '
        "train.epochs=30 train.checkpoint_every=20 probe.knn_every=0"
    )

    def job(folder, **extra):
        env = os.environ | _stub_scheduler(folder) | {
            "CONFIG": str(PROJECT_ROOT / "configs" / "table2_tiny.yaml"),
            "ARGS": f"{args} run.output_dir={folder / 'runs'}",
        } | extra  # fmt: skip
        return subprocess.Popen(
            ["bash", str(script)], cwd=folder, env=env, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    straight = job(straight_dir)
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out[-2000:]

    folder = tmp_path / "preempted"
    folder.mkdir()
    first = job(folder)
    checkpoints = folder / "runs" / "table2_tiny" / "ropim_seed0" / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints / "latest").is_file() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGTERM)  # the whole job, batch shell included
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 143, out[-2000:]
    assert "requeueing job 777" in out
    assert (folder / "scontrol.log").read_text() == "requeue 777\n"
    run_json = json.loads((checkpoints.parent / "run.json").read_text())
    assert run_json["status"] == "running"  # stopped mid-run, not finished

    second = job(folder)  # what SLURM starts after the requeue
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-2000:]
    assert (folder / "scontrol.log").read_text() == "requeue 777\n"  # not requeued again

    def final(base):
        ckpt = base / "runs" / "table2_tiny" / "ropim_seed0" / "checkpoints"
        return load_file(str(ckpt / (ckpt / "latest").read_text() / "model.safetensors"))

    a, b = final(straight_dir), final(folder)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
