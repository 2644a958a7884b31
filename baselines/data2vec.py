"""data2vec (Baevski et al., ICML 2022), the vision model: regress a teacher's contextual
features of the masked patches.

The teacher is an exponential moving average of the student's transformer; it sees the whole
image (the student's patch embedding, unmasked) and its targets are the average of its top-K
blocks' outputs, layer-normalised. The student sees the image with 60% of its patches replaced
by a learned mask token in BEiT-style blocks; its final-norm output at the masked patches
regresses the targets with a smooth-L1 loss. The EMA decay ramps linearly over the run.

Follows facebookresearch/fairseq ``examples/data2vec/models/data2vec_vision.py`` (the model and
loss) and ``examples/data2vec/config/vision/pretraining/base_imagenet_d2v1.yaml`` (the recipe);
the mask share and fine-tune recipe come from the authors' vision release that fairseq's README
points to (facebookresearch/data2vec_vision ``beit/README.md``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from baselines._block_masking import block_mask, check_block_mask
from ropim.harness.backbone import ViTBackbone
from ropim.harness.methods import MaskingMethod, ProtocolRecipe, PublishedResult, Recipe
from ropim.harness.patches import patchify
from ropim.harness.run_progress import RunProgress

FAIRSEQ = "fairseq examples/data2vec"
D2V1 = f"{FAIRSEQ}/config/vision/pretraining/base_imagenet_d2v1.yaml"
MODEL = f"{FAIRSEQ}/models/data2vec_vision.py"
VISION = "facebookresearch/data2vec_vision beit/README.md"


def annealed_decay(start: float, end: float, step: int, total: int) -> float:
    """The EMA decay after ``step`` of ``total`` updates: linear from ``start`` to ``end``
    (data2vec_vision.py:91-94, 153-164), ``end`` from ``total`` on."""
    if step >= total:
        return end
    return end - (end - start) * (1 - step / total)


class Data2Vec(MaskingMethod):
    name = "data2vec"
    # The tiny test grid is 4x4 tokens: blocks of 16 cannot fit a 3x3 window.
    test_settings = {"min_block_tokens": 2, "top_k": 2}
    encoder_name = "backbone"  # the student is fine-tuned (data2vec_vision.py:365-373)
    recipe = Recipe(
        base_lr=5e-4,
        lr_batch_divisor=2048,
        warmup_epochs=10,
        betas=(0.9, 0.999),
        weight_decay=0.05,
        clip_grad=3.0,
        base_min_lr=0.0,
        base_warmup_lr=0.0,
        warmup_prefix=True,
        crop_scale=(0.08, 1.0),
        drop_path=0.25,
        interpolation="bicubic",
        source=f"{D2V1}:37-64",
        sources={
            "base_lr": f"{D2V1}:39 (lr 0.0005 at batch 128 x 16 GPUs = 2048, :21,27; fairseq "
            "does not scale it with the batch)",
            "lr_batch_divisor": f"{D2V1}:21,27 (the total batch the lr is set for)",
            "warmup_epochs": f"{D2V1}:50 (12,510 updates = 10 epochs)",
            "betas": f"{D2V1}:44",
            "weight_decay": f"{D2V1}:46",
            "clip_grad": f"{D2V1}:40",
            "base_min_lr": "fairseq fairseq/optim/lr_scheduler/cosine_lr_scheduler.py:33",
            "base_warmup_lr": "fairseq cosine_lr_scheduler.py:23-27,84-85 (unset: min_lr, 0)",
            "warmup_prefix": "fairseq cosine_lr_scheduler.py:59-64 (the cosine runs after warmup)",
            "crop_scale": f"{FAIRSEQ}/tasks/image_pretraining.py:79-82 (torchvision "
            "RandomResizedCrop's default scale)",
            "interpolation": f"{FAIRSEQ}/tasks/image_pretraining.py:81",
            "drop_path": f"{D2V1}:64",
            # the method's settings
            "mask_ratio": f"Baevski et al. (2022) §4 (60%); {VISION}:24 (120 of 196 patches; "
            "fairseq's dataclass default, 75, is not the published share)",
            "min_block_tokens": f"{MODEL}:41, {VISION}:33",
            "max_block_tokens": f"{MODEL}:42, {VISION}:33",
            "top_k": f"{D2V1}:60 (average_top_k_layers)",
            "ema_decay": f"{D2V1}:57",
            "ema_end_decay": f"{D2V1}:58",
            "loss_beta": f"{D2V1}:62",
        },
    )
    protocol_recipes = {
        "finetune": ProtocolRecipe(
            values={
                "epochs": 100,
                "warmup_epochs": 10,
                "base_lr": 4e-3,
                "lr_batch_divisor": 1024,
                "min_lr": 1e-6,
                "layer_decay": 0.65,
                "weight_decay": 0.0,
                "drop_path": 0.2,
                "mixup": 0.8,
                "cutmix": 1.0,
                "label_smoothing": 0.1,
                "random_erasing": 0.25,
                "rand_augment": "rand-m9-mstd0.5-inc1",
            },
            source=f"{VISION}:45-51 (ViT-B fine-tune command)",
            sources={
                "lr_batch_divisor": f"{VISION}:48,50 (lr 4e-3 for 128 x 8 GPUs; "
                "run_class_finetuning.py:515-517 does not scale it)",
                "min_lr": "data2vec_vision beit/run_class_finetuning.py:96",
                "label_smoothing": "data2vec_vision beit/run_class_finetuning.py:109",
                "random_erasing": "data2vec_vision beit/run_class_finetuning.py:118",
                "rand_augment": "data2vec_vision beit/run_class_finetuning.py:107",
            },
        ),
    }
    fixed_choices = {
        "targets": (
            "average of the teacher's top-K block outputs (end of block, no per-layer norm), "
            "then a parameter-free layer norm; the masked patches only",
            f"{MODEL}:279-311, {D2V1}:58-60 (layer_norm_targets)",
        ),
        "teacher_input": (
            "the student's patch embedding of the whole image, without gradient; the "
            "teacher's transformer runs in eval mode (no drop path)",
            f"{MODEL}:260-277 (ema_transformer_only)",
        ),
        "prediction": (
            "the student's final-norm output at the masked patches (fairseq defines "
            "final_proj but its forward does not apply it)",
            f"{MODEL}:323-327",
        ),
        "loss": (
            "smooth L1 (beta) summed over channels, x 1/sqrt(D), mean over masked patches",
            f"{MODEL}:329-337 (fairseq divides by sample_size = masked patches)",
        ),
        "color_jitter": (
            "not applied: the suite's pre-training views have no colour jitter (a listed "
            "deviation)",
            f"{FAIRSEQ}/tasks/image_pretraining.py:77 (ColorJitter(0.4, 0.4, 0.4))",
        ),
        "ema": (
            "after every optimiser step: teacher = d * teacher + (1 - d) * student, d ramped "
            "linearly over the whole run",
            f"{MODEL}:147-168, 83 (ema_anneal_end_step = max_update)",
        ),
    }
    references = (
        PublishedResult(
            "classification",
            "finetune",
            "top1_best",
            84.2,
            "Baevski et al., data2vec (ICML 2022) Table 1, ViT-B 800 epochs",
            "fine-tune 100 epochs",
            pretrain_epochs=800,
        ),
    )

    def __init__(
        self,
        backbone: ViTBackbone,
        mask_ratio: float = 0.6,
        min_block_tokens: int = 16,
        max_block_tokens: int = 196,
        top_k: int = 6,
        ema_decay: float = 0.999,
        ema_end_decay: float = 0.9998,
        loss_beta: float = 2.0,
    ) -> None:
        super().__init__(backbone)
        depth = len(backbone.vit.blocks)
        if not 1 <= top_k <= depth:
            raise ValueError(f"top_k={top_k} must be between 1 and the encoder's {depth} blocks")
        if not 0 <= ema_decay <= ema_end_decay <= 1:
            raise ValueError(
                f"ema_decay={ema_decay} and ema_end_decay={ema_end_decay} must satisfy "
                f"0 <= ema_decay <= ema_end_decay <= 1"
            )
        if loss_beta < 0:
            raise ValueError(f"loss_beta={loss_beta} must be 0 (L2) or positive (smooth L1)")
        self.count = round(backbone.num_tokens * mask_ratio)
        check_block_mask(backbone.grid, self.count, min_block_tokens)
        self.mask_ratio, self.min_block_tokens = mask_ratio, min_block_tokens
        self.max_block_tokens = max_block_tokens
        self.top_k, self.loss_beta = top_k, loss_beta
        self.ema_decay, self.ema_end_decay = ema_decay, ema_end_decay
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)  # data2vec_vision.py:127-130
        self.teacher = self.untrained(copy.deepcopy(backbone))
        self.register_buffer("current_decay", torch.tensor(ema_decay, dtype=torch.float64))

    def prepare(
        self, patch_tokens: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        b = patch_tokens.shape[0]
        hidden = block_mask(
            b,
            self.backbone.grid,
            self.count,
            self.min_block_tokens,
            self.max_block_tokens,
            generator,
            patch_tokens.device,
        ).to(patch_tokens.dtype)
        w = hidden.unsqueeze(-1)
        tokens = patch_tokens * (1 - w) + self.mask_token.to(patch_tokens.dtype) * w
        return tokens, {"hidden": hidden, "patches": patch_tokens.detach()}

    @torch.no_grad()
    def targets(self, patch_tokens: Tensor) -> Tensor:
        """The teacher's targets for every patch ``(B, N, D)``, float32 (no gradient reaches
        the student's embedding through them)."""
        # The student's cls token and positions: fairseq's teacher is the EMA of the
        # transformer alone, fed the student's embedded sequence (ema_transformer_only).
        outputs = self.teacher.block_outputs(self.backbone.add_position(patch_tokens))
        prefix = self.backbone.num_prefix_tokens
        top = [o[:, prefix:].float() for o in outputs[-self.top_k :]]
        mean = sum(top) / len(top)
        return F.layer_norm(mean, mean.shape[-1:])

    def decode(self, features: Tensor, state: dict[str, Tensor]) -> Tensor:
        return features

    def loss(self, prediction: Tensor, target: Tensor, state: dict[str, Tensor]) -> Tensor:
        hidden = state["hidden"].bool()
        goal = self.targets(state["patches"])[hidden]
        guess = prediction.float()[hidden]
        if self.loss_beta == 0:
            per_patch = F.mse_loss(guess, goal, reduction="none").sum(dim=-1)
        else:
            per_patch = F.smooth_l1_loss(guess, goal, reduction="none", beta=self.loss_beta)
            per_patch = per_patch.sum(dim=-1)
        return per_patch.mean() / math.sqrt(goal.shape[-1])

    @torch.no_grad()
    def after_step(self, progress: RunProgress) -> None:
        """The EMA update after every optimiser step, at the ramp's decay for this step."""
        decay = annealed_decay(
            self.ema_decay, self.ema_end_decay, progress.step, progress.total_steps
        )
        self.current_decay.fill_(decay)
        if decay >= 1:
            return
        for mine, theirs in zip(self.teacher.parameters(), self.backbone.parameters(), strict=True):
            mine.mul_(decay).add_(theirs.detach().to(mine.dtype), alpha=1 - decay)
        for mine, theirs in zip(self.teacher.buffers(), self.backbone.buffers(), strict=True):
            mine.copy_(theirs)

    def encoder_view(self, images: Tensor, state: dict[str, Tensor]) -> Tensor:
        patches = patchify(images, self.patch_size)
        return self.to_images(patches * (1 - state["hidden"]).unsqueeze(-1))

    def reconstruct(self, prediction: Tensor, images: Tensor, state: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError("data2vec predicts teacher features, not pixels")

    def no_weight_decay(self) -> set[str]:
        """None beyond 1-D parameters and biases. fairseq's Adam decays every parameter
        (fairseq/optim/adam.py:95, one group), 1-D ones included: a deviation the suite's
        optimiser makes for every method (docs/recipes.md)."""
        return set()
