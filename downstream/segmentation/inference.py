"""Whole-image and sliding-window inference (mmsegmentation's ``slide`` mode)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Predictor = Callable[[Tensor], Tensor]  # (B, C, h, w) images -> (B, K, h, w) logits


def slide_logits(predict: Predictor, images: Tensor, num_classes: int, crop: int, stride: int):
    """Average of the logits of overlapping ``crop`` windows placed every ``stride`` pixels;
    the last window in each direction is shifted back to end at the border, and windows of an
    image smaller than ``crop`` are padded (the padding's logits are dropped)."""
    if stride <= 0 or stride > crop:
        raise ValueError(f"slide stride {stride} must lie in 1..crop ({crop})")
    batch, _, height, width = images.shape
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    summed = images.new_zeros((batch, num_classes, height, width))
    counts = images.new_zeros((1, 1, height, width))
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            window = images[:, :, y1:y2, x1:x2]
            h, w = window.shape[-2:]
            padded = F.pad(window, (0, crop - w, 0, crop - h)) if (h, w) != (crop, crop) else window
            summed[:, :, y1:y2, x1:x2] += predict(padded)[:, :, :h, :w]
            counts[:, :, y1:y2, x1:x2] += 1
    return summed / counts


@torch.no_grad()
def predict_labels(
    predict: Predictor,
    image: Tensor,
    num_classes: int,
    mode: str,
    crop: int,
    stride: int,
    out_size: tuple[int, int],
) -> Tensor:
    """(B, H, W) class indices at ``out_size`` (the label map's size)."""
    if mode == "slide":
        logits = slide_logits(predict, image, num_classes, crop, stride)
    elif mode == "whole":
        logits = predict(image)
    else:
        raise ValueError(f"inference mode {mode!r} must be slide or whole")
    if logits.shape[-2:] != out_size:
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)
