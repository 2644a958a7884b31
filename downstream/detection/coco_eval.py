"""Predictions in COCO's result format, merged over ranks, scored by pycocotools' COCOeval."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = {"bbox": "box", "segm": "mask"}


def coco_results(
    output: dict[str, torch.Tensor], image_id: int, category_ids: list[int]
) -> list[dict[str, Any]]:
    """One image's detections (xyxy boxes, 1..K labels, mask probabilities) as COCO results."""
    boxes = output["boxes"].detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    masks = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
    results = []
    for index, (label, score) in enumerate(
        zip(output["labels"].tolist(), output["scores"].tolist(), strict=True)
    ):
        rle = mask_utils.encode(np.asfortranarray(masks[index]))
        results.append(
            {
                "image_id": int(image_id),
                "category_id": category_ids[label - 1],
                "bbox": [round(v, 2) for v in xywh[index]],
                "score": float(score),
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
            }
        )
    return results


def merge_rank_predictions(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One list of results where each image's detections come from one rank only: samplers
    that pad the last batch by repeating images would otherwise count them twice."""
    owner: dict[int, int] = {}
    merged = []
    for rank, results in enumerate(per_rank):
        for result in results:
            image = result["image_id"]
            if owner.setdefault(image, rank) == rank:
                merged.append(result)
    return merged


def gather_predictions(local: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not (dist.is_available() and dist.is_initialized()):
        return merge_rank_predictions([local])
    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, local)
    return merge_rank_predictions(per_rank)


def coco_evaluate(coco_gt: Any, results: list[dict[str, Any]], image_ids: list[int]) -> dict:
    """box_AP, box_AP50, ..., mask_APl as fractions; size ranges with no objects are NaN
    (COCOeval's -1)."""
    scores: dict[str, float] = {}
    for iou_type, prefix in IOU_TYPES.items():
        if not results:
            scores |= {f"{prefix}_{name}": 0.0 for name in STAT_NAMES}
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            # Boxes alone for bbox, masks alone for segm: loadRes then derives each result's
            # area from what is scored (mask area for segm, not its box).
            drop = "segmentation" if iou_type == "bbox" else "bbox"
            coco_dt = coco_gt.loadRes([{k: v for k, v in r.items() if k != drop} for r in results])
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.params.imgIds = list(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for name, value in zip(STAT_NAMES, evaluator.stats[: len(STAT_NAMES)], strict=True):
            scores[f"{prefix}_{name}"] = float("nan") if value < 0 else float(value)
    return scores
