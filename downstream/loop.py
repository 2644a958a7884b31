"""The iteration loop dense fine-tuning shares (segmentation, detection): seeded per-epoch
batches, Fabric devices and precision, progress and ``metrics.csv``, checkpoints every
``checkpoint_every`` iterations and resume from the newest one."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ropim.checkpoint import CheckpointDir
from ropim.data import SeededViews, epoch_batches
from ropim.errors import ConfigError
from ropim.progress import ProgressDisplay
from ropim.run_record import MetricsLog
from ropim.seeding import derive_seed

StepLoss = Callable[[nn.Module, Any], tuple[Tensor, dict[str, float]]]


class SeededPairs(SeededViews):
    """:class:`SeededViews` for dense tasks, whose augmentation moves the target with the image:
    ``augment(input, target, generator)`` may draw from the generator or from torch's global
    RNG, both seeded by (seed, purpose, epoch, index)."""

    def __init__(self, data: Dataset, augment: Callable, seed: int, purpose: str) -> None:
        super().__init__(data, augment, seed)  # type: ignore[arg-type]
        self.purpose = purpose

    def __getitem__(self, index: int):
        first, second = self.images[index]
        seed = derive_seed(self.seed, self.purpose, self.epoch, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(first, second, torch.Generator().manual_seed(seed))


def layer_decay_adamw(
    model: nn.Module, lr: float, weight_decay: float, layer_decay: float, betas: list[float]
) -> torch.optim.Optimizer:
    """AdamW with timm's layer-wise lr decay (the model's ``group_matcher``) and no decay on
    norms, biases and the model's ``no_weight_decay`` names."""
    return create_optimizer_v2(
        model,
        "adamw",
        lr=lr,
        weight_decay=weight_decay,
        layer_decay=layer_decay,
        betas=tuple(betas),
    )


@dataclass
class LoopPlan:
    iterations: int
    batch_size: int  # over all devices
    log_every: int
    checkpoint_every: int
    num_workers: int
    seed: int

    @classmethod
    def of(cls, settings: Any, iterations: int, seed: int) -> LoopPlan:
        """From a task's settings (batch_size, log_every, checkpoint_every, num_workers)."""
        return cls(
            iterations,
            settings.batch_size,
            settings.log_every,
            settings.checkpoint_every,
            settings.num_workers,
            seed,
        )


@dataclass
class LoopResult:
    model: nn.Module  # set up by Fabric, in eval mode
    train_seconds: float
    history: list[dict[str, float]]  # per iteration: "loss" and its terms

    def mean_of(self, key: str, part: str) -> float:
        """Mean of ``key`` over the first or last tenth of the iterations (at least one)."""
        span = max(1, len(self.history) // 10)
        chosen = self.history[:span] if part == "first" else self.history[-span:]
        return sum(row[key] for row in chosen) / len(chosen)

    def curve(self, key: str, windows: int = 8) -> list[float]:
        """Means of ``key`` over ``windows`` equal consecutive spans of the run."""
        values = [row[key] for row in self.history]
        size = max(1, len(values) // windows)
        spans = [values[i : i + size] for i in range(0, size * min(windows, len(values)), size)]
        return [sum(span) / len(span) for span in spans]


def train_iterations(
    fabric: Any,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    views: SeededViews,
    plan: LoopPlan,
    step_loss: StepLoss,
    out_dir: Path,
    desc: str,
    collate: Callable | None = None,
) -> LoopResult:
    """Train ``model`` for ``plan.iterations`` on ``views``, re-seeded per epoch."""
    world, rank = fabric.world_size, fabric.global_rank
    if plan.batch_size % world:
        raise ConfigError(f"batch size {plan.batch_size} must divide over {world} devices")
    per_device = plan.batch_size // world
    num_items = len(views)
    per_epoch = num_items // plan.batch_size
    if per_epoch == 0:
        raise ConfigError(f"{num_items} training images is fewer than batch size {plan.batch_size}")
    checkpoints = CheckpointDir(out_dir)
    state: dict[str, Any] = {"optimizer": optimizer, "scheduler": scheduler}
    step, train_time, history = 0, 0.0, []
    latest = checkpoints.latest()
    if latest is not None:
        rest = checkpoints.load(fabric, latest, model, state)
        step, train_time, history = rest["step"], rest["train_time_s"], rest["history"]
        fabric.print(f"{desc}: resuming from iteration {step} ({latest})")
    signature = model.signature()  # type: ignore[operator]
    model, optimizer = fabric.setup(model, optimizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out_dir / "metrics.csv")
    if rank == 0:
        log.truncate_after(step)
    total = plan.iterations
    display = ProgressDisplay(total, step, desc, rank == 0)
    model.train()
    window_start, window_images = time.perf_counter(), 0
    while step < total:
        epoch, start_batch = divmod(step, per_epoch)
        views.set_epoch(epoch)
        batches = epoch_batches(
            num_items,
            per_device,
            seed=plan.seed,
            epoch=epoch,
            rank=rank,
            world_size=world,
            start_batch=start_batch,
        )
        loader = DataLoader(
            views,
            batch_sampler=batches[: total - step],
            num_workers=plan.num_workers,
            collate_fn=collate,
        )
        for batch in fabric.setup_dataloaders(loader, use_distributed_sampler=False):
            scheduler.step_update(step)
            loss, parts = step_loss(model, batch)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_images += per_device * world
            history.append({"loss": float(loss.detach())} | parts)
            display.advance()
            if step % plan.log_every == 0 or step == total:
                now = time.perf_counter()
                train_time += now - window_start
                speed = window_images / max(now - window_start, 1e-9)
                lr = optimizer.param_groups[-1]["lr"]
                display.report(history[-1]["loss"], lr, speed)
                if rank == 0:
                    log.append(
                        {
                            "step": step,
                            "epoch": round(step / per_epoch, 4),
                            "loss": history[-1]["loss"],
                            "lr": lr,
                            "images_per_s": round(speed, 2),
                            "elapsed_s": round(train_time, 2),
                        }
                    )
                window_start, window_images = time.perf_counter(), 0
            if step % plan.checkpoint_every == 0 or step == total:
                extra = {"step": step, "train_time_s": train_time, "history": history}
                checkpoints.save(fabric, step, model, state | extra, signature)
                window_start = time.perf_counter()
    display.close()
    model.eval()
    return LoopResult(model, train_time, history)
