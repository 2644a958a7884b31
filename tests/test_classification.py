"""Classification protocols beat chance after a tiny pre-train; results appends are atomic."""

from __future__ import annotations

import csv
import os

import pytest
import torch

from downstream.classification.evaluate import evaluate_classification
from downstream.classification.knn import knn_predict
from downstream.classification.settings import classification_settings
from downstream.encoder import load_pretrained_encoder
from ropim.config import load_config
from ropim.errors import CheckpointError, ConfigError
from ropim.results import RESULT_COLUMNS, append_results, read_results
from ropim.trainer import pretrain
from tests.conftest import TINY_CONFIG

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
    rows = evaluate_classification(run_dir, classification_settings(TINY_CLASSIFICATION), results)
    top1 = {r["protocol"]: r["value"] for r in rows if r["metric"] == "top1"}
    assert set(top1) == {"knn", "linear", "finetune"}
    # Chance is 10% (10 balanced classes); 20% on 256 images is more than 5 sigma above it.
    assert all(value > 0.2 for value in top1.values()), top1
    table = read_results(results)
    assert list(table.columns) == RESULT_COLUMNS and len(table) == 6
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
    return {"run_id": "r", "method": "ropim", "protocol": "knn", "metric": "top1", "value": value}


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
