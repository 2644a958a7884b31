"""COCO-style detection and instance segmentation: ViTDet Mask R-CNN, box and mask AP."""

from ropim.harness.tasks import Column, TaskSpec

TASK = TaskSpec(
    name="detection",
    order=3,
    settings="downstream.detection.settings:DetectionSettings",
    run="downstream.detection.finetune:run_detection",
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
