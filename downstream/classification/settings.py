"""Classification protocol settings; defaults follow MAE's ViT-B recipes (docs/recipes.md)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from ropim.harness.config import check_clip_grad
from ropim.harness.errors import ConfigError
from ropim.harness.resolution import CONFIG, Resolution, fill_section
from ropim.harness.tasks import TaskSettings, TrainingSettings, default_source_of

PROTOCOLS = ("knn", "linear", "finetune", "lowshot")


@dataclass
class KnnSettings:
    k: int = 20
    temperature: float = 0.07


@dataclass
class LinearSettings:
    epochs: int = 90
    batch_size: int = 16384  # MAE's (in total); one process, the encoder sees chunks of 256
    base_lr: float = 0.1  # per lr_batch_divisor images
    lr_batch_divisor: int = 256
    warmup_epochs: int = 10
    optimizer: str = "lars"  # or "sgd"
    momentum: float = 0.9  # MAE's LARS and the SGD option alike (util/lars.py:18)
    # LARS: lr × trust_coeff·‖w‖/‖g‖ on every parameter of two or more dimensions
    trust_coeff: float = 0.001
    weight_decay: float = 0.0
    # MAE trains on a new RandomResizedCrop (bicubic, scale crop_scale) + flip view per epoch
    # through the frozen encoder; false: features of the evaluation view, extracted once.
    augment: bool = True
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    # BatchNorm statistics over groups of this many features: MAE normalises per GPU, 512 of
    # the 16384 (32 GPUs, no SyncBN: FINETUNE.md:139-150, main_linprobe.py:222); null: the
    # whole batch.
    bn_batch: int | None = 512
    # The block whose tokens the probe reads (1-based); null: the last block, after the final
    # norm (MAE's probe). SimMIM's published 56.7 reads block 8 of 12, average-pooled
    # (microsoft/SimMIM issues #14, #36): layer: 8 with classification.feature: avg.
    layer: int | None = None


@dataclass
class FinetuneSettings(TrainingSettings):
    epochs: float = 100
    batch_size: int = 128  # per device
    log_every: int = 20
    checkpoint_every: int = 1000  # steps
    base_lr: float = 5e-4
    lr_batch_divisor: int = 256
    warmup_epochs: float = 5
    min_lr: float = 1e-6
    warmup_lr: float = 0.0  # where warmup starts (MAE's lr_sched.py: from 0)
    # true: min_lr and warmup_lr are per lr_batch_divisor images, like base_lr
    min_lr_scaled: bool = False
    warmup_prefix: bool = True  # false: the cosine spans all steps, warmup included
    layer_decay: float = 0.65
    weight_decay: float = 0.05
    drop_path: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"
    random_erasing: float = 0.25
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = 0.5
    # max gradient norm; false (or null set in the config): none; unset: the method's recipe
    clip_grad: float | bool | None = None

    def check(self, section: str) -> None:
        super().check(section)
        check_clip_grad(self.clip_grad, f"{section}.clip_grad")


@dataclass
class LowShotSettings:
    """Fine-tuning with a fraction of the labels (downstream/classification/lowshot.py); every
    other setting is the ``finetune`` protocol's (the method's published recipe)."""

    # Chen et al., SimCLR (ICML 2020) App. B.5: 1% and 10% of the ImageNet labels, fine-tuned
    # for 60 and 30 epochs (BYOL and MSN report the same two fractions)
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1])
    epochs: list[float] = field(default_factory=lambda: [60, 30])  # one per fraction
    batch_size: int | None = None  # None: finetune.batch_size (capped at the subset's size)
    base_lr: float | None = None  # None: finetune.base_lr (per lr_batch_divisor images)
    drop_path: float | None = None  # None: finetune.drop_path
    label_smoothing: float | None = None  # None: finetune.label_smoothing
    # ImageNet's fixed lists, e.g. {0.01: .../1percent.txt}; unset: seeded stratified draws
    subsets: dict[float, str] = field(default_factory=dict)
    # The head the fine-tune starts from: "fresh" (the published head's init, SimCLR's
    # protocol) or "probe" (LP-FT, Kumar et al., ICLR 2022: a linear head first trained on the
    # frozen encoder's features of the labelled images with the linear-probe recipe, then
    # everything fine-tuned from there)
    head: str = "fresh"
    probe_steps: int = 500  # the probe's steps under head: probe (labelled sets are small)


@dataclass
class ClassificationSettings(TaskSettings):
    # lowshot is opted into (a preset lists it): the papers report the first three
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS[:3]))
    feature: str = "cls"  # frozen feature for k-NN and the linear probe: cls or avg
    knn: KnnSettings = field(default_factory=KnnSettings)
    linear: LinearSettings = field(default_factory=LinearSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    lowshot: LowShotSettings = field(default_factory=LowShotSettings)
    # Keys the config set per protocol (they win over a method's published recipe); set by
    # classification_settings, not a config key.
    explicit: ClassVar[dict[str, set[str]]] = {}

    @classmethod
    def read(cls, raw: dict[str, Any] | None, section: str) -> ClassificationSettings:
        settings = super().read(raw, section)
        settings.explicit = {  # type: ignore[misc]  # per instance, not a config key
            protocol: set((raw or {}).get(protocol) or {}) for protocol in RECIPE_PROTOCOLS
        }
        return settings

    def card(self, section: str, recipes: Mapping[str, Any]) -> dict[str, Resolution]:
        """Each protocol's settings for a method (its published recipe filling what the config
        leaves unset), plus the frozen feature the k-NN and the probe read."""
        resolved, sources = settings_for_method(self, recipes)
        given = getattr(self, "given", set())
        found: dict[str, Resolution] = {}
        for protocol in RECIPE_PROTOCOLS:
            resolution = Resolution()
            if protocol in ("knn", "linear"):
                feature_source = CONFIG if "feature" in given else "suite default: MAE's probe"
                resolution.set("feature", resolved.feature, feature_source)
            for key, value in asdict(getattr(resolved, protocol)).items():
                resolution.set(key, value, sources[protocol][key])
            found[protocol] = resolution
        return found

    def check(self, section: str) -> None:
        unknown = sorted(set(self.protocols) - set(PROTOCOLS))
        if unknown:
            raise ConfigError(
                f"unknown {section}.protocols entry {unknown[0]!r}; choose from {PROTOCOLS}"
            )
        if self.feature not in ("cls", "avg"):
            raise ConfigError(f"{section}.feature={self.feature!r} must be cls or avg")
        if not self.knn.k >= 1 or not self.knn.temperature > 0:
            raise ConfigError(
                f"{section}.knn: k={self.knn.k} must be 1 or more and temperature="
                f"{self.knn.temperature} positive (DINO's: k 20, temperature 0.07)"
            )
        if self.linear.optimizer not in ("lars", "sgd"):
            raise ConfigError(
                f"{section}.linear.optimizer={self.linear.optimizer!r} must be lars or sgd"
            )
        if self.linear.layer is not None and self.linear.layer < 1:
            raise ConfigError(
                f"{section}.linear.layer={self.linear.layer} must be a block number from 1 "
                "(null: the last block)"
            )
        if self.linear.bn_batch is not None and self.linear.bn_batch < 2:
            raise ConfigError(
                f"{section}.linear.bn_batch={self.linear.bn_batch} must be at least 2 "
                "(BatchNorm needs two samples), or null for the whole batch"
            )
        scale = self.linear.crop_scale
        if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
            raise ConfigError(
                f"{section}.linear.crop_scale={scale} must be [low, high] with 0 < low <= high <= 1"
            )
        self.finetune.check(f"{section}.finetune")
        low = self.lowshot
        if len(low.epochs) != len(low.fractions) or not all(0 < f <= 1 for f in low.fractions):
            raise ConfigError(
                f"{section}.lowshot: fractions {low.fractions} must lie in (0, 1] with one "
                f"entry of epochs {low.epochs} each"
            )
        if low.head not in ("fresh", "probe"):
            raise ConfigError(
                f"{section}.lowshot.head={low.head!r} must be fresh (the published head's init) "
                "or probe (LP-FT: a linear probe first)"
            )
        if low.probe_steps < 1:
            raise ConfigError(f"{section}.lowshot.probe_steps={low.probe_steps} must be >= 1")


# Where the adapter's own defaults come from (used where a method publishes no value).
DEFAULT_SOURCES = {
    "finetune": "suite default: MAE's fine-tune, facebookresearch/mae FINETUNE.md:113-125, "
    "main_finetune.py:57-95",
    "linear": "suite default: MAE's linear probe, facebookresearch/mae main_linprobe.py:44-66",
    "knn": "suite default: DINO's weighted k-NN (Caron et al., ICCV 2021)",
}
RECIPE_PROTOCOLS = ("finetune", "linear", "knn")


def classification_settings(raw: dict[str, Any] | None) -> ClassificationSettings:
    return ClassificationSettings.parse(raw, "classification")


def settings_for_method(
    settings: ClassificationSettings, recipes: Mapping[str, Any]
) -> tuple[ClassificationSettings, dict[str, dict[str, str]]]:
    """``settings`` with the method's published protocol recipes filling every key the config
    did not set (the harness's one rule, :func:`fill_section`); and the source of each
    resolved value, per protocol (the recipe card)."""
    resolved = copy.deepcopy(settings)
    sources: dict[str, dict[str, str]] = {}
    for protocol in RECIPE_PROTOCOLS:
        recipe = recipes.get(protocol)

        def default_source(key: str, protocol: str = protocol) -> str:
            return default_source_of(key, DEFAULT_SOURCES[protocol])

        found = fill_section(
            getattr(resolved, protocol),
            settings.explicit.get(protocol, set()),
            recipe.values if recipe is not None else None,
            recipe.source_of if recipe is not None else str,
            default_source,
        )
        sources[protocol] = found.sources
    return resolved, sources
