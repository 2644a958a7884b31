"""The one pre-training loop shared by every masking method; it knows no method by name."""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from lightning_fabric import Fabric
from torch.utils.data import DataLoader

from ropim.backbone import ViTBackbone
from ropim.checkpoint import CheckpointDir
from ropim.config import Config, save_config
from ropim.data import (
    SeededViews,
    dataset_stats,
    epoch_batches,
    eval_transform,
    load_images,
    pretrain_transform,
    steps_per_epoch,
)
from ropim.errors import ConfigError
from ropim.method import MaskingMethod
from ropim.optim import build_optimizer, build_scheduler, resolve
from ropim.probe import probe_accuracy
from ropim.progress import ProgressDisplay
from ropim.registry import build_method
from ropim.run_record import MetricsLog, code_version, hardware, library_versions, write_json
from ropim.seeding import derive_seed, make_generator
from ropim.visualize import save_reconstructions

CRASH_ENV = "ROPIM_CRASH_AFTER_STEP"  # test hook: hard-exit right after this step


def resolve_device(accelerator: str = "auto", precision: str = "auto") -> tuple[str, str]:
    """``auto`` means CUDA with bf16 autocast where available, else fp32 on the CPU."""
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "auto":
        use_bf16 = accelerator == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16-mixed" if use_bf16 else "32-true"
    return accelerator, precision


def make_fabric(accelerator: str = "auto", precision: str = "auto") -> Fabric:
    """One process per device; under torchrun the world comes from its environment."""
    accelerator, precision = resolve_device(accelerator, precision)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fabric = Fabric(
        accelerator=accelerator,
        devices=local,
        num_nodes=max(world // local, 1),
        strategy="ddp" if world > 1 else "auto",
        precision=precision,  # type: ignore[arg-type]
    )
    fabric.launch()
    return fabric


def build_encoder(cfg: Config) -> ViTBackbone:
    """The backbone at its seeded initialisation (identical for every method and rank)."""
    torch.manual_seed(derive_seed(cfg.run.seed, "init"))
    m = cfg.model
    return ViTBackbone(m.name, m.img_size, m.patch_size, m.in_chans, m.drop_path, **m.kwargs)


def weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _gather(value: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _check_resumable(run_dir: Path, cfg: Config) -> None:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    before = yaml.safe_load(saved.read_text())
    now = cfg.to_dict()
    diffs = [
        f"{section}.{key}: {before[section].get(key)!r} -> {value!r}"
        for section, values in now.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if before.get(section, {}).get(key) != value
    ]
    if diffs:
        raise ConfigError(
            f"cannot resume {run_dir} with a different config ({'; '.join(diffs)}); "
            f"start a new run with run.name=..."
        )


@dataclass
class Progress:
    step: int = 0
    images_seen: int = 0
    train_time_s: float = 0.0
    stopped_by: str = "epochs"


def _schedule_position(step: int, total_steps: int, budget_s: float | None, used_s: float) -> int:
    """Under a time budget the schedule follows the share of the budget used, so warmup and
    cosine complete when the time does; otherwise it follows the step."""
    if budget_s is None:
        return step
    return min(total_steps, int(total_steps * used_s / budget_s))


def pretrain(
    cfg: Config, *, resume: bool = False, method_dirs: tuple[str | Path, ...] = ()
) -> Path:
    """Pre-train ``cfg.method`` on ``cfg.data``; returns the run directory."""
    started = time.perf_counter()
    fabric = make_fabric(cfg.train.accelerator, cfg.train.precision)
    rank0 = fabric.global_rank == 0
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    checkpoints = CheckpointDir(run_dir, cfg.train.keep_checkpoints)
    latest = checkpoints.latest()
    if latest is not None and not resume:
        raise ConfigError(
            f"{run_dir} already holds checkpoints; pass --resume to continue it, "
            f"or choose a new run.name"
        )
    if resume and latest is not None:
        _check_resumable(run_dir, cfg)

    method = build_method(cfg.method, build_encoder(cfg), method_dirs)
    images = load_images(cfg.data)
    views = SeededViews(
        images, pretrain_transform(cfg.data, cfg.model.img_size, cfg.model.in_chans), cfg.run.seed
    )
    world = fabric.world_size
    batch = cfg.train.batch_size
    per_epoch = steps_per_epoch(len(views), batch, world)
    total_steps = max(1, math.ceil(cfg.train.epochs * per_epoch))
    settings = resolve(cfg.train, method.recipe, world)
    optimizer = build_optimizer(method, settings)
    scheduler = build_scheduler(
        optimizer, total_steps, round(settings.warmup_epochs * per_epoch), settings.min_lr
    )
    model, optimizer = fabric.setup(method, optimizer)
    signature = method.signature()

    progress = Progress()
    state: dict[str, Any] = {"optimizer": optimizer, "scheduler": scheduler}
    if resume and latest is not None:
        rest = checkpoints.load(fabric, latest, method, state)
        if rest.get("seed") != cfg.run.seed:
            raise ConfigError(f"checkpoint {latest} was trained with seed {rest.get('seed')}")
        progress = Progress(
            rest["step"], rest["images_seen"], rest["train_time_s"], rest["stopped_by"]
        )
        fabric.print(f"resuming {run_dir} from step {progress.step} ({latest.name})")

    metrics = MetricsLog(run_dir / "metrics.csv")
    record: dict[str, Any] = {
        "status": "running",
        "run_name": cfg.run.name,
        "seed": cfg.run.seed,
        "method": method.settings,
        "recipe": method.recipe.as_dict(),
        "optim": settings.as_dict(),
        "architecture": signature,
        "dataset": {"name": cfg.data.dataset, "root": cfg.data.root, "images": len(views)},
        "world_size": world,
        "precision": resolve_device(cfg.train.accelerator, cfg.train.precision)[1],
        "device": str(fabric.device),
        "steps_per_epoch": per_epoch,
        "total_steps": total_steps,
        "code": code_version(),
        "libraries": library_versions(),
        "hardware": hardware(),
        "started_at": datetime.now(timezone.utc).isoformat(),
    }
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        metrics.truncate_after(progress.step)
        write_json(run_dir / "run.json", record)
    fabric.barrier()

    _train_loop(
        cfg,
        fabric,
        model,
        method,
        optimizer,
        scheduler,
        views,
        checkpoints,
        metrics,
        progress,
        per_epoch,
        total_steps,
        signature,
        settings.clip_grad,
    )

    digests = _gather(weights_digest(method))
    record.update(
        status="finished",
        finished_at=datetime.now(timezone.utc).isoformat(),
        steps=progress.step,
        epochs_completed=progress.step / per_epoch,
        budget={
            "epochs": cfg.train.epochs,
            "time_budget_s": cfg.train.time_budget_s,
            "stopped_by": progress.stopped_by,
        },
        images_seen=progress.images_seen,
        train_time_s=progress.train_time_s,
        images_per_s=progress.images_seen / max(progress.train_time_s, 1e-9),
        weights_sha256_per_rank=digests,
    )
    if rank0:
        _write_reconstructions(cfg, method, fabric.device, run_dir)
        if cfg.probe.enabled:
            record["probe"] = _run_probe(cfg, method, fabric)
        record["wall_time_s"] = time.perf_counter() - started
        write_json(run_dir / "run.json", record)
        fabric.print(
            f"done: {progress.step} steps, {record['images_per_s']:.1f} images/s, "
            f"train {progress.train_time_s:.0f}s, wall {record['wall_time_s']:.0f}s -> {run_dir}"
        )
    fabric.barrier()
    return run_dir


def _train_loop(
    cfg: Config,
    fabric: Fabric,
    model: torch.nn.Module,
    method: MaskingMethod,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    views: SeededViews,
    checkpoints: CheckpointDir,
    metrics: MetricsLog,
    progress: Progress,
    per_epoch: int,
    total_steps: int,
    signature: dict[str, str],
    clip_grad: float | None,
) -> None:
    train = cfg.train
    seed = cfg.run.seed
    rank, world = fabric.global_rank, fabric.world_size
    global_batch = train.batch_size * world
    crash_after = int(os.environ.get(CRASH_ENV, "0"))
    bar = ProgressDisplay(total_steps, progress.step, f"{method.name} pre-train", rank == 0)
    model.train()
    window_loss = torch.zeros((), device=fabric.device)
    window_steps = 0
    window_start = time.perf_counter()
    budget_s = train.time_budget_s

    def running_time() -> float:
        return progress.train_time_s + time.perf_counter() - window_start

    while progress.step < total_steps and progress.stopped_by != "time_budget":
        epoch = progress.step // per_epoch
        views.set_epoch(epoch)
        batches = epoch_batches(
            len(views),
            train.batch_size,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world,
            start_batch=progress.step % per_epoch,
        )
        loader = fabric.setup_dataloaders(
            DataLoader(
                views,
                batch_sampler=batches,
                num_workers=cfg.data.num_workers,
                pin_memory=fabric.device.type == "cuda",
            ),
            use_distributed_sampler=False,
        )
        for images, _ in loader:
            step = progress.step
            scheduler.step_update(_schedule_position(step, total_steps, budget_s, running_time()))
            torch.manual_seed(derive_seed(seed, "step", step, rank))  # drop path
            generator = make_generator(fabric.device, seed, "method", step, rank)
            loss = model(images, generator)
            fabric.backward(loss)
            if clip_grad is not None:
                fabric.clip_gradients(model, optimizer, max_norm=clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.images_seen += global_batch
            window_loss += loss.detach().float()
            window_steps += 1
            bar.advance()
            out_of_time = budget_s is not None and running_time() >= budget_s
            if out_of_time:
                progress.stopped_by = "time_budget"
            last = progress.step >= total_steps or out_of_time
            if progress.step % train.log_every == 0 or last:
                mean_loss = float(fabric.all_reduce(window_loss / window_steps, reduce_op="mean"))
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(
                        f"loss is {mean_loss} at step {progress.step}; lower train.base_lr or "
                        f"set train.clip_grad, then --resume from the last checkpoint"
                    )
                now = time.perf_counter()
                elapsed = now - window_start
                progress.train_time_s += elapsed
                throughput = window_steps * global_batch / max(elapsed, 1e-9)
                lr = optimizer.param_groups[0]["lr"]
                bar.report(mean_loss, lr, throughput)
                if rank == 0:
                    metrics.append(
                        {
                            "step": progress.step,
                            "epoch": round(progress.step / per_epoch, 4),
                            "loss": mean_loss,
                            "lr": lr,
                            "images_per_s": round(throughput, 2),
                            "elapsed_s": round(progress.train_time_s, 3),
                        }
                    )
                window_loss.zero_()
                window_steps = 0
                window_start = time.perf_counter()
            if progress.step % train.checkpoint_every == 0 or last:
                pause = time.perf_counter()
                state = {
                    "optimizer": optimizer,
                    "scheduler": scheduler,
                    "step": progress.step,
                    "images_seen": progress.images_seen,
                    "train_time_s": progress.train_time_s,
                    "stopped_by": progress.stopped_by,
                    "seed": seed,
                }
                checkpoints.save(fabric, progress.step, method, state, signature)
                window_start += time.perf_counter() - pause  # checkpoint I/O is not training
            if crash_after and progress.step == crash_after:
                bar.close()
                os._exit(3)
            if last:
                break
    bar.close()


def _write_reconstructions(
    cfg: Config, method: MaskingMethod, device: torch.device, run_dir: Path
) -> None:
    images = load_images(cfg.data)
    transform = eval_transform(cfg.data, cfg.model.img_size, cfg.model.in_chans)
    count = min(cfg.train.reconstruction_images, len(images))
    spread = torch.linspace(0, len(images) - 1, count).long().tolist()  # not just one class
    batch = torch.stack([transform(images[i][0]) for i in spread]).to(device)
    mean, std = dataset_stats(cfg.data)
    generator = make_generator(device, cfg.run.seed, "figure")
    save_reconstructions(method, batch, run_dir / "reconstructions.png", mean, std, generator)


def _run_probe(cfg: Config, method: MaskingMethod, fabric: Fabric) -> dict[str, Any]:
    transform = eval_transform(cfg.data, cfg.model.img_size, cfg.model.in_chans)
    train_set = SeededViews(load_images(cfg.data, "train"), transform, cfg.run.seed)
    val_set = SeededViews(load_images(cfg.data, "val"), transform, cfg.run.seed)
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
