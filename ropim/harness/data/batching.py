"""Which images make each step's batch: a seeded permutation per epoch, split evenly over
the ranks."""

from __future__ import annotations

import torch

from ropim.harness.errors import ConfigError
from ropim.harness.seeding import derive_seed


def epoch_batches(
    num_items: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
) -> list[list[int]]:
    """This rank's batches of one epoch; ``start_batch`` skips batches already trained on."""
    order = torch.randperm(
        num_items, generator=torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
    )
    per_rank = num_items // world_size
    mine = order[: per_rank * world_size][rank::world_size]
    count = per_rank // batch_size
    return [mine[i * batch_size : (i + 1) * batch_size].tolist() for i in range(start_batch, count)]


def steps_per_epoch(
    num_items: int, batch_size: int, world_size: int = 1, key: str = "train.batch_size"
) -> int:
    """Whole batches per epoch; ``key`` names the setting at fault when there are none."""
    steps = (num_items // world_size) // batch_size
    if steps == 0:
        raise ConfigError(
            f"the dataset has {num_items} images, fewer than {key}={batch_size} × "
            f"{world_size} device(s); lower {key}"
        )
    return steps
