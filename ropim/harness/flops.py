"""The cost of a training step in FLOPs: counted, not estimated, so a budget in training FLOPs
is the same on every machine and is known before training starts.

One forward and backward of the step's loss runs under :class:`torch.utils.flop_counter.
FlopCounterMode`, which counts matrix multiplications, convolutions and attention (elementwise
operations, normalisation and the optimiser are not counted: a few percent of a ViT's step).
Nothing of the counted step survives: gradients are dropped and buffers (BatchNorm statistics)
and the random generators (torch, NumPy, Python's) are restored, so a run is bit-identical with
or without the count, and a resumed run (which counts again) matches an uninterrupted one.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

HOW = (
    "torch.utils.flop_counter.FlopCounterMode over one forward and backward of the training "
    "loss (matmuls, convolutions, attention; elementwise ops and the optimiser not counted)"
)


@dataclass(frozen=True)
class StepCost:
    """FLOPs of one optimiser step over all devices, and how they were counted."""

    flops_per_step: float
    per_device: float
    how: str

    def as_dict(self) -> dict[str, float | str]:
        return {
            "flops_per_step": self.flops_per_step,
            "flops_per_step_per_device": self.per_device,
            "flops_counted_by": self.how,
        }


def count_flops(module: nn.Module, step: Callable[[], Tensor]) -> float:
    """FLOPs of ``step()`` (which returns a loss) and its backward through ``module``, leaving
    the module's gradients, buffers and the random generators as they were."""
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    grads = {name: p.grad for name, p in module.named_parameters()}
    python_rng, numpy_rng = random.getstate(), np.random.get_state()  # timm's mixup draws here
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        with FlopCounterMode(display=False) as counter:
            loss = step()
            loss.backward()
        return float(counter.get_total_flops())
    finally:
        for name, param in module.named_parameters():
            param.grad = grads[name]
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(buffers[name])
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def steps_for_budget(budget: float, cost: StepCost, key: str = "train.flops_budget") -> int:
    """``floor(budget / flops_per_step)``: the steps a FLOPs budget buys (at least one)."""
    from ropim.harness.errors import ConfigError

    steps = int(budget // cost.flops_per_step)
    if steps < 1:
        raise ConfigError(
            f"{key}={budget:.3g} buys no step: one step costs {cost.flops_per_step:.3g} FLOPs; "
            f"raise the budget"
        )
    return steps
