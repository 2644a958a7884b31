"""A stateful method for the generic tests: a frozen teacher submodule (an EMA copy of the
encoder, declared with ``untrained``), a step counter buffer and a ramp read from the run's
progress. Not a baseline: it exists so the per-method tests prove stateful methods pass them."""

import copy

import torch
from torch import nn

from ropim.harness.methods import MaskingMethod, Recipe, linear_pixel_head
from ropim.harness.patches import patchify


class FrozenTeacher(MaskingMethod):
    name = "frozenteacher"
    recipe = Recipe(
        base_lr=1e-3, lr_batch_divisor=256, warmup_epochs=1, betas=(0.9, 0.95), source="a test"
    )

    def __init__(self, backbone, share: float = 0.5, momentum: float = 0.9):
        super().__init__(backbone)
        self.share, self.momentum = share, momentum
        self.head = linear_pixel_head(backbone)
        self.teacher = self.untrained(copy.deepcopy(backbone))
        self.teacher_head = self.untrained(nn.LayerNorm(backbone.embed_dim))  # 1-D, frozen
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def prepare(self, patch_tokens, generator):
        b, n, _ = patch_tokens.shape
        keep = torch.rand(b, n, 1, generator=generator, device=patch_tokens.device) > self.share
        return patch_tokens * keep, keep

    def decode(self, features, state):
        return self.head(features)

    def loss(self, prediction, target, state):
        ramp = self.progress.fraction  # 0 at the first step, towards 1 at the last
        return (prediction - target).pow(2).mean() * (1.0 + 0.1 * ramp)

    @torch.no_grad()
    def after_step(self, progress):
        self.updates += 1
        pairs = zip(self.teacher.parameters(), self.backbone.parameters(), strict=True)
        for mine, theirs in pairs:
            mine.mul_(self.momentum).add_(theirs.detach(), alpha=1 - self.momentum)

    def encoder_view(self, images, state):
        return self.to_images(patchify(images, self.patch_size) * state)
