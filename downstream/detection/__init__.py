"""COCO-style detection and instance segmentation: ViTDet Mask R-CNN, box and mask AP."""

from ropim.harness.tasks import Column, TaskSpec


def _settings():
    from downstream.detection.settings import DetectionSettings

    return DetectionSettings


def _run():
    from downstream.detection.finetune import run_detection

    return run_detection


TASK = TaskSpec(
    name="detection",
    order=3,
    settings=_settings,
    run=_run,
    protocols=("vitdet_mask_rcnn",),
    headlines=(
        Column("vitdet_mask_rcnn", "box_AP", "Mask R-CNN AP box (%)"),
        Column("vitdet_mask_rcnn", "mask_AP", "Mask R-CNN AP mask (%)"),
    ),
    published=(
        Column("vitdet_mask_rcnn", "box_AP", "published AP box (COCO)"),
        Column("vitdet_mask_rcnn", "mask_AP", "published AP mask (COCO)"),
    ),
)
