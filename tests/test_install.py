"""Installed from its wheel, outside the checkout: presets by name, honest provenance."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import PROJECT_ROOT


def test_the_wheel_runs_a_bundled_preset_from_inside_another_repository(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(PROJECT_ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("ropim_bench-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    other = tmp_path / "someone_elses_repo"
    other.mkdir()
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(other),
            "-c",
            "user.email=a@b",
            "-c",
            "user.name=a",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "theirs",
        ],
        check=True,
    )
    env = os.environ | {"PYTHONPATH": str(target)}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "ropim",
            "pretrain",
            "--config",
            "ropim_tiny",
            f"run.output_dir={tmp_path / 'runs'}",
            "train.epochs=0.25",
        ],
        cwd=other,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads((tmp_path / "runs" / "ropim_tiny" / "run.json").read_text())
    assert record["code"]["git_commit"] is None  # not the other repository's commit
    assert record["code"]["package_version"] == "0.2.0"
    version = subprocess.run(
        [sys.executable, "-m", "ropim", "--version"],
        cwd=other,
        env=env,
        capture_output=True,
        text=True,
    )
    assert version.stdout.strip() == "ropim-bench 0.2.0"
    where = subprocess.run(
        [sys.executable, "-c", "import ropim; print(ropim.__file__)"],
        cwd=other,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.startswith(str(target))  # the installed copy ran, not the checkout

    def installed(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ropim", *args], cwd=other, env=env, capture_output=True,
            text=True,
        )  # fmt: skip

    # The documentation travels with the package.
    pages = installed("docs")
    assert pages.returncode == 0 and "recipes" in pages.stdout and "clusters" in pages.stdout
    page = installed("docs", "recipes")
    assert page.returncode == 0 and page.stdout.startswith("# ") and "ROPIM" in page.stdout
    assert installed("slurm", "single_node").stdout.startswith("#!/bin/bash")
    # Rows recorded from an installed copy carry the package version (there is no commit).
    results = tmp_path / "results.csv"
    evaluated = installed(
        "evaluate", str(tmp_path / "runs" / "ropim_tiny"), "--results", str(results),
        "--set", "classification.protocols=[knn]",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    rows = results.read_text().splitlines()
    assert len(rows) > 1 and all(",ropim-bench==0.2.0," in row for row in rows[1:])
    # check-data takes a folder alone.
    from PIL import Image

    for label in ("a", "b"):
        folder = tmp_path / "images" / "train" / label
        folder.mkdir(parents=True)
        for index in range(3):
            Image.new("RGB", (16, 16), (40 * index, 90, 10)).save(folder / f"{index}.jpg")
    checked = installed("check-data", str(tmp_path / "images" / "train"))
    assert checked.returncode == 0 and "ok: every image decodes" in checked.stdout


def test_the_hub_is_offline_before_any_library_reads_its_settings():
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: importing the suite sets it first,
    so a timm:NAME that is not cached fails at once instead of retrying the network."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    probe = (
        "import ropim.cli, timm, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)\n"
        "try:\n"
        "    timm.create_model('vit_tiny_patch16_224.not_cached_anywhere', pretrained=True)\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    lines = done.stdout.split()
    assert lines[0] == "True", done.stderr[-1000:]
    assert len(lines) == 2  # not in the cache: it fails from the cache alone
    allowed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ropim, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)",
        ],
        env=env | {"HF_HUB_OFFLINE": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert allowed.stdout.strip() == "False"  # the user's explicit choice wins
