"""The count-sketch projection satisfies every property docs/method.md states."""

import math

import pytest
import torch

from ropim.method.sketch import CountSketch, num_buckets

SHAPES = [(196, 0.14), (49, 0.14), (64, 0.25), (50, 0.3), (17, 0.5)]


def _sketch(n: int, ratio: float, b: int = 4, seed: int = 0, **kw) -> CountSketch:
    return CountSketch.sample(b, n, ratio, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("n,ratio", SHAPES)
def test_projection_is_symmetric_idempotent_with_trace_k(n, ratio):
    sketch = _sketch(n, ratio)
    p = sketch.dense().double()
    k = math.ceil(ratio * n - 1e-9)
    assert sketch.num_buckets == k
    torch.testing.assert_close(p, p.transpose(1, 2))
    torch.testing.assert_close(p @ p, p)
    torch.testing.assert_close(
        torch.diagonal(p, dim1=1, dim2=2).sum(-1), torch.full((4,), float(k), dtype=p.dtype)
    )
    assert all(int(torch.linalg.matrix_rank(m)) == k for m in p)


@pytest.mark.parametrize("n,ratio", SHAPES)
def test_complement_is_orthogonal_and_energy_splits(n, ratio):
    sketch = _sketch(n, ratio)
    x = torch.randn(4, n, 24, dtype=torch.float64)
    kept, removed = sketch.project(x), sketch.complement(x)
    torch.testing.assert_close(kept + removed, x)
    p = sketch.dense().double()
    torch.testing.assert_close(p @ (torch.eye(n, dtype=p.dtype) - p), torch.zeros_like(p))
    torch.testing.assert_close((kept * removed).sum((1, 2)), torch.zeros(4, dtype=x.dtype))
    energy = kept.pow(2).sum((1, 2)) + removed.pow(2).sum((1, 2))
    torch.testing.assert_close(energy, x.pow(2).sum((1, 2)))


@pytest.mark.parametrize("n,ratio", SHAPES)
@pytest.mark.parametrize("scaling", ["exact", "authors"])
def test_fast_path_equals_dense_formula(n, ratio, scaling):
    sketch = _sketch(n, ratio, scaling=scaling)
    x = torch.randn(4, n, 12, dtype=torch.float64)
    torch.testing.assert_close(sketch.project(x), sketch.dense().double() @ x)


def test_dense_matches_closed_form_s_inverse_gram_st():
    sketch = _sketch(49, 0.14)
    s = sketch.matrix().double()
    gram = s.transpose(1, 2) @ s
    torch.testing.assert_close(gram, torch.diag_embed(sketch.counts.double()))
    expected = s @ torch.linalg.inv(gram) @ s.transpose(1, 2)
    torch.testing.assert_close(sketch.dense().double(), expected)


def test_authors_scaling_is_shrunk_projection():
    exact = _sketch(196, 0.14, seed=3)
    authors = _sketch(196, 0.14, seed=3, scaling="authors")
    # rho * S S^T = rho * c * Pi with c = 7 tokens per bucket: 0.98 * Pi.
    torch.testing.assert_close(authors.dense(), 0.98 * exact.dense())


@pytest.mark.parametrize("n,ratio", SHAPES)
def test_buckets_and_signs_are_balanced(n, ratio):
    sketch = _sketch(n, ratio, b=8)
    k = sketch.num_buckets
    counts = torch.stack([torch.bincount(row, minlength=k) for row in sketch.buckets])
    assert counts.min() >= n // k and counts.max() <= math.ceil(n / k)
    assert int(counts.sum(1).unique()) == n
    torch.testing.assert_close(sketch.counts, counts.float())
    negatives = (sketch.signs == -1).sum(1)
    assert torch.all(negatives == n // 2)
    assert set(sketch.signs.unique().tolist()) == {-1.0, 1.0}


def test_fresh_sketch_per_image_and_per_draw():
    generator = torch.Generator().manual_seed(0)
    first = CountSketch.sample(16, 196, 0.14, generator=generator)
    second = CountSketch.sample(16, 196, 0.14, generator=generator)
    dense = first.dense()
    distinct_images = {tuple(dense[i].flatten().tolist()) for i in range(16)}
    assert len(distinct_images) == 16
    assert not torch.equal(first.buckets, second.buckets)
    assert not torch.equal(first.signs, second.signs)


def test_same_generator_seed_reproduces_sketch():
    a, b = _sketch(49, 0.14, seed=7), _sketch(49, 0.14, seed=7)
    assert torch.equal(a.buckets, b.buckets) and torch.equal(a.signs, b.signs)


def test_white_signal_keeps_k_over_n_energy_on_average():
    n, ratio = 196, 0.14
    sketch = _sketch(n, ratio, b=256, seed=1)
    x = torch.randn(256, n, 32, generator=torch.Generator().manual_seed(2))
    kept = sketch.project(x).pow(2).sum() / x.pow(2).sum()
    assert abs(float(kept) - 28 / 196) < 0.01


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_ratio_outside_open_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match="between 0 and 1"):
        CountSketch.sample(2, 49, ratio)


def test_k_is_ceil_of_ratio_times_n():
    assert num_buckets(196, 0.14) == 28
    assert num_buckets(49, 0.14) == 7
    assert num_buckets(50, 0.14) == 7
    assert num_buckets(100, 0.011) == 2


def test_project_never_builds_n_by_n(monkeypatch):
    """The fast path must not call dense(): memory stays O(N·D) for large token counts."""
    sketch = _sketch(4096, 0.14, b=2)
    monkeypatch.setattr(CountSketch, "dense", lambda self: pytest.fail("dense() called"))
    out = sketch.project(torch.randn(2, 4096, 8))
    assert out.shape == (2, 4096, 8)


def test_bf16_input_is_projected_in_fp32():
    sketch = _sketch(49, 0.14)
    x = torch.randn(4, 49, 16)
    out = sketch.project(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), sketch.project(x), atol=0.05, rtol=0.02)


def test_wrong_token_shape_is_rejected():
    with pytest.raises(ValueError, match="expected tokens of shape"):
        _sketch(49, 0.14).project(torch.randn(4, 48, 8))
