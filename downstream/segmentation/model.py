"""UperNet with an FCN auxiliary head on a ViT pyramid (mmsegmentation's MAE/BEiT recipe).

The decode heads are Hugging Face ``transformers``' UperNet heads; a ``Dropout2d(0.1)`` before
each classifier restores mmsegmentation's ``dropout_ratio``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead

from downstream.encoder import FineTunedViT
from downstream.pyramid import ViTPyramid
from downstream.segmentation.dataset import IGNORE_INDEX


class UperNetSegmenter(FineTunedViT):
    ENCODER_PATH = "pyramid.backbone"
    TASK = "segmentation"

    def __init__(
        self,
        pyramid: ViTPyramid,
        num_classes: int,
        channels: int = 768,
        aux_channels: int = 256,
        aux_index: int = 2,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        heads = SimpleNamespace(
            pool_scales=tuple(pool_scales),
            hidden_size=channels,
            num_labels=num_classes,
            auxiliary_in_channels=None,
            auxiliary_channels=aux_channels,
            auxiliary_num_convs=1,
            auxiliary_concat_input=False,
        )
        self.pyramid = pyramid
        self.decode_head = UperNetHead(heads, in_channels=pyramid.channels)
        self.aux_head = UperNetFCNHead(heads, in_channels=pyramid.channels, in_index=aux_index)
        for head in (self.decode_head, self.aux_head):
            head.classifier = nn.Sequential(nn.Dropout2d(dropout), head.classifier)
        self.num_classes = num_classes

    def forward(self, images: Tensor, with_aux: bool = False) -> dict[str, Tensor]:
        """Class logits at the input resolution (``aux`` too when ``with_aux``)."""
        levels = self.pyramid(images)
        size = images.shape[-2:]
        out = {"logits": _upsample(self.decode_head(levels), size)}
        if with_aux:
            out["aux"] = _upsample(self.aux_head(levels), size)
        return out


def _upsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
    if logits.shape[-2:] == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _pixel_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """mmsegmentation 0.x's CrossEntropyLoss (``avg_non_ignore=False``): the per-pixel loss is
    0 on ignored pixels and the mean runs over every pixel, ignored ones included."""
    per_pixel = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    return per_pixel.mean()


def segmentation_loss(outputs: dict[str, Tensor], labels: Tensor, aux_weight: float) -> Tensor:
    loss = _pixel_loss(outputs["logits"], labels)
    if "aux" in outputs and aux_weight:
        loss = loss + aux_weight * _pixel_loss(outputs["aux"], labels)
    return loss
