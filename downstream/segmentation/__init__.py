"""ADE20K-style semantic segmentation: UperNet on a ViT feature pyramid, mIoU."""

from ropim.harness.tasks import Column, Floor, TaskSpec

TASK = TaskSpec(
    name="segmentation",
    order=2,
    settings="downstream.segmentation.settings:SegmentationSettings",
    run="downstream.segmentation.finetune:run_segmentation",
    protocols=("upernet", "linear"),
    headlines=(
        Column("upernet", "mIoU", "UperNet mIoU (%)"),
        Column("linear", "mIoU", "linear-probe mIoU (%)"),
    ),
    published=(Column("upernet", "mIoU", "published mIoU (ADE20K)"),),
    floors=(Floor("upernet", "majority_mIoU", "Predicting the most frequent class everywhere"),),
)
