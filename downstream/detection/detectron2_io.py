"""Where torchvision's Mask R-CNN differs from detectron2's ViTDet, made detectron2's.

- **Box regression loss**: detectron2 trains both the RPN and the box head with L1
  (``smooth_l1_beta=0.0``: ``modeling/proposal_generator/rpn.py:204``,
  ``modeling/roi_heads/fast_rcnn.py:193``); torchvision hard-codes smooth-L1 with β = 1/9.
- **Input padding**: detectron2 normalises, then pads with 0 to a fixed square
  (``modeling/meta_arch/rcnn.py:228-231``, ViTDet's ``square_pad=1024``) in training and at
  test time; large-scale-jitter crops are not resized again inside the model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import roi_heads as torchvision_roi_heads
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform

BOX_LOSSES = ("l1", "smooth_l1")


class L1RegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with detectron2's L1 box loss (sum over the sampled positives,
    divided by all sampled anchors, as both libraries normalise)."""

    def compute_loss(
        self,
        objectness: Tensor,
        pred_bbox_deltas: Tensor,
        labels: list[Tensor],
        regression_targets: list[Tensor],
    ) -> tuple[Tensor, Tensor]:
        positive, negative = self.fg_bg_sampler(labels)
        positive_idx = torch.where(torch.cat(positive, dim=0))[0]
        sampled = torch.cat([positive_idx, torch.where(torch.cat(negative, dim=0))[0]])
        targets = torch.cat(regression_targets, dim=0)
        box_loss = (
            F.l1_loss(pred_bbox_deltas[positive_idx], targets[positive_idx], reduction="sum")
            / sampled.numel()
        )
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness.flatten()[sampled], torch.cat(labels, dim=0)[sampled]
        )
        return objectness_loss, box_loss


def l1_fastrcnn_loss(
    class_logits: Tensor,
    box_regression: Tensor,
    labels: list[Tensor],
    regression_targets: list[Tensor],
) -> tuple[Tensor, Tensor]:
    """torchvision's ``fastrcnn_loss`` with L1 in place of smooth-L1 (β = 1/9)."""
    labels_all = torch.cat(labels, dim=0)
    targets = torch.cat(regression_targets, dim=0)
    classification_loss = F.cross_entropy(class_logits, labels_all)
    positive = torch.where(labels_all > 0)[0]
    rows = box_regression.reshape(len(class_logits), box_regression.size(-1) // 4, 4)
    box_loss = (
        F.l1_loss(rows[positive, labels_all[positive]], targets[positive], reduction="sum")
        / labels_all.numel()
    )
    return classification_loss, box_loss


@contextlib.contextmanager
def _l1_box_head_loss() -> Iterator[None]:
    # torchvision's RoIHeads.forward calls the module-level fastrcnn_loss; swap it for the
    # duration of this forward only.
    original = torchvision_roi_heads.fastrcnn_loss
    torchvision_roi_heads.fastrcnn_loss = l1_fastrcnn_loss
    try:
        yield
    finally:
        torchvision_roi_heads.fastrcnn_loss = original


class L1RoIHeads(RoIHeads):
    """torchvision's box and mask heads with detectron2's L1 box-regression loss."""

    def forward(self, *args, **kwargs):  # type: ignore[override]
        with _l1_box_head_loss():
            return super().forward(*args, **kwargs)


class SquarePadTransform(GeneralizedRCNNTransform):
    """Normalise, resize evaluation images so the long side is ``square`` (training crops come
    sized by large-scale jitter and are left alone), then pad with 0 — the mean colour — to a
    ``square`` × ``square`` canvas (rounded up to ``size_divisible``)."""

    def __init__(self, square: int, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.square = square

    def resize(self, image: Tensor, target=None):  # type: ignore[override]
        if self.training:
            return image, target
        return super().resize(image, target)

    def batch_images(self, images: list[Tensor], size_divisible: int = 32) -> Tensor:
        stride = size_divisible
        side = max(self.square, *(max(image.shape[-2:]) for image in images))
        side = int(math.ceil(side / stride) * stride)
        batch = images[0].new_zeros(len(images), images[0].shape[0], side, side)
        for out, image in zip(batch, images, strict=True):
            out[:, : image.shape[1], : image.shape[2]].copy_(image)
        return batch


def use_detectron2_io(detector: torch.nn.Module, square: int, box_loss: str) -> None:
    """Give a built torchvision ``MaskRCNN`` detectron2's input padding and box loss. The RPN
    and RoI heads are re-typed in place (the subclasses add no state; torchvision's
    constructor offers no way to pass them in)."""
    t = detector.transform
    detector.transform = SquarePadTransform(
        square,
        t.min_size,
        t.max_size,
        t.image_mean,
        t.image_std,
        size_divisible=t.size_divisible,
        fixed_size=t.fixed_size,
    )
    if box_loss == "l1":
        detector.rpn.__class__ = L1RegionProposalNetwork
        detector.roi_heads.__class__ = L1RoIHeads
