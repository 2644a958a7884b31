"""Random orthogonal projection of the token axis by a balanced count sketch (ROPIM, sec. 3).

The projection ``Π = S (SᵀS)⁻¹ Sᵀ`` is never formed during training: because the columns of a
count-sketch matrix ``S`` have disjoint supports, ``(ΠΦ)_i = s_i · mean_{j: h(j)=h(i)} s_j Φ_j``,
a scatter-add over buckets and a gather back, O(N·D) per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ropim.harness.errors import check_ratio

Scaling = Literal["exact", "authors"]
SCALINGS: tuple[str, ...] = ("exact", "authors")


def num_buckets(num_tokens: int, ratio: float) -> int:
    """``K = ceil(ρ·N)``; validates ``ρ`` so a typo cannot silently train another method."""
    check_ratio("sketching ratio", ratio)
    if num_tokens < 2:
        raise ValueError(f"need at least 2 tokens to sketch, got {num_tokens}")
    # The epsilon keeps products such as 0.14·50 = 7.000000000000001 from rounding up.
    return max(1, math.ceil(ratio * num_tokens - 1e-9))


@dataclass(frozen=True)
class CountSketch:
    """One independent count sketch per image of a batch.

    ``buckets[b, i]`` is ``h(i)`` and ``signs[b, i]`` is ``s(i)`` for image ``b``;
    ``counts[b, k]`` is the size ``c_k`` of bucket ``k``.
    """

    buckets: Tensor  # (B, N) int64
    signs: Tensor  # (B, N) float32, ±1
    counts: Tensor  # (B, K) float32
    ratio: float
    scaling: Scaling = "exact"

    @property
    def batch_size(self) -> int:
        return self.buckets.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.buckets.shape[1]

    @property
    def num_buckets(self) -> int:
        return self.counts.shape[1]

    @classmethod
    def sample(
        cls,
        batch_size: int,
        num_tokens: int,
        ratio: float,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        scaling: Scaling = "exact",
    ) -> CountSketch:
        """Draw balanced buckets and balanced signs for each image, on ``device``.

        Buckets follow the authors' scheme: random permutations of ``[K]`` concatenated until
        ``N`` entries are filled, so each bucket holds ``floor(N/K)`` or ``ceil(N/K)`` tokens.
        """
        if scaling not in SCALINGS:
            raise ValueError(f"unknown projection scaling {scaling!r}; choose one of {SCALINGS}")
        k = num_buckets(num_tokens, ratio)
        if generator is not None and device is None:
            device = generator.device
        device = torch.device(device) if device is not None else torch.device("cpu")
        repeats = math.ceil(num_tokens / k)
        keys = torch.rand(batch_size, repeats, k, generator=generator, device=device)
        buckets = keys.argsort(dim=-1).reshape(batch_size, repeats * k)[:, :num_tokens]
        # Balanced signs: the first floor(N/2) ranks of a random permutation are negative.
        ranks = torch.rand(batch_size, num_tokens, generator=generator, device=device).argsort(-1)
        signs = torch.where(ranks < num_tokens // 2, -1.0, 1.0)
        counts = torch.zeros(batch_size, k, device=device)
        counts.scatter_add_(1, buckets, torch.ones_like(signs))
        return cls(buckets=buckets, signs=signs, counts=counts, ratio=float(ratio), scaling=scaling)

    def _bucket_weights(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Per-bucket factor applied to the signed bucket sum: ``1/c_k`` (exact Π) or ``ρ``."""
        counts = self.counts.to(dtype)
        if self.scaling == "exact":
            return counts.reciprocal()
        return torch.full_like(counts, self.ratio)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[:2] != self.buckets.shape:
            raise ValueError(
                f"expected tokens of shape (B={self.batch_size}, N={self.num_tokens}, D), "
                f"got {tuple(x.shape)}"
            )

    def project(self, x: Tensor) -> Tensor:
        """``Π x`` for ``x`` of shape ``(B, N, D)``, by bucket scatter/gather (never N×N).

        Rows of the flattened batch are summed into their bucket with ``index_add_`` and read
        back with ``index_select``: whole D-vectors move at once, O(N·D) per image.
        """
        self._check_input(x)
        b, n, d = x.shape
        # Bucket sums in at least fp32, even for bf16 tokens under autocast.
        work = x.to(torch.promote_types(x.dtype, torch.float32))
        signs = self.signs.to(work.dtype).reshape(b * n, 1)
        rows = self._global_buckets()
        sums = work.new_zeros(b * self.num_buckets, d)
        sums.index_add_(0, rows, work.reshape(b * n, d) * signs)
        sums = sums * self._bucket_weights(work.dtype).reshape(-1, 1)
        out = sums.index_select(0, rows).mul_(signs)
        return out.view(b, n, d).to(x.dtype)

    def _global_buckets(self) -> Tensor:
        """Bucket ids made unique across the batch: image ``b``'s bucket ``k`` is ``b·K + k``."""
        offsets = torch.arange(self.batch_size, device=self.buckets.device) * self.num_buckets
        return (self.buckets + offsets.unsqueeze(1)).reshape(-1)

    def complement(self, x: Tensor) -> Tensor:
        """``Π⊥ x = x − Π x``: what the projection removed."""
        return x - self.project(x)

    def matrix(self) -> Tensor:
        """The dense ``(B, N, K)`` count-sketch matrices ``S``."""
        one_hot = torch.nn.functional.one_hot(self.buckets, self.num_buckets).float()
        return one_hot * self.signs.unsqueeze(-1)

    def dense(self) -> Tensor:
        """The ``(B, N, N)`` projection matrices, for tests and inspection only."""
        s = self.matrix()
        return (s * self._bucket_weights().unsqueeze(1)) @ s.transpose(1, 2)
