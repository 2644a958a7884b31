"""Evaluate one pre-training run with the classification protocols (k-NN, linear probe,
fine-tune); returns the measurements, the suite writes them."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from downstream.classification.finetune import finetune_accuracy
from downstream.classification.linear_probe import (
    augmented_linear_probe_accuracy,
    linear_probe_accuracy,
)
from downstream.classification.lowshot import ProbeHeadInit, fraction_tag, labelled_subset
from downstream.classification.settings import ClassificationSettings, settings_for_method
from downstream.encoder import finetune_fingerprint, load_pretrained_encoder
from ropim.harness.config import Config
from ropim.harness.data.datasets import load_images
from ropim.harness.data.transforms import eval_transform, pretrain_transform
from ropim.harness.data.views import SeededViews
from ropim.harness.errors import DataError
from ropim.harness.knn import knn_accuracy
from ropim.harness.probe import extract_features
from ropim.harness.registry import available_methods, method_class
from ropim.harness.tasks import TaskOutcome


def run_classification(
    run_dir: Path,
    settings: ClassificationSettings,
    after_step: Sequence[Callable[[int], None]] = (),
) -> TaskOutcome:
    """Run each configured protocol on the run's newest checkpoint."""
    backbone, cfg = load_pretrained_encoder(run_dir)
    settings, sources = settings_for_method(settings, _protocol_recipes(cfg.method.get("name")))
    seed = cfg.run.seed
    transform = eval_transform(cfg.data, cfg.model.img_size, cfg.model.in_chans)
    train_images = load_images(cfg.data, "train")
    val_images = load_images(cfg.data, "val")
    num_classes = len(_classes(train_images))
    if num_classes < 2:
        raise DataError(
            f"classification needs at least 2 classes; the train split of data.root="
            f"{cfg.data.root} holds {num_classes} ({_classes(train_images)}): every protocol "
            f"would score 100%. Evaluate on a labelled folder with several classes"
        )
    measurements: list[tuple[str, str, float]] = []
    details: dict[str, Any] = {"settings": asdict(settings), "sources": sources}

    def add(protocol: str, metric: str, value: float) -> None:
        measurements.append((protocol, metric, value))

    frozen = {"knn", "linear"} & set(settings.protocols)
    if frozen:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        backbone.to(device)
        train_x, train_y = extract_features(
            backbone, SeededViews(train_images, transform, seed), device, desc="features (train)"
        )
        val_x, val_y = extract_features(
            backbone, SeededViews(val_images, transform, seed), device, desc="features (val)"
        )
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
            probe_train, probe_val = x_train, x_val
            if lin.layer is not None:  # another block than the k-NN's: extract again

                def at_layer(images: Any, split: str) -> torch.Tensor:
                    views = SeededViews(images, transform, seed)
                    desc = f"features (block {lin.layer}, {split})"
                    found = extract_features(backbone, views, device, desc=desc, layer=lin.layer)
                    return torch.from_numpy(found[0][settings.feature])

                probe_val = at_layer(val_images, "val")
                if not lin.augment:
                    probe_train = at_layer(train_images, "train")
            if lin.augment:
                views = SeededViews(train_images, probe_transform(cfg, lin.crop_scale), seed)
                acc = augmented_linear_probe_accuracy(
                    backbone,
                    views,
                    settings.feature,
                    probe_val,
                    y_val,
                    num_classes,
                    lin,
                    seed,
                    device,
                    cfg.data.num_workers,
                )
            else:
                acc = linear_probe_accuracy(
                    probe_train, y_train, probe_val, y_val, num_classes, lin, seed
                )
            add("linear", "top1", acc)
            add("linear", "seconds", time.perf_counter() - start)
    if "finetune" in settings.protocols:
        start = time.perf_counter()
        fresh, _ = load_pretrained_encoder(  # a shared relative bias becomes per-layer copies
            run_dir, drop_path=settings.finetune.drop_path, per_layer_bias=True
        )
        result = finetune_accuracy(
            fresh,
            cfg,
            settings.finetune,
            num_classes,
            seed,
            run_dir / "classification_finetune",
            finetune_fingerprint(run_dir, settings.finetune),
            after_step,
        )
        add("finetune", "top1", result["top1"])  # the last epoch
        add("finetune", "top1_best", result["top1_best"])  # the best epoch, as papers report
        add("finetune", "seconds", time.perf_counter() - start)
        details["finetune"] = result
    if "lowshot" in settings.protocols:
        low = settings.lowshot
        details["lowshot"] = {}
        for fraction, epochs in zip(low.fractions, low.epochs, strict=True):
            start = time.perf_counter()
            tag = fraction_tag(fraction)
            chosen = labelled_subset(train_images, fraction, seed, low.subsets.get(fraction))
            batch = min(low.batch_size or settings.finetune.batch_size, len(chosen))
            # the recipe's warmup, at most a tenth of the (short) schedule
            warmup = min(settings.finetune.warmup_epochs, 0.1 * epochs)
            recipe = replace(
                settings.finetune,
                epochs=epochs,
                batch_size=batch,
                warmup_epochs=warmup,
                base_lr=low.base_lr or settings.finetune.base_lr,
                drop_path=_unless_none(low.drop_path, settings.finetune.drop_path),
                label_smoothing=_unless_none(
                    low.label_smoothing, settings.finetune.label_smoothing
                ),
            )
            fresh, _ = load_pretrained_encoder(
                run_dir, drop_path=recipe.drop_path, per_layer_bias=True
            )
            fingerprint = finetune_fingerprint(run_dir, recipe) | {"labelled": len(chosen)}
            init_head = None
            if low.head == "probe":  # LP-FT
                init_head = ProbeHeadInit(settings.linear, low.probe_steps, seed)
                fingerprint |= {"head": "probe", "probe_steps": low.probe_steps,
                                "probe": asdict(settings.linear)}  # fmt: skip
            result = finetune_accuracy(
                fresh, cfg, recipe, num_classes, seed, run_dir / f"classification_lowshot_{tag}",
                fingerprint, after_step, train_indices=chosen, every_epoch=False,
                init_head=init_head,
            )  # fmt: skip
            add("lowshot", f"top1_{tag}", result["top1"])  # after the last step: no val peeking
            add("lowshot", f"seconds_{tag}", time.perf_counter() - start)
            digest = hashlib.sha256(",".join(map(str, chosen)).encode()).hexdigest()
            details["lowshot"][tag] = result | {
                "labelled_images": len(chosen),
                "labelled_sha256": digest,  # equal for every method at this seed
            }
    return TaskOutcome(measurements, details)


def _unless_none(value: Any, default: Any) -> Any:
    return default if value is None else value


def probe_transform(cfg: Config, crop_scale: list[float]) -> Any:
    """MAE's probe view: RandomResizedCrop (bicubic) + flip, normalised as pre-training was
    (main_linprobe.py:132-141)."""
    view = dataclasses.replace(cfg.data, crop_scale=crop_scale, interpolation="bicubic")
    return pretrain_transform(view, cfg.model.img_size, cfg.model.in_chans)


def _protocol_recipes(method: str | None) -> Mapping[str, Any]:
    """The run's method's published protocol recipes; none for the random-init floor or
    imported weights (they take the adapter's defaults)."""
    if not method or method not in available_methods():
        return {}
    return method_class(method).protocol_recipes


def _classes(dataset: Any) -> list[str]:
    inner = getattr(dataset, "dataset", dataset)  # a Subset when data.limit is set
    return list(inner.classes)
