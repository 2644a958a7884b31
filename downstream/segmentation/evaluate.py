"""Segmentation rows for one pre-training run: mIoU, mAcc, aAcc and the cost of fine-tuning."""

from __future__ import annotations

import json
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
    run_dir = Path(run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    start = time.perf_counter()
    scores = finetune_segmentation(run_dir, settings)
    rows = RunRows(run_dir, record, "segmentation")
    for metric in ("mIoU", "mAcc", "aAcc", "majority_mIoU"):
        rows.add(PROTOCOL, metric, scores[metric])
    rows.add(PROTOCOL, "seconds", time.perf_counter() - start)
    rows.write(results_path, {"scores": scores, "settings": asdict(settings)})
    return rows.rows
