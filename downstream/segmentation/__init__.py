"""ADE20K-style semantic segmentation: UperNet on a ViT feature pyramid, mIoU."""

from ropim.harness.tasks import Column, Floor, TaskSpec


def _settings():
    from downstream.segmentation.settings import SegmentationSettings

    return SegmentationSettings


def _run():
    from downstream.segmentation.finetune import run_segmentation

    return run_segmentation


TASK = TaskSpec(
    name="segmentation",
    order=2,
    settings=_settings,
    run=_run,
    protocols=("upernet", "linear"),
    headlines=(
        Column("upernet", "mIoU", "UperNet mIoU (%)"),
        Column("linear", "mIoU", "linear-probe mIoU (%)"),
    ),
    published=(Column("upernet", "mIoU", "published mIoU (ADE20K)"),),
    floors=(Floor("upernet", "majority_mIoU", "Predicting the most frequent class everywhere"),),
)
