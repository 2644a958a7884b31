"""Classification protocols beat chance after a tiny pre-train; results appends are atomic."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from downstream.classification.settings import classification_settings
from downstream.encoder import load_pretrained_encoder
from ropim.harness.config import load_config
from ropim.harness.errors import CheckpointError, ConfigError
from ropim.harness.knn import knn_predict
from ropim.harness.pretrain import pretrain
from ropim.suite.results import RESULT_COLUMNS, append_results, read_results
from tests.conftest import TINY_CONFIG, SimulatedCrash, crash_after, evaluate

TINY_CLASSIFICATION = {
    "knn": {"k": 10},
    "linear": {"epochs": 30, "batch_size": 64, "warmup_epochs": 3, "optimizer": "sgd"},
    "finetune": {
        "epochs": 10,
        "batch_size": 32,
        "base_lr": 3.0e-3,
        "lr_batch_divisor": 32,
        "layer_decay": 0.9,
        "warmup_epochs": 0.5,
        "mixup": 0.0,
        "cutmix": 0.0,
        "rand_augment": None,
        "random_erasing": 0.0,
        "crop_scale": [0.67, 1.0],
        "hflip": 0.0,
    },
}


def test_knn_votes_are_similarity_weighted():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    query = torch.tensor([[0.1, 1.0], [1.0, 0.05]])
    assert knn_predict(bank, labels, query, num_classes=2, k=3).tolist() == [1, 0]


def test_each_protocol_beats_chance_after_a_tiny_pretrain(tmp_path):
    cfg = load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", "train.epochs=2"])
    run_dir = pretrain(cfg)
    results = tmp_path / "results.csv"
    rows = evaluate("classification", run_dir, TINY_CLASSIFICATION, results)
    top1 = {r["protocol"]: r["value"] for r in rows if r["metric"] == "top1"}
    assert set(top1) == {"knn", "linear", "finetune"}
    # Chance is 10% (10 balanced classes); 20% on 256 images is more than 5 sigma above it.
    assert all(value > 0.2 for value in top1.values()), top1
    table = read_results(results)
    assert list(table.columns) == RESULT_COLUMNS and len(table) == 7  # + finetune best epoch
    assert set(table["method"]) == {"ropim"} and set(table["seed"]) == {0}
    assert (table["pretrain_images_per_s"] > 0).all()
    assert (run_dir / "classification.json").is_file()


def test_encoder_loading_names_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="not a pre-training run"):
        load_pretrained_encoder(tmp_path)
    with pytest.raises(ConfigError, match="unknown classification.protocols entry 'svm'"):
        classification_settings({"protocols": ["svm"]})
    with pytest.raises(ConfigError, match="unknown config key classification.linear.epoch"):
        classification_settings({"linear": {"epoch": 3}})


def _row(value: float) -> dict:
    return {
        "run_id": "c/r",
        "method": "ropim",
        "task": "classification",
        "protocol": "knn",
        "metric": "top1",
        "value": value,
        "seed": 0,
        "recorded_at": "2026-12-02T00:00:00",
    }


def test_results_append_keeps_old_rows_and_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    append_results(path, [_row(0.5), _row(0.6)])
    append_results(path, [_row(0.7)])
    assert read_results(path)["value"].tolist() == [0.5, 0.6, 0.7]
    before = path.read_bytes()

    real_fsync = os.fsync

    def crash(fd):  # the process dies after writing the temporary file, before the rename
        real_fsync(fd)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        append_results(path, [_row(0.8)] * 1000)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.read_bytes() == before
    with path.open() as handle:
        assert [float(r["value"]) for r in csv.DictReader(handle)] == [0.5, 0.6, 0.7]
    append_results(path, [_row(0.9)])
    assert read_results(path)["value"].tolist() == [0.5, 0.6, 0.7, 0.9]
    with pytest.raises(ValueError, match="unknown result columns"):
        append_results(path, [{"accuracy": 1.0}])


# Every augmentation that draws from Python's `random` (timm's RandAugment, random erasing,
# crops) or NumPy (mixup/cutmix) is on, so equal weights prove they are seeded.
AUGMENTED_FINETUNE = {
    "protocols": ["finetune"],
    "finetune": TINY_CLASSIFICATION["finetune"]
    | {
        "epochs": 1,
        "mixup": 0.8,
        "cutmix": 1.0,
        "rand_augment": "rand-m9-mstd0.5-inc1",
        "random_erasing": 0.25,
        "hflip": 0.5,
        "checkpoint_every": 3,
        "log_every": 2,
    },
}


def _finetuned_weights(run_dir):
    folder = run_dir / "classification_finetune" / "checkpoints"
    return load_file(str(folder / (folder / "latest").read_text() / "model.safetensors"))


def test_killed_finetune_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, capsys):
    import random

    cfg = load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", "train.epochs=0.5"])
    run_dir = pretrain(cfg)
    random.seed(1)  # the caller's streams must not matter
    straight = evaluate("classification", run_dir, AUGMENTED_FINETUNE, tmp_path / "a.csv")
    weights = _finetuned_weights(run_dir)
    assert json.loads((run_dir / "classification.json").read_text())["finetune"]["steps"] == 8
    shutil.rmtree(run_dir / "classification_finetune")

    random.seed(2)
    with pytest.raises(SimulatedCrash):
        evaluate(
            "classification", run_dir, AUGMENTED_FINETUNE, tmp_path / "b.csv", [crash_after(5)]
        )
    latest = run_dir / "classification_finetune" / "checkpoints" / "latest"
    assert latest.read_text() == "step_00000003"
    capsys.readouterr()
    resumed = evaluate("classification", run_dir, AUGMENTED_FINETUNE, tmp_path / "b.csv")
    assert "resuming from step 3" in capsys.readouterr().out
    again = _finetuned_weights(run_dir)
    assert weights.keys() == again.keys()
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    top1 = [[r["value"] for r in rows if r["metric"] == "top1"] for rows in (straight, resumed)]
    assert top1[0] == top1[1]
    steps = [int(r["step"]) for r in csv.DictReader(latest.parent.with_name("metrics.csv").open())]
    assert steps == [2, 4, 6, 8]

    changed = AUGMENTED_FINETUNE | {"finetune": AUGMENTED_FINETUNE["finetune"] | {"epochs": 2}}
    with pytest.raises(ConfigError, match="other settings .*settings.epochs: 1.0 -> 2.0"):
        evaluate("classification", run_dir, changed, tmp_path / "c.csv")


def test_randaugment_at_magnitude_ten_posterizes_to_black_instead_of_failing():
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    from downstream.classification.finetune import finetune_transform
    from downstream.classification.settings import FinetuneSettings

    cfg = load_config(TINY_CONFIG)
    transform = finetune_transform(cfg, FinetuneSettings())
    (augment,) = [t for t in transform.transforms[1].transforms if isinstance(t, RandAugment)]
    (op,) = [op for op in augment.ops if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # the level that asks for 0 bits
    image = Image.new("RGB", (28, 28), (200, 120, 40))
    assert op(image).getextrema() == ((0, 0), (0, 0), (0, 0))
    op.magnitude = 5
    assert op(image).getextrema() != ((0, 0), (0, 0), (0, 0))


def _mae_lars_reference(params, grads_per_step, lr, momentum=0.9, trust=0.001):
    """MAE's update rule written out (util/lars.py): trust ratio on >= 2-D tensors, momentum."""
    params = [p.clone() for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, g, mu in zip(params, grads, buffers, strict=True):
            step = g
            if p.ndim > 1:
                w_norm, g_norm = p.norm(), g.norm()
                if w_norm > 0 and g_norm > 0:
                    step = g * (trust * w_norm / g_norm)
            mu.mul_(momentum).add_(step)
            p.add_(mu, alpha=-lr)
    return params


def test_lars_is_maes_rule_with_momentum_and_trust_ratio():
    from downstream.classification.linear_probe import mae_lars

    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 3)
    start = [p.detach().clone() for p in layer.parameters()]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    optimizer = mae_lars(layer, lr=0.5)
    for step_grads in grads:
        for p, g in zip(layer.parameters(), step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    expected = _mae_lars_reference(start, grads, lr=0.5)
    for got, want in zip(layer.parameters(), expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    # Both parts are visible: plain SGD (no trust ratio) and no-momentum LARS land elsewhere.
    sgd = [p - 0.5 * sum(g[i] for g in grads) for i, p in enumerate(start)]
    no_momentum = _mae_lars_reference(start, grads, lr=0.5, momentum=0.0)
    weight = layer.weight.detach()
    assert not torch.allclose(weight, sgd[0], atol=1e-3)
    assert not torch.allclose(weight, no_momentum[0], atol=1e-6)
    assert not torch.allclose(layer.bias.detach(), no_momentum[1], atol=1e-6)


def test_augmented_probe_trains_through_the_frozen_encoder(monkeypatch):
    from downstream.classification import linear_probe
    from downstream.classification.evaluate import probe_transform
    from downstream.classification.linear_probe import (
        augmented_linear_probe_accuracy,
    )
    from downstream.classification.settings import LinearSettings
    from ropim.harness.data.datasets import load_images
    from ropim.harness.data.transforms import eval_transform
    from ropim.harness.data.views import SeededViews
    from ropim.harness.probe import extract_features
    from ropim.harness.runtime import build_encoder

    cfg = load_config(TINY_CONFIG)
    backbone = build_encoder(cfg)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    train, val = load_images(cfg.data, "train"), load_images(cfg.data, "val")
    evaluation = eval_transform(cfg.data, cfg.model.img_size, cfg.model.in_chans)
    val_x, val_y = extract_features(backbone, SeededViews(val, evaluation, 0), torch.device("cpu"))
    seen: list[torch.Tensor] = []
    pooled = backbone.pooled_features

    def spy(images, layer=None):
        seen.append(images.clone())
        return pooled(images, layer)

    backbone.pooled_features = spy
    monkeypatch.setattr(linear_probe, "FEATURE_CHUNK", 8)  # a batch of 32 in 4 encoder passes
    recipe = LinearSettings(epochs=3, batch_size=32, warmup_epochs=1, optimizer="sgd", base_lr=1.0)
    views = SeededViews(train, probe_transform(cfg, [0.08, 1.0]), seed=0)
    acc = augmented_linear_probe_accuracy(
        backbone,
        views,
        "cls",
        torch.from_numpy(val_x["cls"]),
        torch.from_numpy(val_y),
        10,
        recipe,
        seed=0,
        device=torch.device("cpu"),
    )
    per_epoch = len(train) // 32
    # every step's features come through the encoder, 8 images at a time
    assert len(seen) == 3 * per_epoch * 4 and {len(images) for images in seen} == {8}
    views.set_epoch(0)
    first = views[0][0]
    views.set_epoch(1)
    assert not torch.equal(first, views[0][0])  # ...of a new random view each epoch
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert 0.0 <= acc <= 1.0


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "beit_base_patch16_224"])
def test_finetune_head_is_mean_pool_fresh_fc_norm_and_a_tiny_linear(name):
    from downstream.classification.finetune import published_head
    from ropim.harness.backbone import ViTBackbone

    torch.manual_seed(0)
    vit = ViTBackbone(name, 28, 7, depth=2, embed_dim=32, num_heads=2).vit
    published_head(vit, 10)
    assert isinstance(vit.norm, torch.nn.Identity)  # no final norm on the tokens
    assert torch.equal(vit.fc_norm.weight, torch.ones(32))  # a fresh LayerNorm after pooling
    assert vit.head.weight.std() < 1e-4 and torch.equal(vit.head.bias, torch.zeros(10))
    images = torch.randn(2, 3, 28, 28)
    tokens = vit.forward_features(images)
    expected = vit.head(vit.fc_norm(tokens[:, vit.num_prefix_tokens :].mean(dim=1)))
    torch.testing.assert_close(vit(images), expected)


def test_linear_probe_batchnorm_normalises_per_device_group():
    """MAE's probe normalises per GPU (512 of 16384, no SyncBN): each group of ``bn_batch``
    features with its own statistics; the running statistics follow the first group."""
    from downstream.classification.linear_probe import PerDeviceBatchNorm

    torch.manual_seed(0)
    x = torch.cat([torch.randn(4, 3), 5 + 3 * torch.randn(4, 3)])
    grouped = PerDeviceBatchNorm(3, 4, affine=False, eps=1e-6)
    single = torch.nn.BatchNorm1d(3, affine=False, eps=1e-6)
    out = grouped(x)
    halves = [torch.nn.BatchNorm1d(3, affine=False, eps=1e-6) for _ in range(2)]
    expected = torch.cat([halves[0](x[:4]), halves[1](x[4:])])
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(grouped.running_mean, halves[0].running_mean)
    assert not torch.allclose(out, single(x), atol=1e-2)  # one group of 8 differs
    whole = PerDeviceBatchNorm(3, None, affine=False, eps=1e-6)
    assert torch.allclose(whole(x), single(x))
