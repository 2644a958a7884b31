"""Segmentation rows for one pre-training run: mIoU, mAcc, aAcc and the cost of fine-tuning."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from downstream.rows import RunRows
from downstream.segmentation.finetune import finetune_segmentation
from downstream.segmentation.settings import SegmentationSettings

PROTOCOL = "upernet"


def evaluate_segmentation(
    run_dir: str | Path, settings: SegmentationSettings, results_path: str | Path
) -> list[dict[str, Any]]:
    rows = RunRows(run_dir, "segmentation")  # reads run.json: a wrong folder fails before training
    start = time.perf_counter()
    scores = finetune_segmentation(run_dir, settings)
    for metric in ("mIoU", "mAcc", "aAcc", "majority_mIoU"):
        rows.add(PROTOCOL, metric, scores[metric])
    rows.add(PROTOCOL, "seconds", time.perf_counter() - start)
    rows.write(results_path, {"scores": scores, "settings": asdict(settings)})
    return rows.rows
