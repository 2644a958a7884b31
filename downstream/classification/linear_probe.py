"""Linear probe as MAE runs it: frozen features → BatchNorm without affine → linear layer.

Trained on features extracted once from the frozen encoder (the evaluation view, no
augmentation), which makes the probe cheap enough to run for every seed and checkpoint.
"""

from __future__ import annotations

import math

import torch
from timm.optim import Lars
from torch import Tensor, nn

from ropim.harness.optim import build_scheduler


def mae_lars(model: nn.Module, lr: float, weight_decay: float = 0.0) -> Lars:
    """MAE's LARS (facebookresearch/mae ``util/lars.py:18-47``) from timm's ``Lars``: momentum
    0.9, trust ratio ``0.001·‖w‖/‖g‖`` on every parameter with two or more dimensions, plain
    momentum SGD for biases and norms. timm's defaults (no momentum; the trust ratio only when
    weight decay is non-zero) make it plain SGD at weight decay 0, which is how MAE probes.

    With weight decay, timm divides by ``‖g‖ + wd·‖w‖`` where MAE divides by ``‖g + wd·w‖``,
    and timm also decays the 1-D parameters; MAE's probe uses weight decay 0, where both agree.
    """
    matrices = [p for p in model.parameters() if p.ndim > 1]
    vectors = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": matrices, "always_adapt": True},
        {"params": vectors, "always_adapt": False, "weight_decay": 0.0},
    ]
    return Lars(
        [g for g in groups if g["params"]],
        lr=lr,
        momentum=0.9,
        weight_decay=weight_decay,
        trust_coeff=0.001,
    )


def linear_probe_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    num_classes: int,
    *,
    epochs: int = 90,
    batch_size: int = 256,
    base_lr: float = 0.1,
    lr_batch_divisor: int = 256,
    warmup_epochs: int = 10,
    optimizer: str = "lars",
    weight_decay: float = 0.0,
    seed: int = 0,
) -> float:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dim = train_features.shape[1]
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    lr = base_lr * batch_size / lr_batch_divisor
    if optimizer == "lars":
        opt: torch.optim.Optimizer = mae_lars(head, lr, weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"linear probe optimizer must be 'lars' or 'sgd', got {optimizer!r}")
    steps_per_epoch = max(1, math.ceil(len(train_features) / batch_size))
    scheduler = build_scheduler(opt, epochs * steps_per_epoch, warmup_epochs * steps_per_epoch)
    step = 0
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_features), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            if len(index) < 2:
                continue  # BatchNorm needs two samples
            scheduler.step_update(step)
            loss = nn.functional.cross_entropy(head(train_features[index]), train_labels[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    head.eval()
    with torch.no_grad():
        predicted = head(val_features).argmax(dim=1)
    return float((predicted == val_labels).float().mean())
