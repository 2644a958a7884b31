"""Evaluate one pre-training run with the classification protocols; append tidy result rows."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from downstream.classification.finetune import finetune_accuracy
from downstream.classification.knn import knn_accuracy
from downstream.classification.linear_probe import linear_probe_accuracy
from downstream.classification.settings import ClassificationSettings
from downstream.encoder import load_pretrained_encoder
from downstream.rows import RunRows
from ropim.data import SeededViews, eval_transform, load_images
from ropim.probe import extract_features


def evaluate_classification(
    run_dir: str | Path, settings: ClassificationSettings, results_path: str | Path
) -> list[dict[str, Any]]:
    """Run each protocol on the run's newest checkpoint; rows go to ``results_path`` and to
    ``<run>/classification.json``."""
    run_dir = Path(run_dir)
    backbone, cfg = load_pretrained_encoder(run_dir)
    seed = cfg.run.seed
    transform = eval_transform(cfg.data, cfg.model.img_size, cfg.model.in_chans)
    train_images = load_images(cfg.data, "train")
    val_images = load_images(cfg.data, "val")
    num_classes = len(_classes(train_images))
    rows = RunRows(run_dir, "classification")
    add = rows.add

    frozen = {"knn", "linear"} & set(settings.protocols)
    if frozen:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        backbone.to(device)
        train_x, train_y = extract_features(
            backbone, SeededViews(train_images, transform, seed), device
        )
        val_x, val_y = extract_features(backbone, SeededViews(val_images, transform, seed), device)
        x_train = torch.from_numpy(train_x[settings.feature])
        x_val = torch.from_numpy(val_x[settings.feature])
        y_train, y_val = torch.from_numpy(train_y), torch.from_numpy(val_y)
        if "knn" in settings.protocols:
            start = time.perf_counter()
            acc = knn_accuracy(
                x_train,
                y_train,
                x_val,
                y_val,
                num_classes,
                settings.knn.k,
                settings.knn.temperature,
            )
            add("knn", "top1", acc)
            add("knn", "seconds", time.perf_counter() - start)
        if "linear" in settings.protocols:
            start = time.perf_counter()
            lin = settings.linear
            acc = linear_probe_accuracy(
                x_train,
                y_train,
                x_val,
                y_val,
                num_classes,
                epochs=lin.epochs,
                batch_size=lin.batch_size,
                base_lr=lin.base_lr,
                lr_batch_divisor=lin.lr_batch_divisor,
                warmup_epochs=lin.warmup_epochs,
                optimizer=lin.optimizer,
                weight_decay=lin.weight_decay,
                seed=seed,
            )
            add("linear", "top1", acc)
            add("linear", "seconds", time.perf_counter() - start)
    if "finetune" in settings.protocols:
        start = time.perf_counter()
        fresh, _ = load_pretrained_encoder(run_dir, drop_path=settings.finetune.drop_path)
        result = finetune_accuracy(fresh, cfg, settings.finetune, num_classes, seed)
        add("finetune", "top1", result["top1"])
        add("finetune", "seconds", time.perf_counter() - start)
    rows.write(results_path)
    return rows.rows


def _classes(dataset: Any) -> list[str]:
    inner = getattr(dataset, "dataset", dataset)  # a Subset when data.limit is set
    return list(inner.classes)
