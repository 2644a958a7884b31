"""The authors' checkpoint files: read them safely, recognise their layout, and map their keys
onto the suite's encoder with strict key and shape checks.

Layouts (all keep the encoder and drop what pre-training alone needs):

- ``mae``: facebookresearch/mae ``{'model': ...}`` with timm's ViT key names; decoder keys
  (``decoder_*``, ``mask_token``) dropped.
- ``simmim``: microsoft/SimMIM and csiro-robotics/ROPIM ``{'model': ...}`` whose encoder keys
  start with ``encoder.`` (BEiT-style blocks: ``q_bias``/``v_bias``, ``gamma_1``/``gamma_2``,
  relative position tables); ``decoder.*``, ``encoder.mask_token`` and the
  ``relative_position_index`` buffers dropped. ROPIM saves the same layout (its
  ``utils.py:load_pretrained`` strips the same prefix).
- ``beit``: microsoft/unilm BEiT: timm's ``Beit`` key names plus ``mask_token`` and
  ``lm_head.*``, dropped.
- ``timm``: a plain timm state dict (nothing dropped but a classifier ``head``).

Files are read with ``torch.load(weights_only=True)``; objects other than tensors and plain
containers that the authors pickled beside the weights (SimMIM's yacs ``config``, MAE's
``argparse.Namespace``) are read as plain dicts by a stub, never imported or executed.
"""

from __future__ import annotations

import collections
import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from ropim.harness.errors import CheckpointError, ConfigError

LAYOUTS = ("mae", "simmim", "beit", "timm")
CONTAINERS = ("model", "state_dict", "module")


class _Opaque:
    """Stands in for any class pickled beside the weights: becomes an (ordered) dict."""

    def __new__(cls, *args: Any, **kwargs: Any) -> collections.OrderedDict:  # type: ignore[misc]
        return collections.OrderedDict()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_file(path: Path) -> dict[str, Tensor]:
    """The tensors of a ``.pth``/``.pt``/``.safetensors`` file, unwrapped from its container."""
    if not path.is_file():
        raise ConfigError(f"--weights {path}: file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(
                f"--weights {path}: not a readable safetensors file ({exc})"
            ) from None
    if path.suffix not in (".pth", ".pt", ".bin"):
        raise ConfigError(f"--weights {path}: expected a .pth, .pt or .safetensors file")
    try:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        with torch.serialization.safe_globals([(_Opaque, name) for name in foreign]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: say which, in one line
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"--weights {path}: cannot be read as weights ({first})") from None
    for key in CONTAINERS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise CheckpointError(
            f"--weights {path}: holds no state dict (looked at the top level and under "
            f"{', '.join(repr(k) for k in CONTAINERS)})"
        )
    return dict(loaded)


def detect_layout(keys: list[str]) -> str:
    if any(k.startswith("encoder.") for k in keys):
        return "simmim"
    if any(k.startswith(("decoder_", "decoder.")) for k in keys):
        return "mae"
    if any(k.startswith("lm_head.") for k in keys) or any(".gamma_1" in k for k in keys):
        return "beit"
    return "timm"


def _dropped(layout: str, key: str) -> bool:
    """Keys of the layout that pre-training alone needs (or buffers the model rebuilds)."""
    if key.endswith("relative_position_index") or key.startswith(("head.", "fc_norm.")):
        return True
    if layout == "mae":
        return key.startswith(("decoder_", "decoder.")) or key == "mask_token"
    if layout == "simmim":
        return not key.startswith("encoder.") or key == "encoder.mask_token"
    if layout == "beit":
        return key.startswith("lm_head.") or key == "mask_token"
    return False


def encoder_weights(tensors: dict[str, Tensor], layout: str) -> tuple[dict[str, Tensor], int]:
    """The encoder's tensors under timm's names, and how many keys were dropped."""
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r} must be one of {LAYOUTS}")
    kept = {k: v for k, v in tensors.items() if not _dropped(layout, k)}
    if layout == "simmim":
        kept = {k.removeprefix("encoder."): v for k, v in kept.items()}
    return kept, len(tensors) - len(kept)


def _hint(missing: list[str], unexpected: list[str]) -> str:
    shared = "rel_pos_bias.relative_position_bias_table"
    if shared in unexpected:
        return " (the file has one shared relative table: set model.kwargs.use_shared_rel_pos_bias)"
    if any(k.endswith("attn.relative_position_bias_table") for k in unexpected):
        return " (the file has per-block relative tables: model.kwargs.use_rel_pos_bias=true)"
    if any(".gamma_1" in k for k in unexpected) or any(".q_bias" in k for k in unexpected):
        return " (BEiT-style blocks: model.name=beit_*, with model.kwargs.init_values set)"
    if "pos_embed" in unexpected:
        return " (the file has an absolute position table: model.kwargs.use_abs_pos_emb=true)"
    return ""


def check_and_load(
    model: torch.nn.Module, weights: dict[str, Tensor], source: str, settings: str
) -> None:
    """Load ``weights`` into ``model`` exactly: any unknown, missing or mis-shaped key is one
    error naming them (no silent resampling)."""
    expected = model.state_dict()
    unexpected = sorted(set(weights) - set(expected))
    missing = sorted(set(expected) - set(weights))
    shapes = [
        f"{k} {tuple(weights[k].shape)} vs. {tuple(expected[k].shape)}"
        for k in sorted(set(weights) & set(expected))
        if weights[k].shape != expected[k].shape
    ]
    problems = []
    if unexpected:
        problems.append(f"unknown keys {_few(unexpected)}")
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if shapes:
        problems.append(f"wrong shapes (file vs. model) {_few(shapes)}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit the encoder built from {settings}: {'; '.join(problems)}"
            f"{_hint(missing, unexpected)}. Set the architecture with model.name/model.kwargs "
            f"(or --layout); nothing is resampled"
        )
    model.load_state_dict(weights, strict=True)


def _few(items: list[str], count: int = 4) -> str:
    more = f" and {len(items) - count} more" if len(items) > count else ""
    return ", ".join(items[:count]) + more
