"""Large-scale jitter (ViTDet): flip, resize by a random 0.1-2.0 of the canvas keeping the
aspect ratio, crop or pad to a fixed square, then boxes recomputed from the cropped masks (as
detectron2's ``recompute_boxes``) and instances cut away entirely dropped."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF


def to_model_input(image: Tensor, in_chans: int) -> Tensor:
    """uint8 RGB -> float 0-1 with the encoder's channels (the detector normalises)."""
    pixels = image.float() / 255
    return TF.rgb_to_grayscale(pixels) if in_chans == 1 else pixels


def boxes_from_masks(masks: Tensor) -> Tensor:
    """xyxy boxes that enclose each mask's pixels (COCO extents: last pixel + 1)."""
    if len(masks) == 0:
        return torch.zeros((0, 4))
    boxes = masks_to_boxes(masks)
    boxes[:, 2:] += 1
    return boxes


class CropAtMost(v2.Transform):
    """A random ``size`` window, cut to the image where it is smaller, and no padding:
    detectron2's ``FixedSizeCrop(pad=False)`` in ViTDet's LSJ (``coco_loader_lsj.py``); the
    model pads after normalising (``detectron2_io.SquarePadTransform``)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def make_params(self, flat_inputs: list) -> dict:
        height, width = v2.query_size(flat_inputs)
        h, w = min(self.size, height), min(self.size, width)
        top = int(torch.randint(0, height - h + 1, ()))
        left = int(torch.randint(0, width - w + 1, ()))
        return {"top": top, "left": left, "height": h, "width": w}

    def transform(self, inpt, params: dict):
        return TF.crop(inpt, **params)


class LargeScaleJitter:
    def __init__(self, size: int, scale_range: Sequence[float], hflip: float, in_chans: int):
        self.in_chans = in_chans
        self.transform = v2.Compose(
            [
                v2.RandomHorizontalFlip(hflip),
                v2.ScaleJitter((size, size), tuple(scale_range)),  # type: ignore[arg-type]
                CropAtMost(size),
            ]
        )

    def __call__(
        self, image: Tensor, target: dict[str, Tensor], generator: object = None
    ) -> tuple[Tensor, dict]:
        """Draws from torch's global RNG (torchvision's v2 transforms do): seed it first."""
        pixels, masks = self.transform(tv_tensors.Image(image), tv_tensors.Mask(target["masks"]))
        masks = masks.as_subclass(Tensor)
        keep = (masks.flatten(1) > 0).any(dim=1)
        masks = masks[keep]
        out = {
            "boxes": boxes_from_masks(masks),
            "labels": target["labels"][keep],
            "masks": masks,
            "image_id": target["image_id"],
        }
        return to_model_input(pixels.as_subclass(Tensor), self.in_chans), out
