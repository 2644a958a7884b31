"""mIoU / mAcc / aAcc from one confusion matrix accumulated over the whole validation set.

As mmsegmentation: a class's IoU is intersection / union and is NaN (left out of the mean)
when the class is absent from both prediction and ground truth; its accuracy is NaN when it is
absent from the ground truth. Ignored pixels count nowhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from downstream.segmentation.dataset import IGNORE_INDEX


def confusion_matrix(
    prediction: Tensor, label: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """``matrix[t, p]`` = pixels of true class t predicted as p (int64, on the inputs' device)."""
    keep = label != ignore_index
    truth, guess = label[keep].long(), prediction[keep].long()
    if truth.numel() and (truth.min() < 0 or truth.max() >= num_classes):
        raise ValueError(f"label values outside 0..{num_classes - 1} (ignore {ignore_index})")
    flat = truth * num_classes + guess
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_scores(matrix: Tensor) -> dict[str, object]:
    """mIoU, mAcc, aAcc (fractions) and the per-class IoU / accuracy lists (NaN = absent)."""
    matrix = matrix.double()
    intersection = matrix.diag()
    area_label = matrix.sum(dim=1)
    area_pred = matrix.sum(dim=0)
    union = area_label + area_pred - intersection
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, intersection / union.clamp(min=1), nan)
    acc = torch.where(area_label > 0, intersection / area_label.clamp(min=1), nan)
    total = area_label.sum()
    return {
        "mIoU": float(iou.nanmean()),
        "mAcc": float(acc.nanmean()),
        "aAcc": float(intersection.sum() / total) if total > 0 else float("nan"),
        "per_class_iou": iou.tolist(),
        "per_class_acc": acc.tolist(),
    }
