"""Low-shot fine-tuning and the frozen linear segmentation probe: the labelled subset is the same
for every method at a seed and stratified by class; the probes train and score in range."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import yaml

from downstream.classification.finetune import published_head
from downstream.classification.lowshot import (
    ProbeHeadInit,
    fold_batchnorm,
    fraction_tag,
    item_labels,
    labelled_subset,
)
from downstream.classification.settings import LinearSettings
from ropim.harness.config import DataSection, load_config
from ropim.harness.data.datasets import load_images
from ropim.harness.data.transforms import eval_transform
from ropim.harness.data.views import SeededViews
from ropim.harness.encoder_run import write_encoder_run
from ropim.harness.errors import ConfigError
from ropim.harness.pretrain import pretrain
from ropim.harness.runtime import build_encoder, weights_digest
from tests.conftest import PROJECT_ROOT, TINY_CONFIG, evaluate, tiny_backbone

FINETUNE = {"batch_size": 16, "mixup": 0.0, "cutmix": 0.0, "rand_augment": None,
            "random_erasing": 0.0}  # fmt: skip


def test_subsets_are_stratified_seeded_and_method_free():
    train = load_images(DataSection(dataset="mnist"), "train")
    labels = item_labels(train)
    one = labelled_subset(train, 0.01, seed=0)
    assert one == labelled_subset(train, 0.01, seed=0)  # a function of (seed, fraction) alone
    assert one != labelled_subset(train, 0.01, seed=1)
    per_class = Counter(labels)
    chosen = Counter(labels[i] for i in one)
    assert chosen == {c: max(1, round(0.01 * n)) for c, n in per_class.items()}
    assert set(labelled_subset(train, 0.1, seed=0)) != set(one)
    assert fraction_tag(0.01) == "1pct" and fraction_tag(0.1) == "10pct"
    assert fraction_tag(0.005) == "0p5pct"
    with pytest.raises(ConfigError, match="lists file names, but the dataset has no files"):
        labelled_subset(train, 0.01, 0, subset_file=str(TINY_CONFIG))


def test_a_folded_probe_is_the_same_function_as_batchnorm_then_linear():
    torch.manual_seed(0)
    probe = torch.nn.Sequential(
        torch.nn.BatchNorm1d(6, affine=False, eps=1e-6), torch.nn.Linear(6, 3)
    ).eval()
    probe[0].running_mean.normal_()
    probe[0].running_var.uniform_(0.1, 4.0)
    head = torch.nn.Linear(6, 3)
    fold_batchnorm(probe, head)
    x = torch.randn(10, 6)
    torch.testing.assert_close(head(x), probe(x))


def test_lp_ft_starts_the_fine_tune_from_a_trained_probe():
    """LP-FT's first stage writes a probe into the fine-tune head: on 100 labelled digits the
    random-init encoder's head goes from chance to well above it, and the head scores what
    the probe measured (the fold is exact)."""
    backbone = tiny_backbone()
    model = backbone.vit
    published_head(model, 10)
    data = DataSection(dataset="mnist")
    view = eval_transform(data, 28, 1)
    train = load_images(data, "train")
    labelled = torch.utils.data.Subset(train, labelled_subset(train, 0.025, seed=0))
    val = torch.utils.data.Subset(load_images(data, "val"), range(300))
    recipe = LinearSettings(batch_size=256, base_lr=1.0, warmup_epochs=1, optimizer="sgd")
    init = ProbeHeadInit(recipe, steps=150, seed=0)
    found = init(model, SeededViews(labelled, view, 0), SeededViews(val, view, 0))
    assert found["probe_steps"] == 150
    images, labels = next(iter(torch.utils.data.DataLoader(SeededViews(val, view, 0), 300)))
    model.eval()
    with torch.no_grad():
        accuracy = float((model(images).argmax(1) == labels).float().mean())
    assert accuracy == pytest.approx(found["probe_top1"])
    assert accuracy > 0.4  # chance is 0.1; a fresh head (std 2e-5) predicts one class


def test_every_method_fine_tunes_on_the_same_labelled_images(tmp_path):
    cfg = load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", "train.epochs=0.3"])
    pretrained = pretrain(cfg)
    floor_cfg = load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", "run.name=floor"])
    floor = write_encoder_run(floor_cfg, build_encoder(floor_cfg), {"method": {"name": "floor"}})
    raw = {"protocols": ["lowshot"], "lowshot": {"fractions": [0.05], "epochs": [3]},
           "finetune": FINETUNE}  # fmt: skip
    digests = []
    for run_dir in (pretrained, floor):
        before = weights_digest(build_encoder(cfg))
        (row, _) = evaluate("classification", run_dir, raw, tmp_path / "r.csv")
        assert row["protocol"] == "lowshot" and row["metric"] == "top1_5pct"
        assert 0 <= row["value"] <= 1
        found = json.loads((run_dir / "classification.json").read_text())["lowshot"]["5pct"]
        labelled = len(labelled_subset(load_images(cfg.data, "train"), 0.05, 0))
        batch = min(16, labelled) - min(16, labelled) % 2  # capped at the subset, even (mixup)
        assert found["labelled_images"] == labelled and found["steps"] == 3 * (labelled // batch)
        digests.append(found["labelled_sha256"])
        assert weights_digest(build_encoder(cfg)) == before
    assert digests[0] == digests[1]


def test_the_linear_segmentation_probe_trains_on_frozen_features(tmp_path):
    run_dir = pretrain(
        load_config(
            TINY_CONFIG,
            [
                f"run.output_dir={tmp_path}",
                "train.epochs=0.3",
                "model.img_size=32",
                "model.patch_size=8",
            ],
        )  # fmt: skip
    )
    tiny = yaml.safe_load((PROJECT_ROOT / "configs" / "table2_tiny.yaml").read_text())
    raw = tiny["segmentation"] | {"protocols": ["linear"], "linear": {"epochs": 4}}
    rows = evaluate("segmentation", run_dir, raw, tmp_path / "r.csv")
    scores = {r["metric"]: r["value"] for r in rows if r["protocol"] == "linear"}
    assert set(scores) == {"mIoU", "mAcc", "aAcc", "seconds"} and 0 <= scores["mIoU"] <= 1
    linear = json.loads((run_dir / "segmentation.json").read_text())["linear"]
    assert linear["last_loss"] < linear["first_loss"]
    with pytest.raises(ConfigError, match="choose one or more of"):
        evaluate("segmentation", run_dir, raw | {"protocols": ["linaer"]}, tmp_path / "r.csv")


def test_lowshot_settings_reach_the_fine_tune_recipe(tmp_path, monkeypatch):
    from downstream.classification import evaluate as classification

    seen = []

    def capture(backbone, cfg, recipe, *args, **kwargs):
        seen.append((recipe, kwargs.get("init_head")))
        return {"top1": 0.5, "steps": 1}

    monkeypatch.setattr(classification, "finetune_accuracy", capture)
    cfg = load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", "train.epochs=0.2"])
    run_dir = pretrain(cfg)
    own = {"fractions": [0.05], "epochs": [3], "head": "probe", "base_lr": 1e-4,
           "drop_path": 0.0, "label_smoothing": 0.0}  # fmt: skip
    for lowshot in (own, {"fractions": [0.05], "epochs": [3]}):
        raw = {"protocols": ["lowshot"], "lowshot": lowshot, "finetune": FINETUNE}
        evaluate("classification", run_dir, raw, tmp_path / "r.csv")
    (mine, probe), (default, fresh) = seen
    assert (mine.base_lr, mine.drop_path, mine.label_smoothing) == (1e-4, 0.0, 0.0)
    assert isinstance(probe, ProbeHeadInit) and fresh is None
    assert (default.drop_path, default.label_smoothing) == (0.1, 0.1)  # the fine-tune's
