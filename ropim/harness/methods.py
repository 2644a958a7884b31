"""The interface every masking method implements; the harness only ever talks to this."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from ropim.harness.backbone import ViTBackbone
from ropim.harness.checkpoint import architecture_signature
from ropim.harness.patches import patchify, unpatchify
from ropim.harness.run_progress import RunProgress

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass(frozen=True)
class Recipe:
    """A method's published pre-training choices; the harness uses them unless the config sets
    a value. ``source`` names where the recipe comes from; ``sources`` overrides it per key
    (repository file:line or paper section), so each value can be checked."""

    base_lr: float
    lr_batch_divisor: int  # lr = base_lr · total_batch / lr_batch_divisor
    warmup_epochs: float
    betas: tuple[float, float]
    weight_decay: float = 0.05
    clip_grad: float | None = None
    base_min_lr: float = 0.0  # scaled like base_lr: min_lr = base_min_lr · total_batch / divisor
    # Warmup starts at base_warmup_lr (scaled like base_lr); MAE's from 0.
    base_warmup_lr: float = 0.0
    # True: the cosine runs over the steps after warmup (MAE's lr_sched.py); False: it spans all
    # steps, warmup included, as timm's CosineLRScheduler without warmup_prefix (ROPIM, SimMIM).
    warmup_prefix: bool = True
    schedule: str = "cosine"  # or "multistep": ×decay_rate at each fraction in decay_at
    decay_at: tuple[float, ...] = ()
    decay_rate: float = 0.1
    crop_scale: tuple[float, float] = (0.67, 1.0)  # RandomResizedCrop area range
    drop_path: float = 0.1
    interpolation: str = "bicubic"  # RandomResizedCrop's resampling
    source: str = ""
    sources: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse a recipe the schedule cannot use, naming the field (checked when the method's
        file is imported, before anything trains)."""
        positive = {"base_lr": self.base_lr, "lr_batch_divisor": self.lr_batch_divisor}
        for key, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"Recipe.{key}={value!r} must be a positive number")
        if not float(self.lr_batch_divisor).is_integer():
            raise ValueError(
                f"Recipe.lr_batch_divisor={self.lr_batch_divisor!r} must be a whole batch size "
                f"(the papers' 256 or 512)"
            )
        at_least_zero = {
            "warmup_epochs": self.warmup_epochs,
            "weight_decay": self.weight_decay,
            "base_min_lr": self.base_min_lr,
            "base_warmup_lr": self.base_warmup_lr,
            "drop_path": self.drop_path,
        }
        for key, value in at_least_zero.items():
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"Recipe.{key}={value!r} must be a number, zero or more")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"Recipe.betas={self.betas!r} must be two numbers in [0, 1)")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"Recipe.clip_grad={self.clip_grad!r} must be positive or None")
        if self.schedule not in ("cosine", "multistep"):
            raise ValueError(f"Recipe.schedule={self.schedule!r} must be cosine or multistep")

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["sources"] = dict(self.sources)
        return values

    def values(self) -> dict[str, Any]:
        """The settings alone (no sources), in declaration order."""
        return {k: v for k, v in asdict(self).items() if k not in ("source", "sources")}

    def source_of(self, key: str) -> str:
        return self.sources.get(key, self.source)


@dataclass(frozen=True)
class ProtocolRecipe:
    """A method's published settings for one evaluation protocol (e.g. its fine-tune):
    ``values`` uses the task's setting names; keys it leaves out take the task's defaults."""

    values: Mapping[str, Any]
    source: str
    sources: Mapping[str, str] = field(default_factory=dict)

    def source_of(self, key: str) -> str:
        return self.sources.get(key, self.source)


@dataclass(frozen=True)
class PublishedResult:
    """One number a method's paper (or its maintainers) published, owned by the method: the
    reports put it beside the measured columns, the recipe card lists it. ``feature`` and
    ``layer`` say which frozen features a linear probe read (``"cls"``/``"avg"``, a block
    index or ``"last"``), so a table can say when its own probe reads others."""

    task: str  # classification, segmentation, detection
    protocol: str  # finetune, linear, upernet, vitdet_mask_rcnn, ...
    metric: str  # top1, top1_best, mIoU, box_AP, ...
    value: float  # in %
    source: str  # paper section / repository file:line
    protocol_detail: str = ""
    backbone: str = "vit_base_patch16_224"
    pretrain_data: str = "imagenet-1k"
    pretrain_epochs: int | None = None
    feature: str | None = None
    layer: str | int | None = None


class MethodOutput(NamedTuple):
    loss: Tensor
    prediction: Tensor  # (B, N, p·p·C) pixels of the normalised image, per token
    state: Any  # whatever prepare() drew for this batch (a sketch, a mask, ...)


class MaskingMethod(nn.Module, ABC):
    """Prepare the encoder input from patch embeddings, then score the prediction.

    Subclasses set ``name`` (the config name, equal to the file's name) and ``recipe``, and
    implement :meth:`prepare`, :meth:`decode`, :meth:`loss` and :meth:`encoder_view`.
    Override :meth:`encode` only when the encoder must see a different token set.
    """

    name: ClassVar[str] = ""
    recipe: ClassVar[Recipe]
    # The method's published evaluation recipes by protocol ("finetune", "linear", ...):
    # a task reads them to fill the settings its config leaves unset.
    protocol_recipes: ClassVar[Mapping[str, ProtocolRecipe]] = {}
    # Choices the method's code makes that no setting changes, for the recipe card:
    # name -> (what it does, where the official code does it).
    fixed_choices: ClassVar[Mapping[str, tuple[str, str]]] = {}
    # Settings that fit the suite's test backbone (28-px images, 7-px patches, 2 blocks, width
    # 32): the generic per-method tests build every registered method with them.
    test_settings: ClassVar[Mapping[str, Any]] = {}
    # The method's published numbers (paper tables), each with its protocol and source.
    references: ClassVar[tuple[PublishedResult, ...]] = ()
    # The attribute holding the ViTBackbone that export and every downstream task take (the
    # student by default; a method may name a teacher it keeps as a ViTBackbone).
    encoder_name: ClassVar[str] = "backbone"

    def __init__(self, backbone: ViTBackbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.settings: dict[str, Any] = {}  # filled by the registry with the resolved arguments
        # Where the run stands while the loss is computed (ramps); the harness sets it before
        # every step. Outside a run (tests, figures): step 0 of 1.
        self.progress = RunProgress(step=0, total_steps=1, steps_per_epoch=1)
        self._untrained: list[nn.Module] = []

    def untrained(self, module: ModuleT) -> ModuleT:
        """Declare ``module`` as state that is not trained (an EMA teacher, a fixed filter
        bank): its parameters get no gradient and reach no optimiser (so no weight decay), it
        stays in eval mode (no dropout or drop path) whatever ``train()`` is called with, and it
        is checkpointed and restored with the rest of the method. Assign the result to an
        attribute: ``self.teacher = self.untrained(copy.deepcopy(self.backbone))``. Running
        statistics and counters are buffers (``register_buffer``, persistent by default)."""
        module.requires_grad_(False)
        module.eval()
        self._untrained.append(module)
        return module

    def train(self, mode: bool = True) -> MaskingMethod:
        super().train(mode)
        for module in self._untrained:
            module.eval()
        return self

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters the optimiser updates: every one that takes a gradient."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def after_step(self, progress: RunProgress) -> None:
        """Called after every optimiser step (before that step's checkpoint), with the steps
        completed so far: update an EMA teacher or a counter here. Nothing by default."""

    def encoder(self) -> ViTBackbone:
        """The encoder export and the downstream tasks take (``encoder_name``)."""
        found = getattr(self, self.encoder_name)
        if not isinstance(found, ViTBackbone):
            raise TypeError(
                f"{type(self).__name__}.encoder_name={self.encoder_name!r} must name a "
                f"ViTBackbone attribute, found {type(found).__name__}"
            )
        return found

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Training loss for a batch of normalised images."""
        return self.compute(images, generator).loss

    def compute(self, images: Tensor, generator: torch.Generator | None = None) -> MethodOutput:
        target = patchify(images, self.patch_size)
        tokens, state = self.prepare(self.backbone.embed_patches(images), generator)
        prediction = self.decode(self.encode(tokens, state), state)
        return MethodOutput(self.loss(prediction, target, state), prediction, state)

    @abstractmethod
    def prepare(
        self, patch_tokens: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Any]:
        """Turn patch embeddings ``(B, N, D)`` into the encoder's input tokens plus state."""

    def encode(self, tokens: Tensor, state: Any) -> Tensor:
        return self.backbone.encode(tokens)

    @abstractmethod
    def decode(self, features: Tensor, state: Any) -> Tensor:
        """Predict ``(B, N, p·p·C)`` pixels from the encoder output."""

    @abstractmethod
    def loss(self, prediction: Tensor, target: Tensor, state: Any) -> Tensor:
        """Scalar loss from per-token predictions and per-token targets."""

    @abstractmethod
    def encoder_view(self, images: Tensor, state: Any) -> Tensor:
        """What the encoder was shown, rendered in pixel space, for the reconstruction figure."""

    def reconstruct(self, prediction: Tensor, images: Tensor, state: Any) -> Tensor:
        """The prediction as an image in the input's normalisation (for the figure)."""
        return self.to_images(prediction)

    def to_images(self, tokens: Tensor) -> Tensor:
        """Per-token pixel vectors back to ``(B, C, H, W)``."""
        return unpatchify(tokens, self.patch_size, self.backbone.grid, self.backbone.in_chans)

    def signature(self) -> dict[str, str]:
        """What a checkpoint of this method must match to be loaded or resumed."""
        return architecture_signature(
            self, self.encoder(), method=str(self.name), encoder=self.encoder_name
        )

    def ablations(self) -> dict[str, Callable[[], contextlib.AbstractContextManager]]:
        """Named variants of the training step that isolate what one part of the method costs
        (``bench-pretrain`` times the step inside each context); none by default."""
        return {}

    def micro_benchmarks(self, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
        """Rows of method-specific timings ``bench-pretrain`` prints after the step speeds."""
        return []

    def no_weight_decay(self) -> set[str]:
        """Names excluded from weight decay besides biases and norms: the backbone's absolute
        positions and cls token (ROPIM and SimMIM ``optimizer.py`` skip exactly these; a
        method's own tokens, SimMIM's mask token included, are decayed there)."""
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}


def linear_pixel_head(backbone: ViTBackbone) -> nn.Linear:
    """One linear layer per token, ``D → p²·C`` (1×1 conv + PixelShuffle in the papers)."""
    return nn.Linear(backbone.embed_dim, backbone.patch_size**2 * backbone.in_chans)
