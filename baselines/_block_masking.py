"""BEiT-style block-wise masking (Bao et al., ICLR 2022), shared by MaskFeat and data2vec:
rectangles of random area and aspect ratio are added to each image's mask until it holds the
wanted number of tokens (or a round of ten tries adds none).

The algorithm is the one both official code bases use: facebookresearch/SlowFast
``slowfast/datasets/transform.py:776-840`` (``MaskingGenerator``) and facebookresearch/fairseq
``examples/data2vec/models/data2vec_vision.py:192-238`` (``make_mask``). Its random numbers come
from the step's generator (drawn in one call per batch), so a resumed run draws the same masks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TRIES = 10  # rectangles tried per round (both official implementations)
MIN_ASPECT = 0.3  # aspect ratios log-uniform in [0.3, 1/0.3]


def check_block_mask(grid: tuple[int, int], count: int, min_tokens: int) -> None:
    """Refuse settings under which no rectangle can ever be placed (an empty mask)."""
    rows, cols = grid
    if not 0 < count < rows * cols:
        raise ValueError(
            f"mask_ratio gives {count} of {rows * cols} tokens: choose a ratio that hides at "
            f"least one token and leaves one visible"
        )
    if min_tokens > (rows - 1) * (cols - 1):
        raise ValueError(
            f"min_block_tokens={min_tokens} cannot fit a block narrower than the {rows}x{cols} "
            f"token grid (at most {(rows - 1) * (cols - 1)}): lower it"
        )


def block_mask(
    batch: int,
    grid: tuple[int, int],
    count: int,
    min_tokens: int,
    max_tokens: int,
    generator: torch.Generator | None,
    device: torch.device | str,
) -> Tensor:
    """``(B, N)`` float mask, 1.0 = hidden, about ``count`` tokens per image in blocks of
    ``min_tokens``..``max_tokens`` tokens (the last block may overshoot, as in the originals)."""
    rows, cols = grid
    rounds = count  # every round that does not stop adds at least one token
    draws = torch.rand(batch, rounds, TRIES, 4, generator=generator, device=device).cpu()
    low, high = math.log(MIN_ASPECT), math.log(1 / MIN_ASPECT)
    masks = torch.zeros(batch, rows, cols)
    for b in range(batch):
        mask = masks[b]
        hidden = 0
        for round_ in range(rounds):
            if hidden >= count:
                break
            largest = min(count - hidden, max_tokens)
            added = 0
            for area_u, aspect_u, top_u, left_u in draws[b, round_].tolist():
                area = min_tokens + (largest - min_tokens) * area_u
                aspect = math.exp(low + (high - low) * aspect_u)
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if w >= cols or h >= rows:
                    continue
                top = int(top_u * (rows - h + 1))
                left = int(left_u * (cols - w + 1))
                window = mask[top : top + h, left : left + w]
                if 0 < h * w - int(window.sum()) <= largest:
                    added = h * w - int(window.sum())
                    window.fill_(1.0)
                if added:
                    break
            if not added:
                break
            hidden += added
    return masks.flatten(1).to(device)
