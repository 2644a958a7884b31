"""Provenance that cannot lie: a run records the files of the method (and task) it imported
with their sha256, and a method git does not track is never recorded as clean."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from ropim.harness.config import load_config
from ropim.harness.pretrain import pretrain
from ropim.harness.records import PROJECT_ROOT, _suite_checkout, code_version
from tests.conftest import TINY_CONFIG

EXAMPLE = Path(__file__).parent / "method_examples" / "frozenteacher.py"


def test_a_method_file_outside_the_checkout_is_recorded_with_its_digest_and_not_clean(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(EXAMPLE, folder / "frozenteacher.py")
    cfg = load_config(
        TINY_CONFIG,
        [f"run.output_dir={tmp_path}", "method={name: frozenteacher}", "train.epochs=0.25"],
    )
    run_dir = pretrain(cfg, method_dirs=(str(folder),))
    code = json.loads((run_dir / "run.json").read_text())["code"]
    digest = hashlib.sha256((folder / "frozenteacher.py").read_bytes()).hexdigest()
    assert {"path": str((folder / "frozenteacher.py").resolve()), "sha256": digest} in code["files"]
    assert code["git_dirty"] is True
    assert str((folder / "frozenteacher.py").resolve()) in code["unrecorded"]


def test_a_package_method_run_records_its_module_and_helpers():
    import baselines.data2vec  # noqa: F401  (loads its helper module too)
    from baselines.data2vec import Data2Vec
    from ropim.harness.pretrain import method_files

    names = {f.name for f in method_files(Data2Vec)}
    assert names == {"data2vec.py", "_block_masking.py"}
    code = code_version(method_files(Data2Vec))
    assert {Path(r["path"]).name for r in code["files"]} == names
    assert all(len(r["sha256"]) == 64 for r in code["files"])


@pytest.mark.skipif(not _suite_checkout(), reason="needs the suite's git checkout")
def test_an_untracked_file_in_a_method_package_makes_the_checkout_dirty():
    untracked = PROJECT_ROOT / "baselines" / "_provenance_probe_untracked.py"
    try:
        untracked.write_text("# a file git does not track\n")
        code = code_version([untracked])
        assert code["git_dirty"] is True
        assert "baselines/_provenance_probe_untracked.py" in code["unrecorded"]
        other = code_version()  # any run, not only one that imported it
        assert other["git_dirty"] is True
    finally:
        untracked.unlink(missing_ok=True)
    assert "baselines/_provenance_probe_untracked.py" not in code_version()["unrecorded"]


def test_the_report_header_names_runs_whose_code_no_commit_holds(tmp_path):
    from types import SimpleNamespace

    from ropim.suite.reproduce import provenance_note

    def run(name: str, code: dict) -> SimpleNamespace:
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps({"code": code}))
        config = SimpleNamespace(run=SimpleNamespace(output_dir=str(tmp_path), name=name))
        return SimpleNamespace(config=config, label=name)

    clean = run("a_seed0", {"git_dirty": False, "unrecorded": []})
    assert provenance_note([clean]) == ""
    new = run("b_seed0", {"git_dirty": True, "unrecorded": ["/home/me/methods/b.py"]})
    note = provenance_note([clean, new])
    assert "Not reproducible from a commit" in note and "b_seed0: /home/me/methods/b.py" in note
    assert "a_seed0" not in note
