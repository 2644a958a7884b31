"""Several processes on one folder: claims split the work, a dead claimant's work is taken over,
and two concurrent ``ropim reproduce`` train and evaluate everything exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd

from ropim.harness import claims
from ropim.suite.results import read_results
from tests.conftest import PROJECT_ROOT

WORKER = """
import sys, time
from pathlib import Path
from ropim.harness.claims import WorkUnit, share_work
folder, seconds = Path(sys.argv[1]), float(sys.argv[2])
def work(name):
    with open(folder / "log.txt", "a") as log:
        log.write(name + "\\n")
    time.sleep(seconds)
    (folder / f"{name}.done").write_text("ok")
units = [WorkUnit(f"u{i}", f"unit {i}", lambda i=i: (folder / f"u{i}.done").is_file(),
                  lambda i=i: work(f"u{i}")) for i in range(6)]
share_work(units, folder / ".claims")
print("all done", flush=True)
"""


def _worker(folder, seconds: float, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(folder), str(seconds)],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "ROPIM_CLAIM_POLL_S": "0.1", **env},
    )


def test_a_live_claim_is_refused_and_a_stale_one_taken_over(tmp_path, monkeypatch):
    path = tmp_path / "unit.claim"
    monkeypatch.setattr(claims, "launch_id", lambda: "launch-a")
    first = claims.Claim(path)
    assert first.acquire()
    monkeypatch.setattr(claims, "launch_id", lambda: "launch-b")
    second = claims.Claim(path)
    assert not second.acquire() and second.holder["launch"] == "launch-a"
    first.release()  # released: the next process gets it
    assert not path.exists() and second.acquire()
    second.release()

    # A claim whose heartbeat stopped long ago (another host's process died) is taken over.
    path.write_text(json.dumps({"launch": "gone", "host": "elsewhere", "pid": 1}))
    old = time.time() - 3600
    os.utime(path, (old, old))
    third = claims.Claim(path)
    assert third.acquire() and json.loads(path.read_text())["launch"] == "launch-b"
    third.release()

    # A fresh claim from another host is respected, even if that PID does not exist here.
    path.write_text(json.dumps({"launch": "busy", "host": "elsewhere", "pid": 999_999}))
    assert not claims.Claim(path).acquire()


def test_a_claim_that_could_not_be_written_blocks_nobody(tmp_path, monkeypatch):
    """A full disk while writing a claim removes it and says so; an empty claim left by a
    creator that died before writing is stale after one heartbeat, not after ten minutes."""
    import pytest

    path = tmp_path / "unit.claim"

    def full(*_args, **_kw):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(claims.json, "dump", full)
        with pytest.raises(claims.ClaimError, match="could not write the claim .*No space left"):
            claims.Claim(path).acquire()
    assert not path.exists()
    path.write_bytes(b"")  # an empty claim, written moments ago: its creator may be mid-write
    assert not claims.Claim(path).acquire()
    old = time.time() - claims.unreadable_stale_s() - 1
    os.utime(path, (old, old))
    taker = claims.Claim(path)
    assert claims.stale_after_s() == 600 and taker.acquire()
    taker.release()


def test_processes_split_the_units_and_finish_a_dead_claimants_work(tmp_path):
    workers = [_worker(tmp_path, 0.3) for _ in range(2)]
    outputs = [w.communicate(timeout=120)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    log = (tmp_path / "log.txt").read_text().split()
    assert sorted(log) == [f"u{i}" for i in range(6)]  # each unit exactly once
    assert all("all done" in out for out in outputs)
    assert not list((tmp_path / ".claims").iterdir())  # every claim released

    # A worker killed mid-unit leaves its claim; the next one sees its PID is gone here,
    # takes the unit over and finishes everything.
    folder = tmp_path / "killed"
    folder.mkdir()
    victim = _worker(folder, 60)
    deadline = time.time() + 60
    while not (folder / "log.txt").is_file() and time.time() < deadline:
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert (folder / ".claims" / "u0.claim").is_file()
    survivor = _worker(folder, 0.0)
    out = survivor.communicate(timeout=120)[0]
    assert survivor.returncode == 0 and "taking over" in out, out
    assert all((folder / f"u{i}.done").is_file() for i in range(6))


def test_two_reproduce_processes_on_one_folder_do_everything_once(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results.csv"
    command = [
        sys.executable, "-m", "ropim", "reproduce", "--config", "table2_tiny",
        f"run.output_dir={runs}", "compare.seeds=[0]", "compare.tasks=[classification]",
        "compare.methods={ropim: {method: {ratio: 0.25}}, simmim: {method: {mask_patch_size: 16}}}",
        "classification.protocols=[knn]", "compare.left_out={detection: no signal here}",
        "--results", str(results), "--reports", str(tmp_path / "reports"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROPIM_CLAIM_POLL_S": "0.5"}
    processes = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    rows = read_results(results)
    key = ["run_id", "task", "protocol", "metric"]
    assert not rows.duplicated(key).any()  # no row written twice
    assert set(rows["method"]) == {"ropim", "simmim", "random_init"}
    assert len(rows[rows["metric"] == "top1"]) == 3  # 3 runs, k-NN
    for label in ("[1/3] ropim_seed0\n", "[classification 1/3] ropim_seed0\n"):
        done = [out.count(label) for out in outputs]  # the label alone: this process did it
        assert sorted(done) == [0, 1], (label, outputs)
    folder = runs / "table2_tiny"
    for run in ("ropim_seed0", "simmim_seed0"):
        metrics = pd.read_csv(folder / run / "metrics.csv")
        assert not metrics["step"].duplicated().any()
        evaluations = pd.read_csv(folder / run / "evaluations.csv")
        assert not evaluations["step"].duplicated().any()
    assert all("report: " in out for out in outputs)
    assert not list((folder / ".claims").glob("*.claim"))
    report = (tmp_path / "reports" / "table2_tiny.md").read_text()
    assert "(compare.tasks): segmentation, detection. Why: detection: no signal here." in report
