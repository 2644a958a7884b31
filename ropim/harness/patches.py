"""Convert images to per-token pixel vectors and back (the decoder's target layout)."""

from __future__ import annotations

from torch import Tensor


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``(B, C, H, W)`` → ``(B, N, p·p·C)``, tokens in the row-major order of ViT patch embeds."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> Tensor:
    """Inverse of :func:`patchify` for a ``grid`` of ``(rows, cols)`` tokens."""
    b = tokens.shape[0]
    p = patch_size
    gh, gw = grid
    x = tokens.reshape(b, gh, gw, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * p, gw * p)
