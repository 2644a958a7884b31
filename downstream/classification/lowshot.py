"""Low-shot fine-tuning: the semi-supervised protocol of SimCLR, BYOL and MSN — fine-tune with
1% and 10% of the labels. Pre-training matters most where labels are few.

The labelled subset is stratified and seeded by (seed, fraction) alone: every method sees the
same labelled images at a given seed. On ImageNet the 1%/10% subsets are fixed file lists
(SimCLR's ``imagenet_subsets/1percent.txt``, one file name per line); give them with
``classification.lowshot.subsets``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from downstream.classification.linear_probe import (
    head_accuracy,
    shuffled_batches,
    train_linear_head,
)
from downstream.classification.settings import LinearSettings
from ropim.harness.errors import ConfigError, DataError
from ropim.harness.seeding import derive_seed


def fraction_tag(fraction: float) -> str:
    """``0.01`` -> ``1pct`` (metric names: ``top1_1pct``)."""
    return f"{fraction * 100:g}pct".replace(".", "p")


def item_labels(dataset: Any) -> list[int]:
    """Each item's class index, without decoding an image."""
    if isinstance(dataset, torch.utils.data.Subset):
        inner = item_labels(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    for name in ("labels", "targets"):
        found = getattr(dataset, name, None)
        if found is not None:
            return [int(v) for v in found]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def item_names(dataset: Any) -> list[str]:
    """Each item's file name (image folders), for subset lists."""
    if isinstance(dataset, torch.utils.data.Subset):
        inner = item_names(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise ConfigError(
            "classification.lowshot.subsets lists file names, but the dataset has no files "
            "(data.dataset=mnist): leave subsets unset to draw seeded stratified subsets"
        )
    return [Path(path).name for path, _ in samples]


def labelled_subset(
    dataset: Any, fraction: float, seed: int, subset_file: str | None = None
) -> list[int]:
    """Indices of the labelled images: the listed files, or per class a seeded draw of
    ``max(1, round(fraction × class size))`` images."""
    if subset_file:
        path = Path(subset_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"classification.lowshot.subsets: {path} not found")
        wanted = {line.strip() for line in path.read_text().splitlines() if line.strip()}
        names = item_names(dataset)
        chosen = [i for i, name in enumerate(names) if name in wanted]
        missing = len(wanted) - len({names[i] for i in chosen})
        if missing:
            raise DataError(
                f"{path} lists {missing} of {len(wanted)} file(s) that are not in the train "
                f"split (e.g. a list for another dataset)"
            )
        return chosen
    labels = item_labels(dataset)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    generator = torch.Generator().manual_seed(derive_seed(seed, "lowshot", fraction_tag(fraction)))
    chosen = []
    for label in sorted(by_class):
        members = by_class[label]
        take = max(1, round(fraction * len(members)))
        order = torch.randperm(len(members), generator=generator)[:take]
        chosen += [members[i] for i in order.tolist()]
    return sorted(chosen)


@torch.no_grad()
def _pre_logits(model: nn.Module, views: Dataset, device: torch.device) -> tuple[Tensor, Tensor]:
    """What the fine-tune model's head reads (pooled tokens after ``fc_norm``), per image."""
    was_training = model.training
    model.eval()
    features, labels = [], []
    for images, targets in DataLoader(views, batch_size=256):
        tokens = model.forward_features(images.to(device))
        features.append(model.forward_head(tokens, pre_logits=True).float())
        labels.append(torch.as_tensor(targets).to(device))
    model.train(was_training)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def fold_batchnorm(probe: nn.Sequential, head: nn.Linear) -> None:
    """Write ``linear(batchnorm(x))`` of a trained probe (BatchNorm without affine, in eval
    mode) into one linear layer: ``W' = W/σ``, ``b' = b − W'μ``; the same function of x."""
    norm, linear = probe[0], probe[1]
    scale = (norm.running_var + norm.eps).rsqrt()
    weight = linear.weight * scale
    head.weight.copy_(weight)
    head.bias.copy_(linear.bias - weight @ norm.running_mean)


class ProbeHeadInit:
    """LP-FT's first stage (Kumar et al., ICLR 2022): a linear probe trained on the frozen
    encoder's features of the labelled images (their evaluation view), with the linear-probe
    recipe for ``steps`` steps, written into the fine-tune head. A head that starts at chance
    barely moves in the few hundred steps a small labelled set gives, so the fine-tune would
    measure its own optimiser rather than the encoder."""

    def __init__(self, recipe: LinearSettings, steps: int, seed: int) -> None:
        self.recipe, self.steps, self.seed = recipe, steps, seed

    @torch.no_grad()
    def __call__(self, model: nn.Module, labelled: Dataset, val_set: Dataset) -> dict[str, float]:
        device = next(model.parameters()).device
        x_train, y_train = _pre_logits(model, labelled, device)
        batch = min(self.recipe.batch_size, len(x_train))
        per_epoch = math.ceil(len(x_train) / batch)
        recipe = replace(
            self.recipe,
            batch_size=batch,
            epochs=math.ceil(self.steps / per_epoch),
            warmup_epochs=min(self.recipe.warmup_epochs, math.ceil(0.1 * self.steps / per_epoch)),
        )
        batches = shuffled_batches(x_train, y_train, batch, derive_seed(self.seed, "lowshot-probe"))
        with torch.enable_grad():
            probe = train_linear_head(
                batches,
                x_train.shape[1],
                model.head.out_features,
                per_epoch,
                recipe,
                derive_seed(self.seed, "lowshot-probe-head"),
                device,
            )
        fold_batchnorm(probe, model.head)
        x_val, y_val = _pre_logits(model, val_set, device)
        return {
            "probe_top1": head_accuracy(model.head, x_val, y_val),
            "probe_steps": recipe.epochs * per_epoch,
        }
