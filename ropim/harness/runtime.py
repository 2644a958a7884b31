"""Devices and processes: Fabric from the torchrun environment, the seeded encoder, and what
every rank ends with (for checks that distributed runs stayed in step)."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
import torch.distributed as dist
from lightning_fabric import Fabric

from ropim.harness.backbone import ViTBackbone
from ropim.harness.config import Config
from ropim.harness.seeding import derive_seed


def resolve_device(accelerator: str = "auto", precision: str = "auto") -> tuple[str, str]:
    """``auto`` means CUDA with bf16 autocast where available, else fp32 on the CPU."""
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "auto":
        use_bf16 = accelerator == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16-mixed" if use_bf16 else "32-true"
    return accelerator, precision


def launch_rank() -> int:
    """This process's global rank as torchrun set it (0 without torchrun); known before any
    Fabric exists, for writes only one process may make."""
    return int(os.environ.get("RANK", "0"))


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
    drop_path = m.drop_path or 0.0  # unset outside pre-training: no stochastic depth
    return ViTBackbone(
        m.name, m.img_size, m.patch_size, m.in_chans, drop_path, m.position, m.init, **m.kwargs
    )


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings on CUDA are otherwise launch times)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def gather(value: Any) -> list[Any]:
    """``value`` from every rank (a one-element list outside torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
