"""Architecture values checked before a model is built: a bad width, depth or head count is one
``error:`` line naming the key, never an assertion deep inside timm or a model that takes
minutes (or all memory) to build."""

from __future__ import annotations

import math
from typing import Any

from ropim.harness.errors import ConfigError

# Generous bounds: ViT-g has depth 40 and width 1408; anything far beyond is a typo.
MAX_DEPTH = 256
MAX_WIDTH = 16384
IMAGE_CHANNELS = 3  # every dataset of the suite yields RGB (the digits are converted)


def _whole(key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{key}={value!r} must be a whole number from {low} to {high}")
    return value


def check_model_values(
    img_size: Any, patch_size: Any, in_chans: Any, kwargs: dict[str, Any], prefix: str = "model."
) -> None:
    """``prefix`` names where the values came from (``model.``, or a weights folder's
    ``model_args.``) so the message points at the file the user must fix."""
    args = "kwargs." if prefix == "model." else ""
    size = _whole(f"{prefix}img_size", img_size, 1, 8192)
    patch = _whole(f"{prefix}patch_size", patch_size, 1, size)
    if size % patch:
        raise ConfigError(
            f"{prefix}img_size={size} is not divisible by {prefix}patch_size={patch}; pick an "
            f"image size that is a multiple of the patch size (e.g. "
            f"{max(patch, size // patch * patch)})"
        )
    if in_chans != IMAGE_CHANNELS:
        raise ConfigError(
            f"{prefix}in_chans={in_chans!r}: the suite's data are RGB images "
            f"({IMAGE_CHANNELS} channels; the digits are converted), so in_chans must be 3"
        )
    if not isinstance(kwargs, dict):
        raise ConfigError(
            f"{prefix}{args.rstrip('.') or 'model_args'}={kwargs!r} must be a mapping"
        )
    depth = kwargs.get("depth")
    if depth is not None:
        _whole(f"{prefix}{args}depth", depth, 1, MAX_DEPTH)
    width = kwargs.get("embed_dim")
    if width is not None:
        _whole(f"{prefix}{args}embed_dim", width, 1, MAX_WIDTH)
    heads = kwargs.get("num_heads")
    if heads is not None:
        _whole(f"{prefix}{args}num_heads", heads, 1, MAX_WIDTH)
        if width is not None and width % heads:
            raise ConfigError(
                f"{prefix}{args}num_heads={heads} does not divide {prefix}{args}embed_dim="
                f"{width}: each head takes an equal share of the width"
            )
    ratio = kwargs.get("mlp_ratio")
    if ratio is not None and (
        isinstance(ratio, bool)
        or not isinstance(ratio, (int, float))
        or not (math.isfinite(ratio) and 0 < ratio <= 64)
    ):
        raise ConfigError(f"{prefix}{args}mlp_ratio={ratio!r} must be a number in (0, 64]")
