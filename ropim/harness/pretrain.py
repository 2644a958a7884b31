"""Pre-training: any registered masking method on the configured data, through the one loop.

Writes ``<run>/config.yaml``, ``run.json`` (resolved recipe, seed, code version, hardware,
cost), ``metrics.csv``, checkpoints, ``reconstructions.png`` and, when enabled, a quick probe
against the same encoder at random initialisation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from lightning_fabric import Fabric
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from ropim.harness.checkpoint import CheckpointDir
from ropim.harness.config import Config, save_config
from ropim.harness.data.datasets import dataset_stats, load_images, skipped_images
from ropim.harness.data.transforms import eval_transform
from ropim.harness.data.views import SeededViews, pretrain_views
from ropim.harness.errors import ConfigError
from ropim.harness.fast_views import BatchNormalizer
from ropim.harness.flops import HOW, StepCost, count_flops, steps_for_budget
from ropim.harness.knn import knn_accuracy
from ropim.harness.loop import Hooks, LoopPlan, StepLoss, plan_steps, train_loop
from ropim.harness.methods import MaskingMethod, Recipe
from ropim.harness.optim import OptimSettings, build_optimizer, pretrain_scheduler, resolve
from ropim.harness.probe import extract_features, probe_accuracy
from ropim.harness.records import (
    code_version,
    hardware,
    json_object,
    library_versions,
    loaded_module_files,
    write_json,
)
from ropim.harness.registry import build_method, method_class
from ropim.harness.resolution import CONFIG, Resolution, choose
from ropim.harness.run_progress import RunProgress
from ropim.harness.runtime import (
    build_encoder,
    gather,
    make_fabric,
    resolve_device,
    weights_digest,
)
from ropim.harness.seeding import make_generator
from ropim.harness.visualize import save_reconstructions


@dataclass
class Pretraining:
    """A method set up to train: what :func:`pretrain` runs and ``bench`` times."""

    fabric: Fabric
    method: MaskingMethod
    settings: OptimSettings
    optimizer: torch.optim.Optimizer
    normalize: BatchNormalizer  # uint8 batches (decoder-space crops) -> normalised floats
    card: Resolution  # every resolved value with its source

    def step_cost(self, batch_size: int, img_size: int, in_chans: int, seed: int) -> StepCost:
        """One training step's FLOPs at the run's per-device batch and resolution, counted on
        a synthetic uint8 batch through the same loss the loop calls (nothing of it is kept)."""
        device = self.fabric.device
        self.method.to(device)
        images = torch.randint(
            0, 256, (batch_size, in_chans, img_size, img_size), dtype=torch.uint8,
            generator=torch.Generator().manual_seed(seed),
        ).to(device)  # fmt: skip
        loss = self.step_loss(seed)
        per_device = count_flops(self.method, lambda: loss(self.method, (images,), 0)[0])
        return StepCost(per_device * self.fabric.world_size, per_device, HOW)

    def set_progress(self, progress: RunProgress) -> None:
        """What the method reads while computing this step's loss (ramps over the run)."""
        self.method.progress = progress

    def step_loss(self, seed: int) -> StepLoss:
        """The method's loss on a batch of views; its own randomness (sketches, masks) comes
        from a generator seeded per (seed, step, rank)."""
        device, rank = self.fabric.device, self.fabric.global_rank

        def loss(model: nn.Module, batch: Any, step: int) -> tuple[Tensor, dict[str, Tensor]]:
            images = self.normalize(batch[0] if isinstance(batch, (list, tuple)) else batch)
            return model(images, make_generator(device, seed, "method", step, rank)), {}

        return loss


# A diverged run resumes from its last (finite) checkpoint with a lower learning rate: these
# settings may change on resume, each change printed and recorded in run.json.
LR_KEYS = ("train.base_lr", "train.min_lr", "train.warmup_lr")


def recipe_line(
    name: str,
    settings: OptimSettings,
    epochs: float,
    total_steps: int,
    world: int,
    cost: StepCost | None = None,
    flops_budget: float | None = None,
) -> str:
    """What a run resolved, printed before its first step (as MAE's scripts do)."""
    clip = "off" if settings.clip_grad is None else f"{settings.clip_grad:g}"
    schedule = settings.schedule + (
        f" (x{settings.decay_rate:g} at {list(settings.decay_at)})"
        if settings.schedule == "multistep"
        else ""
    )
    return (
        f"{name}: lr {settings.lr:.3g} = base_lr {settings.base_lr:g} x total batch "
        f"{settings.total_batch} ({world} device(s)) / {settings.lr_batch_divisor}; min lr "
        f"{settings.min_lr:.3g}; warmup {settings.warmup_epochs:g} epochs from "
        f"{settings.warmup_lr:.3g}; {schedule}; wd {settings.weight_decay:g}; betas "
        f"{tuple(settings.betas)}; clip {clip}; {epochs:g} epochs = {total_steps} steps"
        + flops_phrase(total_steps, cost, flops_budget)
    )


def flops_phrase(total_steps: int, cost: StepCost | None, flops_budget: float | None) -> str:
    """The cost part of the recipe line: FLOPs per step and in all, and the budget they fill."""
    if cost is None:
        return ""
    phrase = (
        f" x {cost.flops_per_step:.4g} FLOPs = {total_steps * cost.flops_per_step:.4g} "
        f"training FLOPs"
    )
    if flops_budget is not None:
        phrase += f" (train.flops_budget {flops_budget:.4g}: floor(budget / step), epochs unused)"
    return phrase


def method_files(cls: type) -> list[Path]:
    """The files of a method a run imported: the module defining it and the helper modules
    (``_name.py``) of its package it loaded."""
    module = cls.__module__
    package = module.rpartition(".")[0]
    helpers = [
        f
        for f in loaded_module_files([package] if package else [])
        if f.stem.startswith("_") and f.stem != "__init__"
    ]
    own = loaded_module_files([module])
    return sorted({*own, *helpers})


def _earlier_resume_changes(run_dir: Path) -> list[dict[str, Any]]:
    """The settings changes of earlier resumes, kept across rewrites of ``run.json``."""
    try:
        return json_object(run_dir / "run.json").get("resume_changes", [])
    except ValueError:  # none yet, or unreadable: it is rewritten now
        return []


def resume_fingerprint(cfg: Config) -> dict[str, Any]:
    """What a checkpoint must have been trained with to be continued: every setting that
    changes the result, not where the run folder lives (a moved folder resumes)."""
    values = cfg.to_dict()
    values["run"] = {k: v for k, v in values["run"].items() if k not in ("output_dir", "name")}
    return values


def fill_from_recipe(cfg: Config, recipe: Recipe) -> Resolution:
    """The pre-training view and drop path the config leaves unset come from the method's
    recipe (MAE: bicubic crops 0.2–1 and no drop path; ROPIM/SimMIM: bilinear 0.67–1 and 0.1);
    filled into ``cfg``, each with its source."""
    found = Resolution()
    for section, key, recipe_value in (
        ("data", "crop_scale", list(recipe.crop_scale)),
        ("data", "interpolation", recipe.interpolation),
        ("model", "drop_path", recipe.drop_path),
    ):
        owner = getattr(cfg, section)
        value, source = choose(getattr(owner, key), recipe_value, recipe.source_of(key))
        setattr(owner, key, value)
        found.set(f"{section}.{key}", value, source)
    return found


@dataclass
class ResolvedPretraining:
    """A method built on its encoder with every pre-training value resolved, and the recipe
    card of all of them (``run.json``'s ``resolved``; ``ropim recipes`` prints the same)."""

    method: MaskingMethod
    settings: OptimSettings
    card: Resolution


SUITE_DEFAULT = "suite default"
CARD_MODEL = ("name", "img_size", "patch_size", "in_chans", "kwargs", "position", "init")
CARD_DATA = ("dataset", "crop_ratio", "hflip")
# What each JPEG decode is (the card names it beside where the value came from).
DECODE_SOURCES = {
    "full": "every pixel decoded, then RandomResizedCrop, as the official pipelines do (MAE "
    "main_pretrain.py:124, ROPIM data/data_ropim.py:74-75, SimMIM data/data_simmim.py)",
    "scaled": "a suite option: libjpeg-turbo decodes each crop at 1/2-1/8 scale where the crop "
    "allows (faster; not the official decode, docs/recipes.md)",
}
CARD_TRAIN = ("epochs", "batch_size")


def resolve_pretraining(
    cfg: Config,
    world_size: int,
    method_dirs: tuple[str | Path, ...] = (),
    given: set[str] | None = None,
) -> ResolvedPretraining:
    """Fill ``cfg`` from the method's recipe, build the method and resolve its optimiser.
    ``given``: the dotted keys the preset set (the card says "config" for those and "suite
    default" for the rest); None: every non-recipe value counts as the config's."""
    recipe = method_class(cfg.method.get("name", ""), method_dirs).recipe
    owned = fill_from_recipe(cfg, recipe)
    method = build_method(cfg.method, build_encoder(cfg), method_dirs)
    settings = resolve(cfg.train, recipe, world_size)

    def source(key: str) -> str:
        return CONFIG if given is None or key in given else SUITE_DEFAULT

    card = Resolution()
    for section, keys in (("model", CARD_MODEL), ("data", CARD_DATA), ("train", CARD_TRAIN)):
        for key in keys:
            card.set(
                f"{section}.{key}", getattr(getattr(cfg, section), key), source(f"{section}.{key}")
            )
    if cfg.data.dataset == "imagefolder":  # the bundled digits are no JPEGs
        decode = cfg.data.decode
        card.set("data.decode", decode, f"{source('data.decode')}: {DECODE_SOURCES[decode]}")
    card.merge(owned)
    built = f"built from model.name {cfg.model.name!r} and model.kwargs"
    for key, value in method.backbone.facts().items():
        card.set(f"encoder.{key}", value, built)
    card.set(
        "train.precision",
        resolve_device(cfg.train.accelerator, cfg.train.precision)[1],
        source("train.precision"),
    )
    card.set("train.devices", world_size, "the launcher (torchrun/srun world size)")
    for key, value in method.settings.items():
        given_here = given is None or f"method.{key}" in given
        card.set(f"method.{key}", value, CONFIG if given_here else recipe.source_of(key))
    for key, (what, where) in method.fixed_choices.items():
        card.set(f"method.{key}", what, where)
    card.set("optim.optimizer", "adamw", recipe.source)
    for key, value in settings.as_dict().items():
        card.set(f"optim.{key}", value, settings.sources[key])
    card.set(
        "optim.no_weight_decay",
        sorted(method.no_weight_decay()),
        "the method's no_weight_decay(), besides 1-D parameters and biases",
    )
    return ResolvedPretraining(method, settings, card)


def set_up_pretraining(cfg: Config, method_dirs: tuple[str | Path, ...] = ()) -> Pretraining:
    fabric = make_fabric(cfg.train.accelerator, cfg.train.precision)
    resolved = resolve_pretraining(cfg, fabric.world_size, method_dirs)
    method, settings = resolved.method, resolved.settings
    normalize = BatchNormalizer(*dataset_stats(cfg.data))
    return Pretraining(
        fabric, method, settings, build_optimizer(method, settings), normalize, resolved.card
    )


class RunImages:
    """The images of one run, each split loaded once and shared by the training views, the
    k-NN monitor, the reconstruction figure and the probe."""

    def __init__(self, cfg: Config) -> None:
        self.data = cfg.data
        self._loaded: dict[str, Dataset] = {}

    def split(self, name: str | None = None) -> Dataset:
        name = name or self.data.split
        if name not in self._loaded:
            self._loaded[name] = load_images(self.data, name)
        return self._loaded[name]


def pretrain(
    cfg: Config,
    *,
    resume: bool = False,
    method_dirs: tuple[str | Path, ...] = (),
    after_step: Sequence[Callable[[int], None]] = (),
) -> Path:
    """Pre-train ``cfg.method`` on ``cfg.data``; returns the run directory. ``after_step``
    callbacks run after every step (tests use one to simulate a crash).

    The steps: set the method up, check the folder, load the data, plan the loop, record the
    start, train, record the end, then the figure and the optional probe."""
    started = time.perf_counter()
    setup = set_up_pretraining(cfg, method_dirs)
    fabric, method, settings = setup.fabric, setup.method, setup.settings
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    _refuse_overwrite(run_dir, resume)
    images = RunImages(cfg)
    views = pretrain_views(
        cfg.data, cfg.model.img_size, cfg.model.in_chans, cfg.run.seed, images.split()
    )
    cost = setup.step_cost(
        cfg.train.batch_size, cfg.model.img_size, cfg.model.in_chans, cfg.run.seed
    )
    plan = _loop_plan(cfg, setup, cost)
    per_epoch, total_steps = plan_steps(len(views), plan, fabric.world_size)
    warmup_steps = round(settings.warmup_epochs * per_epoch)
    scheduler = pretrain_scheduler(setup.optimizer, settings, total_steps, warmup_steps)
    world = fabric.world_size
    epochs = total_steps / per_epoch if cfg.train.flops_budget else cfg.train.epochs
    fabric.print(
        recipe_line(method.name, settings, epochs, total_steps, world, cost, cfg.train.flops_budget)
    )
    record = _start_record(cfg, setup, views, per_epoch, total_steps, run_dir, resume, cost)
    monitor_every = round(cfg.probe.knn_every * per_epoch)
    monitor = knn_monitor(cfg, method, fabric.device, images)
    hooks = Hooks(
        loss=setup.step_loss(cfg.run.seed),
        evaluate=monitor if monitor_every else None,
        evaluate_every=monitor_every,
        after_step=after_step,
        before_update=setup.set_progress,
        after_update=method.after_step,
    )
    result = train_loop(
        fabric,
        method,
        setup.optimizer,
        scheduler,
        views,
        plan,
        hooks,
        run_dir,
        record["architecture"],
        fingerprint=resume_fingerprint(cfg),
    )
    _finish_record(record, cfg, setup, result, per_epoch)
    record["training_flops"] = result.progress.step * cost.flops_per_step
    if fabric.global_rank == 0:
        _after_training(cfg, setup, images, record, run_dir)
        record["wall_time_s"] = time.perf_counter() - started
        write_json(run_dir / "run.json", record)
        fabric.print(
            f"done: {record['steps']} steps, {record['images_per_s']:.1f} images/s, train "
            f"{record['train_time_s']:.0f}s, wall {record['wall_time_s']:.0f}s -> {run_dir}"
        )
    fabric.barrier()
    return run_dir


def _refuse_overwrite(run_dir: Path, resume: bool) -> None:
    if CheckpointDir(run_dir).latest() is not None and not resume:
        raise ConfigError(
            f"{run_dir} already holds checkpoints; pass --resume to continue it, "
            f"or choose a new run.name"
        )


def _loop_plan(cfg: Config, setup: Pretraining, cost: StepCost) -> LoopPlan:
    """The loop's plan: ``train.epochs``, or the steps ``train.flops_budget`` buys."""
    train_cfg = cfg.train
    budget = train_cfg.flops_budget
    return LoopPlan(
        steps=None if budget is None else steps_for_budget(budget, cost),
        epochs=None if budget is not None else train_cfg.epochs,
        flops_per_step=cost.flops_per_step,
        batch_size=train_cfg.batch_size,
        seed=cfg.run.seed,
        log_every=train_cfg.log_every,
        checkpoint_every=train_cfg.checkpoint_every,
        keep_checkpoints=train_cfg.keep_checkpoints,
        num_workers=cfg.data.num_workers,
        clip_grad=setup.settings.clip_grad,
        time_budget_s=train_cfg.time_budget_s,
        desc=f"{setup.method.name} pre-train",
        resume_may_change=LR_KEYS,
        tracking=cfg.log,
    )


def _start_record(
    cfg: Config,
    setup: Pretraining,
    views: Dataset,
    per_epoch: int,
    total_steps: int,
    run_dir: Path,
    resume: bool,
    cost: StepCost,
) -> dict[str, Any]:
    """``run.json`` as the run starts (status running), and ``config.yaml``, written by rank 0:
    what a crashed run leaves behind says what it was."""
    fabric, method = setup.fabric, setup.method
    skipped = skipped_images(views.images)  # type: ignore[attr-defined]
    if skipped:
        fabric.print(
            f"data.on_bad_image=skip: left out {len(skipped)} unreadable image(s), e.g. "
            f"{skipped[0]} (all listed in run.json)"
        )
    train_cfg = cfg.train
    record: dict[str, Any] = {
        "status": "running",
        "run_name": cfg.run.name,
        "seed": cfg.run.seed,
        "method": method.settings,
        "recipe": method.recipe.as_dict(),
        "optim": setup.settings.as_dict(),
        "resolved": setup.card.as_dict(),
        "architecture": method.signature(),
        "dataset": {
            "name": cfg.data.dataset,
            "root": cfg.data.root,
            "images": len(views),
            "skipped_images": skipped,
            "skipped_count": len(skipped),
        },
        "world_size": fabric.world_size,
        "precision": resolve_device(train_cfg.accelerator, train_cfg.precision)[1],
        "device": str(fabric.device),
        "steps_per_epoch": per_epoch,
        "total_steps": total_steps,
        **cost.as_dict(),
        "training_flops": 0.0,  # steps done x flops_per_step; metrics.csv has it per logged step
        "code": code_version(method_files(type(method))),
        "libraries": library_versions(),
        "hardware": hardware(),
        "started_at": datetime.now(timezone.utc).isoformat(),
        "resume_changes": _earlier_resume_changes(run_dir) if resume else [],
    }
    if fabric.global_rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        write_json(run_dir / "run.json", record)
    fabric.barrier()
    return record


def _finish_record(
    record: dict[str, Any], cfg: Config, setup: Pretraining, result: Any, per_epoch: int
) -> None:
    """What the loop did: steps, epochs, why it stopped, throughput, weight digests per rank."""
    progress = result.progress
    record.update(
        status="finished",
        finished_at=datetime.now(timezone.utc).isoformat(),
        steps=progress.step,
        epochs_completed=progress.step / per_epoch,
        budget={
            "kind": "flops"
            if cfg.train.flops_budget
            else ("seconds" if cfg.train.time_budget_s else "epochs"),
            "epochs": None if cfg.train.flops_budget else cfg.train.epochs,
            "flops_budget": cfg.train.flops_budget,
            "time_budget_s": cfg.train.time_budget_s,
            "stopped_by": progress.stopped_by,
        },
        images_seen=progress.images_seen,
        train_time_s=progress.train_time_s,
        images_per_s=progress.images_seen / max(progress.train_time_s, 1e-9),
        weights_sha256_per_rank=gather(weights_digest(setup.method)),
    )
    if result.resume_changes:
        record["resume_changes"].append(
            {"from_step": result.resumed_from, "changes": result.resume_changes}
        )


def _after_training(
    cfg: Config, setup: Pretraining, images: RunImages, record: dict[str, Any], run_dir: Path
) -> None:
    """Rank 0: the reconstruction figure (skipped with a note, never a failed run) and the
    optional probe."""
    fabric, method = setup.fabric, setup.method
    if cfg.train.reconstruction_images:
        try:  # a figure: a method whose prediction is not pixels may not draw one
            _write_reconstructions(cfg, method, fabric.device, run_dir, images.split())
        except Exception as exc:  # noqa: BLE001 - never fail a finished run on its figure
            note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            record["reconstructions"] = f"skipped ({note})"
            fabric.print(
                f"note: reconstructions.png skipped: {method.name}'s reconstruct hook could "
                f"not draw its prediction ({note}); override reconstruct() (`ropim docs methods`)"
            )
    if cfg.probe.enabled:
        record["probe"] = _run_probe(cfg, method, fabric, images)


def knn_monitor(cfg: Config, method: MaskingMethod, device: torch.device, images: RunImages):
    """k-NN top-1 of the encoder's features on the val split against a fixed subset of the
    train split (evaluation views): the learning curve of a pre-training run, written to
    ``evaluations.csv`` every ``probe.knn_every`` epochs. Draws no randomness, so the run's
    weights are the same with or without it. The splits load when first evaluated."""
    transform = eval_transform(cfg.data, cfg.model.img_size, cfg.model.in_chans)

    def splits() -> tuple[Dataset, Dataset]:
        train_images = images.split("train")
        if len(train_images) > cfg.probe.knn_train_images:
            keep = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))
            train_images = Subset(train_images, keep[: cfg.probe.knn_train_images].sort().values)
        train_set = SeededViews(train_images, transform, cfg.run.seed)
        return train_set, SeededViews(images.split("val"), transform, cfg.run.seed)

    def evaluate(model: nn.Module, step: int) -> dict[str, float]:
        train_set, val_set = splits()
        train_x, train_y = extract_features(method.backbone, train_set, device)
        val_x, val_y = extract_features(method.backbone, val_set, device)
        classes = int(max(train_y.max(), val_y.max())) + 1
        scores = {}
        for kind in train_x:
            scores[f"knn_{kind}"] = knn_accuracy(
                torch.from_numpy(train_x[kind]).to(device),
                torch.from_numpy(train_y).to(device),
                torch.from_numpy(val_x[kind]).to(device),
                torch.from_numpy(val_y).to(device),
                classes,
                cfg.probe.knn_k,
            )
        return scores

    return evaluate


def _write_reconstructions(
    cfg: Config, method: MaskingMethod, device: torch.device, run_dir: Path, images: Dataset
) -> None:
    transform = eval_transform(cfg.data, cfg.model.img_size, cfg.model.in_chans)
    count = min(cfg.train.reconstruction_images, len(images))
    spread = torch.linspace(0, len(images) - 1, count).long().tolist()  # not just one class
    batch = torch.stack([transform(images[i][0]) for i in spread]).to(device)
    mean, std = dataset_stats(cfg.data)
    generator = make_generator(device, cfg.run.seed, "figure")
    save_reconstructions(method, batch, run_dir / "reconstructions.png", mean, std, generator)


def _run_probe(
    cfg: Config, method: MaskingMethod, fabric: Fabric, images: RunImages
) -> dict[str, Any]:
    transform = eval_transform(cfg.data, cfg.model.img_size, cfg.model.in_chans)
    train_set = SeededViews(images.split("train"), transform, cfg.run.seed)
    val_set = SeededViews(images.split("val"), transform, cfg.run.seed)
    device = fabric.device
    pretrained = probe_accuracy(method.backbone, train_set, val_set, device, cfg.probe.max_iter)
    random_init = probe_accuracy(
        build_encoder(cfg).to(device), train_set, val_set, device, cfg.probe.max_iter
    )
    fabric.print(
        f"linear probe (logistic regression, frozen final layer) on {len(val_set)} held-out "
        f"images, trained on {len(train_set)}:"
    )
    names = {"cls": "cls token", "avg": "avg-pooled patch tokens"}
    for kind in pretrained:
        gain = (pretrained[kind] - random_init[kind]) * 100
        fabric.print(
            f"  {names[kind]:<24} pre-trained {pretrained[kind]:.2%} | random init "
            f"{random_init[kind]:.2%} | {gain:+.1f} points"
        )
    return {
        "pretrained_accuracy": pretrained,
        "random_init_accuracy": random_init,
        "train_images": len(train_set),
        "val_images": len(val_set),
    }
