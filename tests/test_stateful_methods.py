"""Stateful methods and the two baselines that need them: data2vec's EMA teacher and its
ramp, MaskFeat's HOG targets. Each loss is checked against the official computation written
out step by step from the official code (fairseq data2vec_vision.py, SlowFast HOGLayerC and
_get_hog_label_2d), not through the method's own helpers."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from baselines._block_masking import block_mask
from baselines.data2vec import annealed_decay
from baselines.maskfeat import hog_histograms
from ropim.harness.config import load_config
from ropim.harness.pretrain import pretrain
from ropim.harness.registry import build_method, method_class
from tests.conftest import PROJECT_ROOT, TINY_CONFIG, tiny_backbone

EXAMPLES = str(Path(__file__).parent / "method_examples")
D2V = "method={name: data2vec, min_block_tokens: 2, top_k: 2}"


def _digits(n: int = 4) -> torch.Tensor:
    from ropim.harness.data.datasets import MnistDigits

    images = MnistDigits("train").images[:n].float().div(255).sub(0.13).div(0.31)
    return images.expand(-1, 3, -1, -1).contiguous()


def test_block_masks_hide_whole_blocks_and_replay_from_the_generator():
    a = block_mask(8, (7, 7), 29, 16, 49, torch.Generator().manual_seed(1), "cpu")
    b = block_mask(8, (7, 7), 29, 16, 49, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(a, b)
    counts = a.sum(dim=1)
    assert (counts >= 16).all() and (counts <= 49).all()
    assert counts.float().mean() >= 25  # about 60% of 49, blocks may overshoot or stop short


def test_data2vec_loss_equals_fairseqs_computation_on_the_same_weights():
    method = build_method({"name": "data2vec", "min_block_tokens": 2, "top_k": 2}, tiny_backbone())
    with torch.no_grad():  # a teacher that differs from the student, as after training
        for p in method.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    method.eval()  # no drop path in the student, so both computations see the same network
    images = _digits()
    ours = method.compute(images, torch.Generator().manual_seed(3))
    hidden = ours.state["hidden"].bool()
    # fairseq data2vec_vision.py:246-337, with the suite's absolute positions added to both
    student, teacher = method.backbone, method.teacher
    x = student.embed_patches(images)
    with torch.no_grad():
        y = student.add_position(x)
        layers = []
        for block in teacher.vit.blocks:
            y = block(y)
            layers.append(y[:, 1:])
        y = sum(layers[-2:]) / 2  # average_top_k_layers
        y = F.layer_norm(y.float(), y.shape[-1:])  # layer_norm_targets
        y = y[hidden].float()
    w = hidden.unsqueeze(-1).float()
    masked = x * (1 - w) + method.mask_token * w
    out = student.run_blocks(student.add_position(masked))[:, 1:]  # encoder.norm, cls dropped
    out = out[hidden].float()
    loss = F.smooth_l1_loss(out, y, reduction="none", beta=2.0).sum(dim=-1)
    loss = loss * (1 / math.sqrt(out.shape[-1]))
    official = loss.sum() / loss.numel()  # fairseq normalises by sample_size
    assert torch.allclose(ours.loss, official, rtol=1e-6, atol=1e-7)


def test_data2vec_ema_ramp_and_update_follow_fairseq():
    # get_annealed_rate(start, end, curr, total) = end - (end - start) * (1 - curr / total)
    assert annealed_decay(0.999, 0.9998, 0, 100) == pytest.approx(0.999)
    assert annealed_decay(0.999, 0.9998, 50, 100) == pytest.approx(0.9994)
    assert annealed_decay(0.999, 0.9998, 100, 100) == 0.9998
    method = build_method({"name": "data2vec", "min_block_tokens": 2, "top_k": 2}, tiny_backbone())
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    student = method.backbone.state_dict()
    from ropim.harness.run_progress import RunProgress

    method.after_step(RunProgress(step=30, total_steps=100, steps_per_epoch=10))
    decay = 0.9998 - (0.9998 - 0.999) * (1 - 30 / 100)
    for key, value in method.teacher.state_dict().items():
        if value.is_floating_point() and key in dict(method.teacher.named_parameters()):
            expected = decay * before[key] + (1 - decay) * student[key]
            assert torch.allclose(value, expected, atol=1e-6), key
    assert float(method.current_decay) == pytest.approx(decay)


def _slowfast_hog(image: np.ndarray, bins: int, cell: int) -> np.ndarray:
    """HOGLayerC pixel by pixel: reflect pad 1, the 3x3 kernel [[1,0,-1],[2,0,-2],[1,0,-1]]
    (cross-correlation, as conv2d) for gx and its transpose for gy, magnitude into bin
    floor(atan2(gx, gy) / pi * bins) mod bins, summed per cell, L2 over the bins."""
    c, h, w = image.shape
    weights = (1.0, 2.0, 1.0)
    out = np.zeros((c, bins, h // cell, w // cell))
    for ch in range(c):
        padded = np.pad(image[ch].astype(np.float64), 1, mode="reflect")
        for i in range(h):
            for j in range(w):
                win = padded[i : i + 3, j : j + 3]
                # kernel x window, summed as weighted differences of mirrored pixels: exact 0
                # where they are equal (a sector boundary in exact arithmetic)
                gx = sum(k * (win[r, 0] - win[r, 2]) for r, k in enumerate(weights))
                gy = sum(k * (win[0, q] - win[2, q]) for q, k in enumerate(weights))
                sector = int(math.floor(math.atan2(gx, gy) / math.pi * bins)) % bins
                out[ch, sector, i // cell, j // cell] += math.hypot(gx, gy)
    norms = np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out / norms


def test_hog_equals_slowfasts_hog_layer_pixel_by_pixel():
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = hog_histograms(images, bins=9, cell=8).numpy()
    for b in range(2):
        assert np.allclose(ours[b], _slowfast_hog(images[b].numpy(), 9, 8), atol=1e-5)


def test_maskfeat_loss_equals_slowfasts_targets_and_mse():
    method = build_method({"name": "maskfeat", "cell_size": 7}, tiny_backbone(img_size=28))
    method.eval()
    images = _digits()
    ours = method.compute(images, torch.Generator().manual_seed(5))
    hidden = ours.state.bool()
    hog = torch.from_numpy(
        np.stack([_slowfast_hog(im.numpy(), 9, 7) for im in images])
    ).float()  # (B, 3, 9, 4, 4)
    # masked.py _get_hog_label_2d: flatten(1, 2), permute, unfold rows and columns, flatten
    feat = hog.flatten(1, 2).permute(0, 2, 3, 1)
    unfold = feat.shape[1] // 4
    feat = feat.unfold(1, unfold, unfold).unfold(2, unfold, unfold).flatten(1, 2).flatten(2)
    official = F.mse_loss(ours.prediction[hidden].float(), feat[hidden])
    assert torch.allclose(ours.loss, official, rtol=1e-5)


def test_maskfeat_with_two_cells_per_patch_orders_targets_as_slowfast():
    from baselines.maskfeat import hog_targets

    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ours = hog_targets(images, patch=16, bins=9, cell=8)  # 2x2 cells per 16-px patch
    hog = torch.from_numpy(_slowfast_hog(images[0].numpy(), 9, 8)).float()[None]
    feat = hog.flatten(1, 2).permute(0, 2, 3, 1)
    feat = feat.unfold(1, 2, 2).unfold(2, 2, 2).flatten(1, 2).flatten(2)
    assert ours.shape == (1, 4, 108) and torch.allclose(ours, feat, atol=1e-5)


def test_the_after_step_hook_runs_after_every_step_before_the_checkpoint(tmp_path):
    cfg = load_config(
        TINY_CONFIG,
        [f"run.output_dir={tmp_path}", "method={name: frozenteacher}", "train.epochs=1"],
    )
    run_dir = pretrain(cfg, method_dirs=(EXAMPLES,))
    folder = run_dir / "checkpoints"
    weights = load_file(str(folder / (folder / "latest").read_text() / "model.safetensors"))
    assert int(weights["updates"]) == 8  # 256 images / 32: the last step's update included
    assert any(k.startswith("teacher.") for k in weights)


def _cli_run(out: Path, name: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ropim", "pretrain", "--config", str(TINY_CONFIG)]
    cmd += [f"run.output_dir={out}", f"run.name={name}", D2V, "train.epochs=3", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, text=True)


def _wait_for_checkpoint(run_dir: Path, process: subprocess.Popen) -> None:
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "latest").is_file():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.2)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_data2vec_run_killed_midway_resumes_to_the_same_student_and_teacher(tmp_path, how):
    straight = _cli_run(tmp_path, "straight")
    assert straight.wait(timeout=300) == 0
    cut = _cli_run(tmp_path, "cut")
    _wait_for_checkpoint(tmp_path / "cut", cut)
    cut.send_signal(how)
    cut.wait(timeout=120)
    latest = (tmp_path / "cut" / "checkpoints" / "latest").read_text()
    assert latest != "step_00000024", "the run finished before the signal: nothing tested"
    resumed = _cli_run(tmp_path, "cut", "--resume")
    assert resumed.wait(timeout=300) == 0

    def final(name: str) -> dict[str, torch.Tensor]:
        folder = tmp_path / name / "checkpoints"
        assert (folder / "latest").read_text() == "step_00000024"
        return load_file(str(folder / "step_00000024" / "model.safetensors"))

    a, b = final("straight"), final("cut")
    assert any(k.startswith("teacher.") for k in a) and a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_the_published_preset_runs_maskfeat_and_data2vec_on_tiny_data(tmp_path):
    from ropim.suite.compare import plan_comparison

    tiny = {"maskfeat": {"cell_size": 7}, "data2vec": {"min_block_tokens": 2, "top_k": 2}}
    for name, method in tiny.items():
        planned = [p for p in plan_comparison("configs/table2_published.yaml") if p.method == name]
        cfg = planned[0].config
        assert cfg.train.epochs == {"maskfeat": 1600, "data2vec": 800}[name]  # the references'
        assert {r.pretrain_epochs for r in method_class(name).references} == {cfg.train.epochs}
        cfg.run.output_dir, cfg.run.name = str(tmp_path), name
        cfg.model.img_size, cfg.model.patch_size = 28, 7
        cfg.model.kwargs = cfg.model.kwargs | {"depth": 2, "embed_dim": 32, "num_heads": 2}
        cfg.data.dataset, cfg.data.root, cfg.data.limit = "mnist", None, 64
        cfg.data.num_workers = 0
        cfg.train.epochs, cfg.train.batch_size, cfg.train.precision = 1, 16, "32-true"
        cfg.train.checkpoint_every, cfg.train.log_every = 2, 2
        cfg.train.reconstruction_images = 2
        cfg.probe.knn_every = 0
        cfg.method = cfg.method | method  # the preset's settings, cells and blocks that fit
        run_dir = pretrain(cfg)
        assert (run_dir / "run.json").is_file()


def test_the_published_card_lists_every_maskfeat_and_data2vec_setting_with_its_source(capsys):
    import csv
    import inspect
    import io

    from ropim.cli import main

    SKIP = ("self", "backbone")
    assert main(["recipes", "--format", "csv", "--config", "configs/table2_published.yaml"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    for name in ("maskfeat", "data2vec"):
        mine = [r for r in rows if r["method"] == name]
        assert {"pretrain", "finetune"} <= {r["protocol"] for r in mine}
        assert all(r["source"].strip() for r in mine)
        cls = method_class(name)
        settings = {r["key"]: r for r in mine if r["protocol"] == "pretrain"}
        keys = [k for k in inspect.signature(cls.__init__).parameters if k not in SKIP]
        for key in keys:  # each of its settings cites its own line, not the recipe's
            assert settings[f"method.{key}"]["source"] != cls.recipe.source, key
        published = {r["key"] for r in mine if r["protocol"] == "finetune"}
        assert "reference.top1_best" in published


def test_export_and_tasks_take_the_encoder_the_method_names(tmp_path):
    from downstream.encoder import load_pretrained_encoder

    folder = tmp_path / "methods"
    folder.mkdir()
    (folder / "teacherout.py").write_text(
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('ft', {EXAMPLES + '/frozenteacher.py'!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n\n\n"
        "class TeacherOut(module.FrozenTeacher):\n"
        "    name = 'teacherout'\n"
        "    encoder_name = 'teacher'  # downstream tasks take the EMA teacher\n"
    )
    for name, dirs, prefix in (
        ("frozenteacher", (EXAMPLES,), "backbone."),
        ("teacherout", (str(folder),), "teacher."),
    ):
        cfg = load_config(
            TINY_CONFIG,
            [f"run.output_dir={tmp_path}", f"run.name={name}", f"method={{name: {name}}}"],
        )
        run_dir = pretrain(cfg, method_dirs=dirs)
        folder_ = run_dir / "checkpoints"
        saved = load_file(str(folder_ / (folder_ / "latest").read_text() / "model.safetensors"))
        encoder, _ = load_pretrained_encoder(run_dir)
        for key, value in encoder.state_dict().items():
            assert torch.equal(value, saved[prefix + key]), (name, key)
        assert not torch.equal(
            saved["teacher.vit.blocks.0.mlp.fc1.weight"],
            saved["backbone.vit.blocks.0.mlp.fc1.weight"],
        )
