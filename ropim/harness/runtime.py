"""Devices and processes: Fabric from the torchrun environment, the seeded encoder, and what
every rank ends with (for checks that distributed runs stayed in step)."""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Any

import torch
import torch.distributed as dist
from lightning_fabric import Fabric

from ropim.harness.backbone import ViTBackbone
from ropim.harness.config import Config
from ropim.harness.errors import ConfigError
from ropim.harness.seeding import derive_seed


def resolve_device(accelerator: str = "auto", precision: str = "auto") -> tuple[str, str]:
    """``auto`` means CUDA with bf16 autocast where available, else fp32 on the CPU; a device
    this machine does not have is one error naming train.accelerator."""
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    available = {
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.is_available() or torch.backends.mps.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(accelerator, True):
        raise ConfigError(
            f"train.accelerator={accelerator} but this machine has no such device (torch "
            f"{torch.__version__}, CUDA available: {torch.cuda.is_available()}); use "
            f"train.accelerator=auto or cpu, or run on a machine with one"
        )
    if precision == "auto":
        use_bf16 = accelerator == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16-mixed" if use_bf16 else "32-true"
    return accelerator, precision


def _srun_world() -> tuple[int, int] | None:
    """(tasks per node, nodes) when ``srun`` started several tasks of this program; None when
    SLURM is not launching a multi-task step (no SLURM, one task, or an interactive shell)."""
    tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if tasks <= 1 or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    if "SLURM_STEP_ID" not in os.environ or "SLURM_PROCID" not in os.environ:
        raise ConfigError(
            f"SLURM_NTASKS={tasks} but this process was not started by srun (no SLURM_STEP_ID/"
            f"SLURM_PROCID): start it as 'srun python -m ropim ...' so the {tasks} tasks form "
            f"one world (`ropim docs clusters`), or request one task"
        )
    nodes = int(os.environ.get("SLURM_NNODES", os.environ.get("SLURM_JOB_NUM_NODES", "1")))
    if tasks % nodes:
        raise ConfigError(
            f"SLURM_NTASKS={tasks} does not divide over SLURM_NNODES={nodes}: use "
            f"--ntasks-per-node (one task per device on every node)"
        )
    return tasks // nodes, nodes


def launch_world() -> tuple[int, int]:
    """(processes per node, nodes) of this launch: torchrun's variables, else srun's, else
    one process."""
    if "WORLD_SIZE" in os.environ:  # torchrun
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return local, max(int(os.environ["WORLD_SIZE"]) // local, 1)
    srun = _srun_world()
    if srun is not None:
        os.environ.setdefault("SLURM_NTASKS_PER_NODE", str(srun[0]))  # Fabric checks it
        return srun
    return 1, 1


def launch_rank() -> int:
    """This process's global rank as torchrun or srun set it (0 for one process); known
    before any Fabric exists, for writes only one process may make."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return int(os.environ.get("SLURM_PROCID", "0")) if _srun_world() else 0


def launch_id() -> str:
    """One name shared by every rank of this launch and by no other launch: the SLURM job
    and step under srun, torchrun's rendezvous (run id and main address) under torchrun, else
    this host and process."""
    if "WORLD_SIZE" in os.environ:
        run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        return f"torchrun:{run}@{where}"
    if _srun_world() is not None:
        job = os.environ.get("SLURM_JOB_ID", "?")
        return f"slurm:{job}.{os.environ.get('SLURM_STEP_ID', '?')}"
    return f"process:{socket.gethostname()}:{os.getpid()}"


def make_fabric(accelerator: str = "auto", precision: str = "auto") -> Fabric:
    """One process per device; under torchrun or srun the world comes from the launcher's
    environment (Fabric's SLURM environment gives ranks and the main address under srun)."""
    accelerator, precision = resolve_device(accelerator, precision)
    per_node, nodes = launch_world()
    fabric = Fabric(
        accelerator=accelerator,
        devices=per_node,
        num_nodes=nodes,
        strategy="ddp" if per_node * nodes > 1 else "auto",
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
