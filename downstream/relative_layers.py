"""A plain ViT encoder rebuilt with BEiT-style layers, as mmsegmentation's ``MAE`` backbone
fine-tunes an MAE checkpoint for UperNet: every block gets its own relative position bias
table, zero-initialised (``MAEAttention.init_weights`` skips BEiT's trunc-normal), and a
learnable layer scale (``init_values=1.0`` in ``upernet_mae-base_fp16_8x2_512x512_160k_ade20k.py``);
the absolute position embedding is kept. At zero tables and unit scales the rebuilt encoder
computes exactly what the plain one does, so pre-trained features start unchanged.

The key bias of the plain ViT's fused qkv projection is dropped: timm's ``Beit`` (like BEiT)
has query and value biases only, and a bias added to every key shifts each query's logits by
one constant, which softmax ignores.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from timm.layers import LayerScale, Mlp
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ropim.harness.backbone import ViTBackbone
from ropim.harness.config import Config
from ropim.harness.errors import ConfigError

BEIT_NAME = "beit_base_patch16_224"  # sizes come from the encoder; the name picks the class


def _why_not_convertible(vit: nn.Module) -> str | None:
    """What in ``vit`` has no counterpart in a timm ``Beit`` block, or None."""
    if not isinstance(vit, VisionTransformer):
        return f"it is a {type(vit).__name__}, not a plain timm VisionTransformer"
    if vit.cls_token is None or vit.num_prefix_tokens != 1 or vit.no_embed_class:
        return "it does not have exactly one cls token with its own position"
    if vit.pos_embed is None or not isinstance(vit.norm_pre, nn.Identity):
        return "it has no absolute position embedding or a pre-norm"
    for block in vit.blocks:
        attn = block.attn
        if attn.qkv.bias is None or not isinstance(attn.q_norm, nn.Identity):
            return "its attention has no qkv bias or normalises q/k"
        if not isinstance(block.mlp, Mlp) or not isinstance(block.mlp.norm, nn.Identity):
            return "its MLP is not timm's plain two-layer Mlp"
        if not isinstance(block.ls1, (nn.Identity, LayerScale)):
            return "its layer scale is not timm's LayerScale"
    return None


def _gamma(scale_module: nn.Module, width: int, default: float) -> Tensor:
    """The block's own layer scale when it has one, else ``default`` in every channel."""
    if isinstance(scale_module, LayerScale):
        return scale_module.gamma.detach().clone()
    return torch.full((width,), default)


def beit_kwargs(vit: nn.Module, layer_scale: float) -> dict[str, Any]:
    """timm ``Beit`` keyword arguments for ``vit``'s sizes with per-block relative tables,
    absolute positions kept and layer scale ``layer_scale``; a ConfigError if ``vit`` has
    parts a Beit block cannot hold."""
    reason = _why_not_convertible(vit)
    if reason:
        raise ConfigError(
            f"segmentation.relative_position=per_layer rebuilds a plain ViT with BEiT-style "
            f"layers, but this encoder cannot be: {reason}. Set "
            f"segmentation.relative_position: none"
        )
    first = vit.blocks[0]
    return {
        "depth": len(vit.blocks),
        "embed_dim": vit.embed_dim,
        "num_heads": first.attn.num_heads,
        "mlp_ratio": first.mlp.fc1.out_features / vit.embed_dim,
        "qkv_bias": True,
        "use_abs_pos_emb": True,
        "use_rel_pos_bias": True,
        "use_shared_rel_pos_bias": False,
        "init_values": layer_scale,
    }


def add_relative_layers(
    backbone: ViTBackbone, cfg: Config, layer_scale: float
) -> tuple[ViTBackbone, Config]:
    """The encoder rebuilt as a timm ``Beit`` with per-block zero relative position tables and
    layer scales (the encoder's own, else ``layer_scale``), and the config that builds it."""
    vit = backbone.vit
    width = backbone.embed_dim
    cfg = copy.deepcopy(cfg)
    cfg.model.kwargs = beit_kwargs(vit, layer_scale)
    cfg.model.name = BEIT_NAME
    cfg.model.position, cfg.model.init = "learned", "timm"
    m = cfg.model
    rebuilt = ViTBackbone(m.name, m.img_size, m.patch_size, m.in_chans, m.drop_path, **m.kwargs)
    source = backbone.state_dict()
    weights: dict[str, Tensor] = {}
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        weights[f"vit.{key}"] = source[f"vit.{key}"]
    for index, (block, target) in enumerate(zip(vit.blocks, rebuilt.vit.blocks, strict=True)):
        prefix = f"vit.blocks.{index}."
        for name, value in block.state_dict().items():
            if name.startswith(("ls1.", "ls2.")) or name == "attn.qkv.bias":
                continue
            weights[prefix + name] = value
        q_bias, _, v_bias = block.attn.qkv.bias.detach().chunk(3)
        weights[prefix + "attn.q_bias"], weights[prefix + "attn.v_bias"] = q_bias, v_bias
        weights[prefix + "attn.relative_position_bias_table"] = torch.zeros_like(
            target.attn.relative_position_bias_table
        )
        weights[prefix + "gamma_1"] = _gamma(block.ls1, width, layer_scale)
        weights[prefix + "gamma_2"] = _gamma(block.ls2, width, layer_scale)
    for key in ("weight", "bias"):
        weights[f"vit.norm.{key}"] = source[f"vit.norm.{key}"]
    missing, unexpected = rebuilt.load_state_dict(weights, strict=False)
    left = [k for k in missing if not k.endswith("relative_position_index")]
    if left or unexpected:  # a guard against timm renaming a Beit parameter
        raise RuntimeError(f"BEiT-style rebuild: missing {left}, unexpected {unexpected}")
    return rebuilt, cfg
