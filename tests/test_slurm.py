"""srun as a launcher: the tasks it starts form one world (emulated with the environment srun
sets, two CPU processes on gloo), and a multi-task allocation that did not use srun is refused
in one line instead of running N separate jobs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

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
