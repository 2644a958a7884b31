"""Load a pre-trained encoder from a run directory for downstream tasks (no unpickling)."""

from __future__ import annotations

import copy
import operator
import re
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

from timm.layers import resample_abs_pos_embed
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table
from torch import Tensor, nn

from ropim.harness.backbone import ViTBackbone
from ropim.harness.checkpoint import (
    WEIGHTS_FILE,
    CheckpointDir,
    architecture_signature,
    check_architecture,
    read_weights,
)
from ropim.harness.config import Config, load_config
from ropim.harness.errors import CheckpointError, ConfigError
from ropim.harness.runtime import build_encoder


def pretrained_checkpoint(run_dir: str | Path) -> str:
    """Which checkpoint of the run downstream tasks start from (its newest)."""
    latest = CheckpointDir(run_dir).latest()
    if latest is None:
        raise CheckpointError(f"{run_dir} holds no checkpoint")
    return latest.name


def finetune_fingerprint(run_dir: str | Path, settings: Any) -> dict[str, Any]:
    """What a fine-tune's checkpoints must have been made with to be resumed: its settings and
    the pre-training checkpoint it started from."""
    return {"settings": asdict(settings), "encoder": pretrained_checkpoint(run_dir)}


SHARED_TABLE = "vit.rel_pos_bias.relative_position_bias_table"


def untie_relative_position(cfg: Config, weights: dict[str, Tensor]) -> None:
    """Turn a shared relative position bias into one table per block, each a copy of the
    shared one (BEiT's and ROPIM's fine-tuning: ROPIM ``utils.py:117-125``); edits both."""
    if SHARED_TABLE not in weights:
        return
    cfg.model.kwargs = cfg.model.kwargs | {
        "use_shared_rel_pos_bias": False,
        "use_rel_pos_bias": True,
    }
    table = weights.pop(SHARED_TABLE)
    weights.pop("vit.rel_pos_bias.relative_position_index", None)
    blocks = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("vit.blocks."))
    for index in range(blocks):
        weights[f"vit.blocks.{index}.attn.relative_position_bias_table"] = table.clone()


def load_pretrained_encoder(
    run_dir: str | Path, drop_path: float | None = None, per_layer_bias: bool = False
) -> tuple[ViTBackbone, Config]:
    """The run's backbone with the weights of its newest checkpoint, and the run's config;
    ``drop_path`` rebuilds it with another stochastic-depth rate (fine-tuning);
    ``per_layer_bias`` unties a shared relative position bias into per-block copies."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a pre-training run (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    latest = CheckpointDir(run_dir).latest()
    if latest is None:
        raise CheckpointError(f"{run_dir} holds no checkpoint")
    if drop_path is not None:
        cfg.model.drop_path = drop_path
    path = latest / WEIGHTS_FILE
    tensors, metadata = read_weights(path)
    backbone = build_encoder(cfg)
    check_architecture(metadata, backbone, path)
    # The encoder the method names (MaskingMethod.encoder_name; the student by default).
    prefix = metadata.get("encoder", "backbone") + "."
    weights = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if per_layer_bias and SHARED_TABLE in weights:
        untie_relative_position(cfg, weights)
        backbone = build_encoder(cfg)
    missing, unexpected = backbone.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit the encoder: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    backbone.release_position()  # fixed in MAE's pre-training, fine-tuned downstream
    return backbone, cfg


def dense_encoder(
    backbone: ViTBackbone, cfg: Config, img_size: int, relative_ok: bool = False
) -> ViTBackbone:
    """The same encoder for dense tasks: position embeddings resampled once to ``img_size``
    (as mmsegmentation and ViTDet do at load), other input sizes resampled per forward.

    A relative position bias (BEiT-style; ``relative_ok`` where the task supports it) becomes
    one table per block, each resized to the ``img_size`` grid as mmsegmentation's BEiT backbone
    does; such an encoder then takes ``img_size`` inputs only (timm's Beit has no dynamic size).
    """
    if img_size % backbone.patch_size:
        raise CheckpointError(
            f"crop size {img_size} is not divisible by the encoder's patch size "
            f"{backbone.patch_size}; pick a multiple of {backbone.patch_size}"
        )
    if backbone.relative_position is not None:
        if not relative_ok:
            raise ConfigError(
                f"model.name={cfg.model.name!r} has a relative position bias; detection (ViTDet) "
                f"uses its own decomposed relative positions on a plain ViT: use a 'vit_*' "
                f"backbone for detection"
            )
        return _dense_relative(backbone, cfg, img_size)
    m = cfg.model
    dense = ViTBackbone(
        m.name,
        img_size,
        m.patch_size,
        m.in_chans,
        m.drop_path,
        m.position,
        m.init,
        **(m.kwargs | {"dynamic_img_size": True}),
    )
    state = backbone.state_dict()
    _resample_positions(state, backbone, dense)
    dense.load_state_dict(state)
    dense.release_position()  # downstream tasks train every encoder weight
    return dense


def _resample_positions(
    state: dict[str, Tensor], backbone: ViTBackbone, dense: ViTBackbone
) -> None:
    """An absolute position embedding in ``state`` resampled from the pre-training grid to the
    dense encoder's (prefix tokens kept as they are)."""
    if backbone.vit.pos_embed is None or dense.grid == backbone.grid:
        return
    prefix = 0 if getattr(backbone.vit, "no_embed_class", False) else backbone.num_prefix_tokens
    state["vit.pos_embed"] = resample_abs_pos_embed(
        state["vit.pos_embed"], list(dense.grid), list(backbone.grid), prefix
    )


def _dense_relative(backbone: ViTBackbone, cfg: Config, img_size: int) -> ViTBackbone:
    cfg = copy.deepcopy(cfg)
    weights = {k: v for k, v in backbone.state_dict().items() if "relative_position_index" not in k}
    untie_relative_position(cfg, weights)  # a shared table: one copy per block
    m = cfg.model
    dense = ViTBackbone(m.name, img_size, m.patch_size, m.in_chans, m.drop_path, **m.kwargs)
    suffix = ".relative_position_bias_table"
    for key in [k for k in weights if k.endswith(suffix)]:
        target = dense.get_submodule(key[: -len(suffix)])
        shape = target.relative_position_bias_table.shape
        if weights[key].shape != shape:
            with warnings.catch_warnings():  # torch deprecation notes inside timm's resize
                warnings.simplefilter("ignore", UserWarning)
                weights[key] = resize_rel_pos_bias_table(
                    weights[key],
                    new_window_size=target.window_size,
                    new_bias_shape=shape,
                    old_window_size=backbone.grid,
                )
    _resample_positions(weights, backbone, dense)
    dense.load_state_dict(weights, strict=False)  # relative_position_index: rebuilt buffers
    return dense


class FineTunedViT(nn.Module):
    """A downstream model around one pre-trained ViT: its checkpoint signature, the layer
    groups timm's layer-wise lr decay reads (stem, blocks in order, everything else last) and
    the names kept out of weight decay."""

    ENCODER_PATH: ClassVar[str]  # dotted attribute path of the ViTBackbone inside the model
    TASK: ClassVar[str]
    num_classes: int

    @property
    def encoder(self) -> ViTBackbone:
        return operator.attrgetter(self.ENCODER_PATH)(self)

    def signature(self) -> dict[str, str]:
        """What a fine-tuning checkpoint must match to be resumed into this model."""
        return architecture_signature(
            self, self.encoder, task=self.TASK, num_classes=str(self.num_classes)
        )

    def group_matcher(self, coarse: bool = False) -> dict:
        vit = "^" + re.escape(f"{self.ENCODER_PATH}.vit.")
        return {
            "stem": vit + r"(?:cls_token|reg_token|pos_embed|patch_embed|rel_pos_bias)",
            "blocks": [(vit + r"blocks\.(\d+)", None)],
        }

    def no_weight_decay(self) -> set[str]:
        return {f"{self.ENCODER_PATH}.{name}" for name in self.encoder.no_weight_decay()}
