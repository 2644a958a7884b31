"""ImageNet-style classification: k-NN, linear probe and end-to-end fine-tuning."""

from ropim.harness.tasks import Column, TaskSpec


def _settings():
    from downstream.classification.settings import ClassificationSettings

    return ClassificationSettings


def _run():
    from downstream.classification.evaluate import run_classification

    return run_classification


TASK = TaskSpec(
    name="classification",
    order=1,
    settings=_settings,
    run=_run,
    protocols=("knn", "linear", "finetune", "lowshot"),
    headlines=(
        Column("knn", "top1", "knn top-1 (%)"),
        Column("linear", "top1", "linear top-1 (%)"),
        Column("finetune", "top1", "finetune top-1 (%)"),
        Column("finetune", "top1_best", "finetune best-epoch top-1 (%)"),
        Column("lowshot", "top1_1pct", "1% labels fine-tune top-1 (%)"),
        Column("lowshot", "top1_10pct", "10% labels fine-tune top-1 (%)"),
    ),
    published=(
        Column("finetune", "top1_best", "published finetune (ViT-B/16, IN-1k)"),
        Column("linear", "top1", "published linear (ViT-B/16, IN-1k)"),
    ),
    always=True,
)
