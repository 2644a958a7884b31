"""The one training loop: pre-training, classification fine-tuning, segmentation and detection.

What every task shares lives here: seeded per-epoch batches (:func:`epoch_batches`) over
:class:`SeededViews`, the global RNG re-seeded per (seed, step, rank) so drop path and any
sampling inside the model replay exactly, the schedule stepped per iteration, gradient clipping,
progress and ``metrics.csv``, checkpoints every ``checkpoint_every`` steps and resume at the
exact step, an optional wall-clock budget. What differs is passed in as :class:`Hooks`: the
step's loss, an optional evaluation on an interval, and callbacks after each step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader

from ropim.harness.checkpoint import CheckpointDir
from ropim.harness.config import LogSection
from ropim.harness.data.batching import epoch_batches, steps_per_epoch
from ropim.harness.data.views import SeededViews
from ropim.harness.errors import ConfigError, TrainingError
from ropim.harness.flops import HOW as FLOPS_HOW
from ropim.harness.flops import count_flops
from ropim.harness.preemption import Preempted, stop_requests
from ropim.harness.progress import ProgressDisplay
from ropim.harness.records import MetricsLog
from ropim.harness.run_progress import RunProgress
from ropim.harness.seeding import derive_seed, seed_torch
from ropim.harness.tasks import TrainingSettings
from ropim.harness.tracking import Tracker

# (model, batch, step) -> (loss, named loss terms to log); the model is the Fabric-wrapped one.
StepLoss = Callable[[nn.Module, Any, int], tuple[Tensor, dict[str, Tensor]]]

# After a divergence, a checkpoint is offered for the resume only if its weights are finite and
# at most this large: trained ViT weights stay within ~1e2, while weights on their way to a
# non-finite loss grow by many orders of magnitude first (1e10 seen in the wild).
SANE_WEIGHT_BOUND = 1e4


@dataclass
class LoopPlan:
    """How long and how to train. ``batch_size`` is per device, as everywhere in the suite."""

    steps: int | None  # None: ``epochs`` × steps per epoch
    batch_size: int
    seed: int
    epochs: float | None = None
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    num_workers: int = 0
    clip_grad: float | None = None
    time_budget_s: float | None = None  # stop (and save) once training used this long
    # One step's FLOPs (all devices): given (pre-training counts them before planning), or
    # counted on this invocation's first batch; then metrics.csv logs the cumulative FLOPs.
    flops_per_step: float | None = None
    keep_history: bool = False  # every step's loss terms, kept in the checkpoint (dense tasks)
    collate: Callable | None = None
    desc: str = "train"
    # Fingerprint keys a resume may change (the learning rate after a divergence); each change
    # is printed and returned in LoopResult.resume_changes.
    resume_may_change: tuple[str, ...] = ()
    batch_key: str = "train.batch_size"  # the setting an error about the batch names
    tracking: LogSection = field(default_factory=LogSection)  # TensorBoard / W&B beside the CSVs

    @classmethod
    def for_task(cls, settings: TrainingSettings, seed: int, desc: str, **rest: Any) -> LoopPlan:
        """A downstream fine-tune's plan: batch, intervals and workers from its settings."""
        fields = {"steps": None, "batch_size": settings.batch_size} | rest
        return cls(
            seed=seed,
            log_every=settings.log_every,
            checkpoint_every=settings.checkpoint_every,
            num_workers=settings.num_workers,
            desc=desc,
            **fields,
        )


@dataclass
class Hooks:
    """What differs between tasks."""

    loss: StepLoss
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None  # -> evaluations.csv
    evaluate_every: int = 0  # steps; 0: never
    after_step: Sequence[Callable[[int], None]] = field(default_factory=list)  # e.g. a test's
    # Around each optimiser step, with the run's progress: before the loss (steps done so far)
    # and right after the update, before logging, evaluation and checkpoint (steps done now).
    before_update: Callable[[RunProgress], None] | None = None
    after_update: Callable[[RunProgress], None] | None = None


@dataclass
class Progress:
    step: int = 0
    images_seen: int = 0
    train_time_s: float = 0.0
    stopped_by: str = "schedule"  # or "time_budget"


@dataclass
class LoopResult:
    model: nn.Module  # as set up by Fabric, in eval mode
    progress: Progress
    steps_per_epoch: int
    total_steps: int
    history: list[dict[str, float]]  # per step, when the plan keeps it
    resume_changes: list[str] = field(default_factory=list)  # "key: old -> new" on resume
    resumed_from: int = 0  # the step this invocation started at
    flops_per_step: float | None = None  # all devices, counted (ropim.harness.flops)

    def cost(self) -> dict[str, Any]:
        """What a task records of its training cost: FLOPs per step and in all."""
        fps = self.flops_per_step
        return {
            "flops_per_step": fps,
            "training_flops": None if fps is None else fps * self.progress.step,
            "flops_counted_by": FLOPS_HOW,
        }

    def mean_of(self, key: str, part: str) -> float:
        """Mean of ``key`` over the first or last tenth of the steps (at least one)."""
        span = max(1, len(self.history) // 10)
        chosen = self.history[:span] if part == "first" else self.history[-span:]
        return sum(row[key] for row in chosen) / len(chosen)

    def curve(self, key: str, windows: int = 8) -> list[float]:
        """Means of ``key`` over ``windows`` equal consecutive spans of the run."""
        values = [row[key] for row in self.history]
        size = max(1, len(values) // windows)
        spans = [values[i : i + size] for i in range(0, size * min(windows, len(values)), size)]
        return [sum(span) / len(span) for span in spans]


class TrainStep:
    """One optimisation step exactly as the loop runs it (benchmarks time this same object):
    RNG re-seeded for the step, loss, backward, a finite check of the loss and the gradient
    norm (all ranks agree; the weights are not touched when it fails), optional clipping,
    optimiser step."""

    def __init__(
        self,
        fabric: Any,
        model: nn.Module,
        optimizer: Any,
        loss: StepLoss,
        seed: int,
        clip_grad: float | None = None,
    ) -> None:
        self.fabric, self.model, self.optimizer = fabric, model, optimizer
        self.loss, self.seed, self.clip_grad = loss, seed, clip_grad

    def __call__(self, batch: Any, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        seed_torch(derive_seed(self.seed, "step", step, self.fabric.global_rank))
        loss, terms = self.loss(self.model, batch, step)
        self.fabric.backward(loss)
        norm = None
        if self.clip_grad is not None:
            norm = self.fabric.clip_gradients(
                self.model, self.optimizer, max_norm=self.clip_grad, error_if_nonfinite=False
            )
        self._check_finite(loss, norm, step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), {k: v.detach() for k, v in terms.items()}

    def _check_finite(self, loss: Tensor, norm: Tensor | None, step: int) -> None:
        """Raise :class:`NonFiniteStep` before the optimiser moves if this step's loss or
        gradient norm (the clipping's, else computed here) is not finite on any rank. Under
        fp16 loss scaling an overflow is the scaler's to skip, so only the loss counts there."""
        finite = torch.isfinite(loss.detach().float())
        if getattr(self.fabric.strategy.precision, "scaler", None) is None:
            if norm is None:
                grads = [p.grad for p in self.model.parameters() if p.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads) if grads else None
            if norm is not None:
                finite = finite & torch.isfinite(norm)
        if self.fabric.world_size > 1:
            finite = self.fabric.all_reduce(finite.float(), reduce_op="min") > 0
        if not bool(finite):
            raise NonFiniteStep(step + 1, float(loss.detach()))


class NonFiniteStep(Exception):
    """Step ``step`` produced a non-finite loss or gradient; nothing was updated."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(step, loss)
        self.step, self.loss = step, loss


def schedule_position(step: int, total: int, budget_s: float | None, used_s: float) -> int:
    """Under a time budget the schedule follows the share of the budget used, so warmup and
    decay complete when the time does; otherwise it follows the step."""
    if budget_s is None:
        return step
    return min(total, int(total * used_s / budget_s))


def _differences(before: Any, now: Any, key: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(now, dict):
        out = []
        for sub in sorted(set(before) | set(now)):
            out += _differences(before.get(sub), now.get(sub), f"{key}.{sub}" if key else sub)
        return out
    return [] if before == now else [f"{key}: {before!r} -> {now!r}"]


def train_loop(
    fabric: Any,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    views: SeededViews,
    plan: LoopPlan,
    hooks: Hooks,
    out_dir: Path,
    signature: dict[str, str],
    fingerprint: dict[str, Any],
) -> LoopResult:
    """Train ``module`` on ``views`` per ``plan``; resume from ``out_dir``'s newest checkpoint.

    ``fingerprint`` names what the run was started with (its settings, the weights it started
    from); a checkpoint made with another one is refused rather than silently continued.
    ``module`` is left in eval mode; the scheduler is built by the caller for
    :func:`LoopResult` ``total_steps`` (see :func:`plan_steps`).

    The steps: resume, open the logs, evaluate the starting point, then per batch: train one
    step, log the window, evaluate, checkpoint, stop when pre-empted.
    """
    run = _LoopRun(fabric, module, optimizer, scheduler, views, plan, hooks, out_dir)
    run.resume(signature, fingerprint)
    run.open_logs()
    if hooks.evaluate is not None and hooks.evaluate_every and run.progress.step == 0:
        run.evaluate()  # the curve's starting point: the encoder before any training step
    with stop_requests() as requests:
        run.model.train()
        while not run.finished():
            for batch in run.epoch_batches():
                run.train_step(batch)
                last = run.finished()
                if run.progress.step % plan.log_every == 0 or last:
                    run.log_window()
                every = hooks.evaluate_every
                if hooks.evaluate is not None and (
                    last or (every and run.progress.step % every == 0)
                ):
                    run.evaluate()
                saved = run.progress.step % plan.checkpoint_every == 0 or last
                if saved:
                    run.save_checkpoint(signature, fingerprint)
                for callback in hooks.after_step:
                    callback(run.progress.step)
                # Checked on the last step too: a signal that came during the final
                # evaluation or checkpoint must stop the command (and a driver running several
                # units) rather than be dropped when the handlers are restored.
                signum = requests.pending(fabric)
                if signum is not None:  # pre-empted: a checkpoint at this step, then stop
                    if not saved:
                        run.save_checkpoint(signature, fingerprint)
                    run.close()
                    raise Preempted(signum, run.progress.step, str(run.checkpoints.root))
                if last:
                    break
    run.close()
    run.model.eval()
    return run.result()


class _LoopRun:
    """The state of one :func:`train_loop` call and its named steps. Training time counts in
    windows between log rows; evaluation and checkpoint I/O are paused out of it."""

    def __init__(
        self,
        fabric: Any,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        views: SeededViews,
        plan: LoopPlan,
        hooks: Hooks,
        out_dir: Path,
    ) -> None:
        self.fabric, self.module, self.views, self.plan, self.hooks = (
            fabric, module, views, plan, hooks,
        )  # fmt: skip
        self.world, self.rank = fabric.world_size, fabric.global_rank
        self.per_epoch, self.total = plan_steps(len(views), plan, self.world)
        self.out_dir = out_dir
        self.checkpoints = CheckpointDir(out_dir, plan.keep_checkpoints)
        self.model, self.optimizer = fabric.setup(module, optimizer)
        self.scheduler = scheduler
        self.state: dict[str, Any] = {"optimizer": self.optimizer, "scheduler": scheduler}
        self.progress, self.history = Progress(), []
        self.resume_changes: list[str] = []
        self.resumed_from = 0
        self.global_batch = plan.batch_size * self.world
        self.window: dict[str, Tensor] = {}
        self.window_steps = 0
        self.window_start = time.perf_counter()
        self.flops_per_step = plan.flops_per_step

    def resume(self, signature: dict[str, str], fingerprint: dict[str, Any]) -> None:
        """Continue from the newest checkpoint, refusing one made with other settings than
        those the plan lets a resume change."""
        latest = self.checkpoints.latest()
        if latest is not None:
            plan = self.plan
            fresh_schedule = self.scheduler.state_dict()
            rest = self.checkpoints.load(self.fabric, latest, self.module, self.state, signature)
            saved = json.loads(rest.get("fingerprint", "null"))
            if saved is not None and saved != fingerprint:
                changes = _differences(saved, fingerprint)
                allowed = [c for c in changes if c.split(":")[0] in plan.resume_may_change]
                refused = [c for c in changes if c not in allowed]
                if refused:
                    may = ", ".join(plan.resume_may_change) or "none"
                    raise ConfigError(
                        f"{latest} was trained with other settings ({'; '.join(refused[:5])}); "
                        f"delete {self.checkpoints.root} to start afresh, or restore the "
                        f"settings (a resume may change: {may})"
                    )
                # The schedule is a function of the step: rebuild it from the new settings.
                self.scheduler.load_state_dict(fresh_schedule)
                self.resume_changes = allowed
                self.fabric.print(f"{plan.desc}: resuming with {'; '.join(allowed)}")
            self.progress = Progress(
                rest["step"], rest["images_seen"], rest["train_time_s"], rest["stopped_by"]
            )
            self.history = rest.get("history", [])
            self.fabric.print(f"{plan.desc}: resuming from step {self.progress.step} ({latest})")
        self.resumed_from = self.progress.step

    def open_logs(self) -> None:
        """The CSVs (cut back to the resumed step), the tracker and the progress display."""
        step = self.progress.step
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.out_dir / "metrics.csv")
        self.evaluations = MetricsLog(self.out_dir / "evaluations.csv")
        self.tracker = (
            Tracker(self.out_dir, self.plan.tracking, self.plan.desc, step)
            if self.rank == 0
            else None
        )
        if self.rank == 0:
            self.metrics.truncate_after(step)
            # From step 0 the step-0 evaluation runs again: keep none of the old rows.
            self.evaluations.truncate_after(step if step else -1)
        self.fabric.barrier()
        self.step_fn = TrainStep(
            self.fabric, self.model, self.optimizer, self.hooks.loss, self.plan.seed,
            self.plan.clip_grad,
        )  # fmt: skip
        self.display = ProgressDisplay(self.total, step, self.plan.desc, self.rank == 0)
        self.window_start = time.perf_counter()

    def running_time(self) -> float:
        return self.progress.train_time_s + time.perf_counter() - self.window_start

    def out_of_time(self) -> bool:
        budget = self.plan.time_budget_s
        return budget is not None and self.running_time() >= budget

    def finished(self) -> bool:
        return self.progress.step >= self.total or self.progress.stopped_by == "time_budget"

    def epoch_batches(self) -> Any:
        """The rest of the current epoch's batches for this rank (seeded, so a resumed run
        sees the very batches it would have seen)."""
        epoch, start_batch = divmod(self.progress.step, self.per_epoch)
        self.views.set_epoch(epoch)
        batches = epoch_batches(
            len(self.views),
            self.plan.batch_size,
            seed=self.plan.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world,
            start_batch=start_batch,
        )
        loader = DataLoader(
            self.views,
            batch_sampler=batches[: self.total - self.progress.step],
            num_workers=self.plan.num_workers,
            collate_fn=self.plan.collate,
            pin_memory=self.fabric.device.type == "cuda",
        )
        return self.fabric.setup_dataloaders(loader, use_distributed_sampler=False)

    def train_step(self, batch: Any) -> None:
        """One optimiser step at the scheduled lr; a non-finite loss stops with advice."""
        progress, plan = self.progress, self.plan
        position = schedule_position(
            progress.step, self.total, plan.time_budget_s, self.running_time()
        )
        self.scheduler.step_update(position)
        if self.flops_per_step is None:  # counted once per invocation, on its first batch
            self.flops_per_step = self.count_step(batch)
        if self.hooks.before_update is not None:
            self.hooks.before_update(self.run_progress())
        try:
            loss, terms = self.step_fn(batch, progress.step)
        except NonFiniteStep as bad:
            self.display.close()
            raise self._non_finite(bad) from None
        progress.step += 1
        if self.hooks.after_update is not None:
            self.hooks.after_update(self.run_progress())
        progress.images_seen += self.global_batch
        for name, value in {"loss": loss, **terms}.items():
            self.window[name] = self.window.get(name, 0.0) + value.float()
        self.window_steps += 1
        if plan.keep_history:
            self.history.append({name: float(v) for name, v in {"loss": loss, **terms}.items()})
        self.display.advance()
        if self.out_of_time():
            progress.stopped_by = "time_budget"

    def count_step(self, batch: Any) -> float:
        """FLOPs of one step on ``batch`` over all devices; nothing of the counted pass is kept
        (gradients, buffers and random generators restored)."""
        step = self.progress.step
        # A copy: a step's loss may change its batch in place (timm's mixup does), and the
        # real step must see the batch as the loader gave it.
        copy = tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, batch)

        def loss() -> Tensor:
            seed_torch(derive_seed(self.plan.seed, "step", step, self.rank))
            return self.hooks.loss(self.model, copy, step)[0]

        per_device = count_flops(self.module, loss)
        total = torch.tensor(per_device, device=self.fabric.device)
        return float(self.fabric.all_reduce(total, reduce_op="sum"))

    def flops_column(self, step: int) -> dict[str, float]:
        """Training FLOPs spent up to ``step`` (all devices), when they were counted."""
        fps = self.flops_per_step
        return {} if fps is None else {"training_flops": step * fps}

    def run_progress(self) -> RunProgress:
        return RunProgress(self.progress.step, self.total, self.per_epoch)

    def _non_finite(self, bad: NonFiniteStep) -> TrainingError:
        plan = self.plan
        parameters = {name for name, _ in self.module.named_parameters()}
        kept, blown = self.checkpoints.newest_sane(SANE_WEIGHT_BOUND, parameters)
        where = f"{kept.name}, weights finite and below {SANE_WEIGHT_BOUND:.0e}" if kept else ""
        if blown:  # the newest checkpoints already hold blown-up weights: skip them
            named = ", ".join(f"{path.name} (max |w| {peak:.1e})" for path, peak in blown)
            if kept is not None and self.rank == 0:
                self.checkpoints.point_latest_at(kept)
            where += (
                f"; {named} blew up before the loss did, so 'latest' now names {kept.name} "
                f"(those stay on disk)"
                if kept
                else f"none usable: {named} blew up before the loss did"
            )
        where = where or "none yet"
        advice = (
            f"resume with a lower learning rate ({', '.join(plan.resume_may_change)})"
            if plan.resume_may_change and kept
            else "start again with a lower learning rate"
        )
        if plan.clip_grad is None:
            advice += " or with gradient clipping"
        return TrainingError(
            f"{plan.desc}: the loss or its gradient is not finite at step {bad.step} "
            f"(loss {bad.loss}); nothing of that step was applied or saved (last "
            f"checkpoint: {where}, in {self.checkpoints.root}): {advice}"
        )

    def log_window(self) -> None:
        """Mean loss terms over the window (all ranks), throughput and lr: one metrics row."""
        means = {
            name: float(self.fabric.all_reduce(value / self.window_steps, reduce_op="mean"))
            for name, value in self.window.items()
        }
        now = time.perf_counter()
        elapsed = now - self.window_start
        self.progress.train_time_s += elapsed
        throughput = self.window_steps * self.global_batch / max(elapsed, 1e-9)
        lr = self.optimizer.param_groups[-1]["lr"]
        self.display.report(means["loss"], lr, throughput)
        if self.tracker is not None:
            step = self.progress.step
            row = (
                {"step": step, "epoch": round(step / self.per_epoch, 4)}
                | means
                | {
                    "lr": lr,
                    "images_per_s": round(throughput, 2),
                    "elapsed_s": round(self.progress.train_time_s, 3),
                }
                | self.flops_column(step)
            )
            self.metrics.append(row)
            self.tracker.log("train", row, step)
        self.window, self.window_steps = {}, 0
        self.window_start = time.perf_counter()

    def evaluate(self) -> None:
        """The evaluation hook in eval mode, one ``evaluations.csv`` row; not training time."""
        pause = time.perf_counter()
        trained_s = self.running_time()
        step = self.progress.step
        self.model.eval()
        with torch.no_grad():
            scores = self.hooks.evaluate(self.model, step)  # type: ignore[misc]
        self.model.train()
        if self.tracker is not None:
            row = (
                {
                    "step": step,
                    "epoch": round(step / self.per_epoch, 4),
                    "train_seconds": round(trained_s, 3),
                }
                | self.flops_column(step)
                | scores
            )
            self.evaluations.append(row)
            self.tracker.log("eval", row, step)
        self.window_start += time.perf_counter() - pause

    def save_checkpoint(self, signature: dict[str, str], fingerprint: dict[str, Any]) -> None:
        """Weights, optimiser, schedule and progress at this step; not training time."""
        pause = time.perf_counter()
        progress = self.progress
        extra = {
            "step": progress.step,
            "images_seen": progress.images_seen,
            "train_time_s": progress.train_time_s,
            "stopped_by": progress.stopped_by,
            "fingerprint": json.dumps(fingerprint, sort_keys=True, default=str),
            "history": self.history,
        }
        self.checkpoints.save(
            self.fabric, progress.step, self.module, self.state | extra, signature
        )
        self.window_start += time.perf_counter() - pause

    def close(self) -> None:
        self.display.close()
        if self.tracker is not None:
            self.tracker.close()

    def result(self) -> LoopResult:
        return LoopResult(
            self.model,
            self.progress,
            self.per_epoch,
            self.total,
            self.history,
            self.resume_changes,
            self.resumed_from,
            self.flops_per_step,
        )


def plan_steps(num_items: int, plan: LoopPlan, world_size: int) -> tuple[int, int]:
    """Steps per epoch and in total for ``plan`` on ``num_items`` training items."""
    if plan.batch_size <= 0:
        raise ConfigError(f"{plan.desc}: batch size must be positive, got {plan.batch_size}")
    per_epoch = steps_per_epoch(num_items, plan.batch_size, world_size, plan.batch_key)
    if plan.steps is not None:
        return per_epoch, max(1, plan.steps)
    if plan.epochs is None:
        raise ConfigError(f"{plan.desc}: set a number of steps or epochs")
    return per_epoch, max(1, math.ceil(plan.epochs * per_epoch))
