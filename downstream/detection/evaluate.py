"""Detection rows for one pre-training run: box and mask AP (COCO's six each) and the cost."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from downstream.detection.finetune import finetune_detection
from downstream.detection.settings import DetectionSettings
from downstream.rows import RunRows

PROTOCOL = "vitdet_mask_rcnn"


def evaluate_detection(
    run_dir: str | Path, settings: DetectionSettings, results_path: str | Path
) -> list[dict[str, Any]]:
    rows = RunRows(run_dir, "detection")  # reads run.json: a wrong folder fails before training
    start = time.perf_counter()
    scores = finetune_detection(run_dir, settings)
    for prefix in ("box", "mask"):
        for stat in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            value = scores[f"{prefix}_{stat}"]
            if not math.isnan(value):  # size ranges without objects have no AP
                rows.add(PROTOCOL, f"{prefix}_{stat}", value)
    rows.add(PROTOCOL, "seconds", time.perf_counter() - start)
    rows.write(results_path, {"scores": scores, "settings": asdict(settings)})
    return rows.rows
