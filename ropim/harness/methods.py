"""The interface every masking method implements; the harness only ever talks to this."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from ropim.harness.backbone import ViTBackbone
from ropim.harness.checkpoint import architecture_signature
from ropim.harness.patches import patchify, unpatchify


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

    def __init__(self, backbone: ViTBackbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.settings: dict[str, Any] = {}  # filled by the registry with the resolved arguments

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
        return architecture_signature(self, self.backbone, method=str(self.name))

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
