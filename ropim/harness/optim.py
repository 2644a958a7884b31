"""Optimiser and schedule: AdamW without decay on biases/norms/positions, warmup + cosine."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from ropim.harness.config import TrainSection
from ropim.harness.methods import MaskingMethod, Recipe
from ropim.harness.resolution import choose


@dataclass(frozen=True)
class OptimSettings:
    """The resolved values a run trained with (recorded in ``run.json``)."""

    base_lr: float
    lr_batch_divisor: int
    total_batch: int
    lr: float  # base_lr · total_batch / lr_batch_divisor
    min_lr: float
    warmup_lr: float  # where warmup starts
    warmup_epochs: float
    weight_decay: float
    betas: tuple[float, float]
    clip_grad: float | None
    schedule: str = "cosine"
    decay_at: tuple[float, ...] = ()  # multistep: fractions of training
    decay_rate: float = 0.1
    warmup_prefix: bool = True  # False: the cosine spans all steps, warmup included
    # where each value came from (config, or the recipe's file:line); not a setting
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("sources")
        return values


def resolve(train: TrainSection, recipe: Recipe, world_size: int) -> OptimSettings:
    """Config values win; anything left unset comes from the method's published recipe
    (:func:`ropim.harness.resolution.choose`); each value's source is kept."""
    sources: dict[str, str] = {}
    total_batch = train.batch_size * world_size

    def pick(
        key: str, value: Any, recipe_key: str | None = None, scale: float | None = None
    ) -> Any:
        recipe_key = recipe_key or key
        published = getattr(recipe, recipe_key)
        if scale is not None:  # a per-image rate: × total batch / divisor
            published = published * scale
        chosen, source = choose(value, published, recipe.source_of(recipe_key))
        sources[key] = source
        return chosen

    base_lr = pick("base_lr", train.base_lr)
    divisor = pick("lr_batch_divisor", train.lr_batch_divisor)
    per_image = total_batch / divisor
    settings = OptimSettings(
        base_lr=base_lr,
        lr_batch_divisor=divisor,
        total_batch=total_batch,
        lr=base_lr * per_image,
        min_lr=pick("min_lr", train.min_lr, "base_min_lr", per_image),
        warmup_lr=pick("warmup_lr", train.warmup_lr, "base_warmup_lr", per_image),
        warmup_epochs=pick("warmup_epochs", train.warmup_epochs),
        weight_decay=pick("weight_decay", train.weight_decay),
        betas=tuple(pick("betas", train.betas)),  # type: ignore[arg-type]
        clip_grad=pick("clip_grad", train.clip_grad) or None,  # false: no clipping
        schedule=pick("schedule", train.schedule),
        decay_at=tuple(pick("decay_at", train.decay_at)),
        decay_rate=pick("decay_rate", None),
        warmup_prefix=pick("warmup_prefix", None),
        sources=sources,
    )
    sources["total_batch"] = "train.batch_size × devices"
    sources["lr"] = "base_lr × total_batch / lr_batch_divisor"
    return settings


def pretrain_scheduler(
    optimizer: torch.optim.Optimizer, settings: OptimSettings, total_steps: int, warmup_steps: int
) -> Scheduler:
    """The recipe's schedule: warmup, then cosine to ``min_lr`` or steps of ×``decay_rate`` at
    the ``decay_at`` fractions of training (SimMIM: ×0.1 at 7/8)."""
    if settings.schedule == "cosine":
        return build_scheduler(
            optimizer,
            total_steps,
            warmup_steps,
            settings.min_lr,
            warmup_lr=settings.warmup_lr,
            warmup_prefix=settings.warmup_prefix,
        )
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return MultiStepLRScheduler(
        optimizer,
        # timm applies milestone m from step m - 1 on: +1 makes step round(f·total) the first
        # decayed one, as torch's MultiStepLR does at SimMIM's epoch 700.
        decay_t=[round(f * total_steps) + 1 for f in settings.decay_at],
        warmup_prefix=False,  # milestones count from step 0, warmup included
        decay_rate=settings.decay_rate,
        warmup_t=warmup_steps,
        warmup_lr_init=settings.warmup_lr,
        t_in_epochs=False,
    )


def build_optimizer(method: MaskingMethod, settings: OptimSettings) -> torch.optim.AdamW:
    """AdamW over the method's trained parameters: no decay on 1-D ones (norms, biases) nor on
    ``no_weight_decay()``'s names; state declared ``untrained`` never reaches it."""
    groups = param_groups_weight_decay(
        method, settings.weight_decay, no_weight_decay_list=method.no_weight_decay()
    )
    trained = {id(p) for p in method.trained_parameters().values()}
    for group in groups:
        group["params"] = [p for p in group["params"] if id(p) in trained]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    min_lr: float = 0.0,
    warmup_lr: float | None = None,
    warmup_prefix: bool = True,
) -> CosineLRScheduler:
    """Per-step linear warmup from ``warmup_lr`` (default ``min_lr``), then a half-cycle cosine
    down to ``min_lr`` (timm's scheduler; call ``step_update(step)`` before each step). With
    ``warmup_prefix`` the cosine runs over the steps after warmup (MAE's ``lr_sched.py``);
    without, it spans all steps and warmup overrides its start (ROPIM's and SimMIM's
    ``lr_scheduler.py:22-31``: timm's scheduler with ``t_initial`` = all steps)."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    start = min_lr if warmup_lr is None else warmup_lr
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup_steps, 1) if warmup_prefix else max(total_steps, 1),
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=start if warmup_steps else 0.0,
        warmup_prefix=warmup_prefix,
        t_in_epochs=False,
    )


NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def detectron2_param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float, skip: Collection[str]
) -> list[dict[str, Any]]:
    """detectron2's ViTDet groups: layer-wise lr scales from the model's ``group_matcher``
    (stem, blocks, the rest last: ``get_vit_lr_decay_rate``), no weight decay on norm layers
    (``weight_decay_norm=0``) nor on the ``skip`` names (``pos_embed``), and every other
    parameter decayed, biases included (detectron2 ``solver/build.py``: the bias decay
    defaults to the weight decay; timm's groups exempt all 1-D parameters)."""
    layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    last = max(layer_of.values())
    in_norm = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, NORMS)
        for name, _ in module.named_parameters(recurse=False)
    }
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_of.get(name, last)
        decay = name not in in_norm and name not in skip
        group = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (last - layer),
            },
        )
        group["params"].append(param)
    return list(groups.values())


def layer_decay_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float,
    betas: Sequence[float],
    decay_biases: bool = False,
    no_weight_decay: Collection[str] | None = None,
) -> torch.optim.Optimizer:
    """AdamW with timm's layer-wise lr decay (the model's ``group_matcher``) and no decay on
    1-D parameters (norms, biases, layer scales) nor on the ``no_weight_decay`` names (the
    model's own list when not given: a caller fine-tuning a bare timm model passes the
    backbone's, since timm's ``Beit`` also exempts relative tables the papers decay);
    ``decay_biases`` decays biases outside norm layers too, as detectron2 does."""
    if no_weight_decay is None:
        no_weight_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    if decay_biases:
        groups = detectron2_param_groups(model, weight_decay, layer_decay, no_weight_decay)
    else:
        groups = param_groups_layer_decay(
            model, weight_decay, no_weight_decay_list=no_weight_decay, layer_decay=layer_decay
        )
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
