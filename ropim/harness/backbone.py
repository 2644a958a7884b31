"""The shared encoder: a timm ``VisionTransformer`` or a BEiT-style timm ``Beit`` (no absolute
position embedding, a shared or per-layer relative position bias, layer scale; ROPIM's and
SimMIM's pre-training backbone), split at the points masking methods need."""

from __future__ import annotations

import difflib
import math
from typing import Any

import timm
import torch
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ropim.harness.architecture_values import check_model_values
from ropim.harness.errors import ConfigError


def _check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models("vit_*"), n=5)
    hint = f" Did you mean one of: {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"unknown model name {name!r} (model.name). Use a timm ViT such as "
        f"'vit_tiny_patch16_224' or 'vit_base_patch16_224'.{hint}"
    )


VIT_FAMILIES = ("timm.models.vision_transformer", "timm.models.beit", "timm.models.deit")


def check_vit_family(name: Any, where: str = "model.name") -> None:
    """A registered timm ViT or BEiT, checked by name before anything is built."""
    if not isinstance(name, str):
        raise ConfigError(f"{where}={name!r} must be a timm model name")
    _check_model_name(name)
    from timm.models import model_entrypoint

    family = model_entrypoint(name).__module__
    if family not in VIT_FAMILIES:
        raise ConfigError(
            f"{where}={name!r} is a {family.rsplit('.', 1)[-1]} model, not a timm "
            f"VisionTransformer or Beit; choose a 'vit_*' or 'beit_*' model"
        )


POSITIONS = ("learned", "sincos")
INITS = ("timm", "mae", "simmim")
# What each model.init does, for the recipe card.
INIT_RULES = {
    "timm": "timm's own: trunc-normal std 0.02 cut at ±2 (absolute, so uncut); Beit also "
    "divides block outputs by √(2·layer); patch projection PyTorch's default",
    "mae": "xavier-uniform on every Linear and the patch projection, zero biases, cls token "
    "normal(0.02) (facebookresearch/mae models_mae.py:75-90)",
    "simmim": "trunc-normal std 0.02 cut at ±1σ on every Linear/Conv2d weight and the cls "
    "token, zero biases, then ÷√(2·layer) on block outputs (ROPIM models/ropim.py:19-20, "
    "models/vision_transformer.py:257-289; SimMIM models/simmim.py:66-67)",
}


def sincos_2d(rows: int, cols: int, dim: int) -> Tensor:
    """MAE's fixed 2-D sin-cos position embedding, ``(rows·cols, dim)`` in row-major token order:
    the first half encodes the column, the second the row, each as [sin(p·ω), cos(p·ω)] with
    ω_i = 10000^(-i/(dim/4)) (He et al. 2022; facebookresearch/mae util/pos_embed.py)."""
    if dim % 4:
        raise ConfigError(
            f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}"
        )
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    row, col = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64),
        torch.arange(cols, dtype=torch.float64),
        indexing="ij",
    )

    def encode(position: Tensor) -> Tensor:
        angles = position.flatten()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(col), encode(row)], dim=1).float()


def xavier_linears(*parts: nn.Module) -> None:
    """MAE's ``_init_weights`` (models_mae.py:83-90), which it applies to the whole model,
    decoder included: xavier-uniform on every Linear, zero biases, norms at one and zero."""
    for part in parts:
        for module in part.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


def mae_init(vit: VisionTransformer) -> None:
    """MAE's encoder initialisation (models_mae.py:75-90): xavier-uniform on every linear layer
    and on the patch projection seen as a matrix, zero biases, cls token normal(0.02), norms at
    one and zero."""
    projection = vit.patch_embed.proj.weight
    nn.init.xavier_uniform_(projection.view(projection.shape[0], -1))
    if vit.cls_token is not None:
        nn.init.normal_(vit.cls_token, std=0.02)
    xavier_linears(vit)


def simmim_init(vit: nn.Module, std: float = 0.02) -> None:
    """ROPIM's and SimMIM's encoder initialisation: BEiT's rule with their truncation. Their
    ``_trunc_normal_`` override cuts at ±1σ, not timm's ±2 absolute (ROPIM
    ``models/ropim.py:19-20``, SimMIM ``models/simmim.py:66-67``), and is applied to the cls
    token, every Linear and Conv2d weight (biases zero, norms one/zero; ROPIM
    ``models/vision_transformer.py:257-289``); then each block's output projections are
    divided by √(2·layer) (``fix_init_weight``, :270-276).
    The resulting std is 0.02·0.538 ≈ 0.0108 (timm's ``Beit``: 0.020, its patch conv 0.021)."""

    def cut(tensor: Tensor) -> None:
        nn.init.trunc_normal_(tensor, std=std, a=-std, b=std)

    for name in ("cls_token", "pos_embed"):
        table = getattr(vit, name, None)
        if isinstance(table, nn.Parameter) and table.requires_grad:
            cut(table)
    for module in vit.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            cut(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    with torch.no_grad():
        for layer, block in enumerate(vit.blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))


class ViTBackbone(nn.Module):
    """A timm ViT whose forward pass is exposed in the stages a masking method edits.

    Methods change the patch tokens (ROPIM projects them, SimMIM swaps in a mask token) or the
    token set (MAE drops tokens after position embedding); everything else stays timm's.
    """

    def __init__(
        self,
        name: str,
        img_size: int,
        patch_size: int,
        in_chans: int = 3,
        drop_path: float = 0.0,
        position: str = "learned",
        init: str = "timm",
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        _check_model_name(name)
        if position not in POSITIONS or init not in INITS:
            raise ConfigError(
                f"model.position={position!r} / model.init={init!r}: choose position from "
                f"{POSITIONS} and init from {INITS}"
            )
        check_model_values(img_size, patch_size, in_chans, model_kwargs)
        self.name = name
        self.init = init
        if name.startswith("beit"):
            # Keep the final norm on the tokens (BEiT/SimMIM pre-training); timm's default for
            # Beit moves it after average pooling, which the probes and methods do not use.
            model_kwargs = {"use_fc_norm": False} | model_kwargs
        try:
            vit = timm.create_model(
                name,
                pretrained=False,
                img_size=img_size,
                patch_size=patch_size,
                in_chans=in_chans,
                num_classes=0,
                drop_path_rate=drop_path,
                **model_kwargs,
            )
        except (TypeError, ValueError, AssertionError, RuntimeError, ZeroDivisionError) as exc:
            raise ConfigError(
                f"model.name={name!r} cannot be built as a plain ViT with img_size/patch_size "
                f"and model.kwargs={model_kwargs!r}: {type(exc).__name__}: "
                f"{(str(exc).splitlines() or [''])[0][:200]}. It is not a plain timm "
                f"VisionTransformer, or a kwarg is wrong."
            ) from None
        if not isinstance(vit, (VisionTransformer, Beit)):
            raise ConfigError(
                f"model.name={name!r} builds a {type(vit).__name__}, not a timm "
                f"VisionTransformer or Beit; choose a 'vit_*' or 'beit_*' model"
            )
        self.vit = vit
        if init == "simmim":
            simmim_init(vit)
        if init == "mae" or position == "sincos":
            self._mae_style(vit, name, position, init)
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid: tuple[int, int] = tuple(vit.patch_embed.grid_size)  # type: ignore[assignment]
        self.num_tokens = self.grid[0] * self.grid[1]
        self.embed_dim: int = vit.embed_dim
        self.num_prefix_tokens: int = vit.num_prefix_tokens

    @staticmethod
    def _mae_style(vit: Any, name: str, position: str, init: str) -> None:
        if not isinstance(vit, VisionTransformer) or vit.pos_embed is None:
            raise ConfigError(
                f"model.position={position!r} / model.init={init!r} describe MAE's encoder, a "
                f"plain ViT with an absolute position embedding; model.name={name!r} is not one"
            )
        if init == "mae":
            mae_init(vit)
        if position == "sincos":
            rows, cols = vit.patch_embed.grid_size
            table = sincos_2d(rows, cols, vit.embed_dim)
            prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
            with torch.no_grad():
                vit.pos_embed.zero_()  # the cls token's position: zeros, as MAE's
                vit.pos_embed[0, prefix:] = table
            vit.pos_embed.requires_grad_(False)  # fixed during pre-training

    def release_position(self) -> None:
        """Make a fixed (sin-cos) position embedding trainable: MAE fine-tunes it."""
        if self.vit.pos_embed is not None:
            self.vit.pos_embed.requires_grad_(True)

    def embed_patches(self, images: Tensor) -> Tensor:
        """Patch embeddings ``Φ`` of shape ``(B, N, D)``: before cls token and positions."""
        if images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"backbone built for {self.img_size}px images, got {tuple(images.shape[-2:])}"
            )
        return self.vit.patch_embed(images)

    @property
    def relative_position(self) -> str | None:
        """``"shared"`` (one table for all blocks), ``"per_layer"`` or None (absolute only)."""
        if not isinstance(self.vit, Beit):
            return None
        if self.vit.rel_pos_bias is not None:
            return "shared"
        has_table = hasattr(self.vit.blocks[0].attn, "relative_position_bias_table")
        return "per_layer" if has_table else None

    def facts(self) -> dict[str, Any]:
        """What the built encoder is, for the recipe card: widths, position information and
        layer scale (its initial value; read before training)."""
        block = self.vit.blocks[0]
        gamma = getattr(block, "gamma_1", None)  # timm Beit
        if gamma is None and hasattr(block, "ls1"):
            gamma = getattr(block.ls1, "gamma", None)  # timm VisionTransformer
        return {
            "type": type(self.vit).__name__,
            "depth": len(self.vit.blocks),
            "embed_dim": self.embed_dim,
            "num_heads": block.attn.num_heads,
            "absolute_position": self.vit.pos_embed is not None,
            "relative_position": self.relative_position or "none",
            "layer_scale": None if gamma is None else round(float(gamma.detach().flatten()[0]), 6),
            "init_rule": INIT_RULES[self.init],
        }

    def add_position(self, tokens: Tensor) -> Tensor:
        """Prepend cls/register tokens and add position information to all N tokens."""
        vit = self.vit
        if not isinstance(vit, Beit):
            return vit._pos_embed(tokens)
        x = torch.cat((vit.cls_token.expand(len(tokens), -1, -1), tokens), dim=1)
        if vit.pos_embed is not None:
            x = x + vit.pos_embed
        return vit.pos_drop(x)

    def run_blocks(self, sequence: Tensor, layer: int | None = None) -> Tensor:
        """Transformer blocks and final norm over a (possibly shortened) token sequence;
        ``layer``: stop after that block (1-based) — before the last one, without the final
        norm, which belongs to the last block (SimMIM's probe of block 8)."""
        vit = self.vit
        depth = len(vit.blocks)
        if layer is not None and not 1 <= layer <= depth:
            raise ConfigError(f"layer {layer} does not exist: the encoder has blocks 1..{depth}")
        stop = depth if layer is None else layer
        if not isinstance(vit, Beit):
            x = vit.blocks[:stop](vit.norm_pre(sequence))
        else:
            shared = vit.rel_pos_bias() if vit.rel_pos_bias is not None else None
            x = sequence
            for block in vit.blocks[:stop]:
                x = block(x, shared_rel_pos_bias=shared)
        return vit.norm(x) if stop == depth else x

    def block_outputs(self, sequence: Tensor) -> list[Tensor]:
        """Every block's output over a full sequence (prefix tokens included, no final norm):
        the layers a teacher's targets average (data2vec's top-K blocks)."""
        vit = self.vit
        outputs = []
        if not isinstance(vit, Beit):
            x = vit.norm_pre(sequence)
            for block in vit.blocks:
                x = block(x)
                outputs.append(x)
            return outputs
        shared = vit.rel_pos_bias() if vit.rel_pos_bias is not None else None
        x = sequence
        for block in vit.blocks:
            x = block(x, shared_rel_pos_bias=shared)
            outputs.append(x)
        return outputs

    def encode(self, tokens: Tensor) -> Tensor:
        """Encoder output for the ``N`` patch tokens (prefix tokens dropped)."""
        return self.run_blocks(self.add_position(tokens))[:, self.num_prefix_tokens :]

    def forward(self, images: Tensor) -> Tensor:
        """Plain (unmasked) patch features, as downstream tasks use them."""
        return self.encode(self.embed_patches(images))

    @torch.no_grad()
    def pooled_features(self, images: Tensor, layer: int | None = None) -> dict[str, Tensor]:
        """Features for probes: the cls token (MAE's probe) and the patch average, of the last
        block or of block ``layer`` (1-based)."""
        sequence = self.run_blocks(self.add_position(self.embed_patches(images)), layer)
        features = {"avg": sequence[:, self.num_prefix_tokens :].mean(dim=1)}
        if self.vit.cls_token is not None:
            features["cls"] = sequence[:, 0]
        return features

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) excluded from weight decay besides 1-D
        ones: ``vit_no_weight_decay`` under ``vit.``."""
        return {f"vit.{name}" for name in self.vit_no_weight_decay()}

    def vit_no_weight_decay(self) -> set[str]:
        """The same names relative to the timm model (fine-tuning trains ``self.vit`` alone):
        the absolute position embedding and the prefix tokens, as ROPIM's and SimMIM's
        ``models/vision_transformer.py`` (``no_weight_decay`` = ``{pos_embed, cls_token}``) and
        MAE's fine-tune exempt them (mmsegmentation's UperNet decays them: its constructor
        compares unprefixed names, so the segmentation task passes no skip list). Relative
        position tables are decayed, as in those codebases, although timm's
        ``Beit.no_weight_decay`` lists them."""
        return {
            name
            for name in self.vit.no_weight_decay()
            if "relative_position_bias_table" not in name
        }
