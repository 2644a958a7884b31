"""Low-shot fine-tuning: the semi-supervised protocol of SimCLR, BYOL and MSN — fine-tune with
1% and 10% of the labels. Pre-training matters most where labels are few.

The labelled subset is stratified and seeded by (seed, fraction) alone: every method sees the
same labelled images at a given seed. On ImageNet the 1%/10% subsets are fixed file lists
(SimCLR's ``imagenet_subsets/1percent.txt``, one file name per line); give them with
``classification.lowshot.subsets``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

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
