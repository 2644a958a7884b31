"""Mask R-CNN (torchvision's detector, RPN, heads and NMS) on ViTDet's simple feature pyramid:
the last block's features rescaled x4, x2, x1, x0.5, each through 1x1 and 3x3 convolutions
with LayerNorm, plus a stride-2 max-pool level for the RPN. Anchors are 8 strides wide on every
level (32-512 px for a /16 ViT, as in ViTDet). ``architecture="vitdet"`` is the published
model (window attention, decomposed relative position, ViTDet's widths and LayerNorm heads,
aligned RoIAlign); ``"light"`` keeps global attention and torchvision's lighter heads."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    TwoMLPHead,
)
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from downstream.detection.detectron2_io import BOX_LOSSES, use_detectron2_io
from downstream.detection.vitdet import AlignedRoIAlign, ViTDetPyramid, global_blocks
from downstream.encoder import FineTunedViT
from downstream.pyramid import ViTPyramid
from ropim.harness.backbone import ViTBackbone
from ropim.harness.errors import ConfigError

LEVELS = ("0", "1", "2", "3")


ARCHITECTURES = ("vitdet", "light")


class SimpleFeaturePyramid(nn.Module):
    """Pyramid levels → 1×1 and 3×3 convolutions with LayerNorm to ``channels``, plus a
    stride-2 max-pool level (P6) for the RPN."""

    def __init__(self, pyramid: nn.Module, channels: int) -> None:
        super().__init__()
        self.pyramid = pyramid
        self.outputs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, channels, kernel_size=1, bias=False),
                LayerNorm2d(channels),
                nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
                LayerNorm2d(channels),
            )
            for width in pyramid.channels
        )
        self.out_channels = channels
        self.strides = [*self.pyramid.strides, self.pyramid.strides[-1] * 2]

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        levels = [out(x) for out, x in zip(self.outputs, self.pyramid(images), strict=True)]
        features = OrderedDict(zip(LEVELS, levels, strict=True))
        features["pool"] = F.max_pool2d(levels[-1], kernel_size=1, stride=2)
        return features


def _heads(architecture: str, channels: int, box_dim: int, mask_layers: list[int], anchors: int):
    """RPN head, RoI poolers and box/mask heads. ``vitdet``: 2-conv RPN head, 4conv1fc box
    head and 4-conv mask head with LayerNorm, aligned RoIAlign (detectron2's ViTDet);
    ``light``: torchvision's 1-conv RPN head, two-MLP box head, mask head without norm and its
    unaligned RoIAlign (cheap: the smoke preset)."""
    if architecture == "vitdet":
        return {
            "rpn_head": RPNHead(channels, anchors, conv_depth=2),
            "box_roi_pool": AlignedRoIAlign(LEVELS, output_size=7, sampling_ratio=0),
            "box_head": FastRCNNConvFCHead(
                (channels, 7, 7), [channels] * 4, [box_dim], norm_layer=LayerNorm2d
            ),
            "mask_roi_pool": AlignedRoIAlign(LEVELS, output_size=14, sampling_ratio=0),
            "mask_head": MaskRCNNHeads(channels, mask_layers, 1, norm_layer=LayerNorm2d),
        }
    return {
        "box_roi_pool": MultiScaleRoIAlign(list(LEVELS), output_size=7, sampling_ratio=0),
        "box_head": TwoMLPHead(channels * 7 * 7, box_dim),
        "mask_roi_pool": MultiScaleRoIAlign(list(LEVELS), output_size=14, sampling_ratio=0),
        "mask_head": MaskRCNNHeads(channels, mask_layers, dilation=1),
    }


class ViTDetMaskRCNN(FineTunedViT):
    ENCODER_PATH = "detector.backbone.pyramid.backbone"
    TASK = "detection"

    def __init__(
        self,
        backbone: ViTBackbone,
        num_classes: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        fpn_channels: int = 256,
        box_head_dim: int = 1024,
        mask_head_layers: Sequence[int] = (256, 256, 256, 256),
        rpn_pre_nms_top_n: Sequence[int] = (2000, 1000),
        rpn_post_nms_top_n: Sequence[int] = (1000, 1000),
        rpn_batch_per_image: int = 256,
        roi_batch_per_image: int = 512,
        score_threshold: float = 0.05,
        detections_per_image: int = 100,
        architecture: str = "vitdet",
        window_size: int = 14,
        global_indices: Sequence[int] | None = None,
        box_loss: str = "l1",
    ) -> None:
        super().__init__()
        patch = backbone.patch_size
        if patch < 4 or patch & (patch - 1):
            raise ConfigError(
                f"detection needs a power-of-two patch size >= 4 (got {patch}): torchvision's "
                f"RoIAlign infers each level's scale as a power of two"
            )
        if architecture not in ARCHITECTURES:
            raise ConfigError(f"detection.architecture={architecture!r}: one of {ARCHITECTURES}")
        if box_loss not in BOX_LOSSES:
            raise ConfigError(f"detection.box_loss={box_loss!r}: one of {BOX_LOSSES}")
        if architecture == "vitdet":
            depth = len(backbone.vit.blocks)
            chosen = global_blocks(depth) if global_indices is None else list(global_indices)
            pyramid: nn.Module = ViTDetPyramid(backbone, window_size, chosen)
        else:
            pyramid = ViTPyramid(backbone, [len(backbone.vit.blocks) - 1], norm=LayerNorm2d)
        sfp = SimpleFeaturePyramid(pyramid, fpn_channels)
        anchors = AnchorGenerator(
            sizes=tuple((int(8 * s),) for s in sfp.strides),
            aspect_ratios=((0.5, 1.0, 2.0),) * len(sfp.strides),
        )
        layers = list(mask_head_layers)
        self.detector = MaskRCNN(
            sfp,
            num_classes=None,
            min_size=image_size,
            max_size=image_size,
            image_mean=list(mean)[: backbone.in_chans],
            image_std=list(std)[: backbone.in_chans],
            size_divisible=4 * patch,  # every level, the x0.5 and pool ones too, divides evenly
            rpn_anchor_generator=anchors,
            rpn_batch_size_per_image=rpn_batch_per_image,
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n[0],
            rpn_pre_nms_top_n_test=rpn_pre_nms_top_n[1],
            rpn_post_nms_top_n_train=rpn_post_nms_top_n[0],
            rpn_post_nms_top_n_test=rpn_post_nms_top_n[1],
            box_predictor=FastRCNNPredictor(box_head_dim, num_classes + 1),
            box_batch_size_per_image=roi_batch_per_image,
            box_score_thresh=score_threshold,
            box_detections_per_img=detections_per_image,
            mask_predictor=MaskRCNNPredictor(layers[-1], layers[-1], num_classes + 1),
            **_heads(architecture, fpn_channels, box_head_dim, layers, 3),
        )
        use_detectron2_io(self.detector, image_size, box_loss)
        self.num_classes = num_classes

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        return self.detector(images, targets)
