"""Decoder-space crops: deterministic per (seed, epoch, index), torchvision's crop rule, close
to a full decode, normalised per batch as the per-image path does; and the speed benchmarks
run end to end on a few images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from ropim.harness.config import DataSection, load_config
from ropim.harness.data.views import SeededViews, pretrain_views
from ropim.harness.errors import DataError
from ropim.harness.fast_views import BatchNormalizer, DecoderCropViews, crop_box, decode_crop
from ropim.suite.bench_data import bench_data, make_jpeg_folder
from tests.conftest import TINY_CONFIG


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return make_jpeg_folder(tmp_path_factory.mktemp("jpegs"), count=8)


def _samples(root):
    paths = sorted((root / "train").rglob("*.jpg"))
    return [(str(p), int(p.parent.name.removeprefix("class"))) for p in paths]


def test_crop_box_follows_the_scale_and_ratio_and_the_generator():
    g = torch.Generator().manual_seed(0)
    assert crop_box(300, 300, (1.0, 1.0), (1.0, 1.0), g) == (0, 0, 300, 300)
    for _ in range(200):
        left, top, w, h = crop_box(500, 375, (0.2, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
        assert 0.2 * 500 * 375 * 0.9 <= w * h <= 500 * 375
    a = crop_box(500, 375, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(5))
    b = crop_box(500, 375, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(5))
    assert a == b


def test_views_are_a_function_of_seed_epoch_and_index(jpegs):
    def views(seed):
        return DecoderCropViews(_samples(jpegs), 32, (0.2, 1.0), (3 / 4, 4 / 3), 0.5, seed)

    first, again, other = views(0), views(0), views(1)
    image, label = first[3]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and label in range(4)
    assert torch.equal(image, again[3][0]) and not torch.equal(image, other[3][0])
    again.set_epoch(1)
    assert not torch.equal(image, again[3][0])
    first.set_epoch(1)
    assert torch.equal(first[3][0], again[3][0])


def test_a_reduced_decode_stays_close_to_the_full_decode(jpegs):
    path = _samples(jpegs)[0][0]
    with Image.open(path) as image:
        full = image.convert("RGB")
    for size in (64, 256):  # 64: decoded at 1/4 scale (94 px tall, still >= 64); 256: full
        fast = decode_crop(path, size, (1.0, 1.0), (4 / 3, 4 / 3), 0.0, torch.Generator())
        reference = np.asarray(full.resize((size, size), Image.BICUBIC))
        assert fast.dtype == torch.uint8 and fast.shape == (3, size, size)
        error = np.abs(fast.permute(1, 2, 0).numpy().astype(float) - reference).mean()
        assert error < 4.0  # of 255 levels


def test_files_libjpeg_turbo_cannot_read_go_through_pillow(tmp_path, jpegs):
    path = _samples(jpegs)[0][0]
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    png = tmp_path / "really_a_png.jpg"
    rgb.save(png, format="PNG")
    cmyk = tmp_path / "cmyk.jpg"
    rgb.convert("CMYK").save(cmyk, quality=95)
    expected = decode_crop(path, 48, (1.0, 1.0), (4 / 3, 4 / 3), 0.0, torch.Generator())
    for other in (png, cmyk):
        view = decode_crop(str(other), 48, (1.0, 1.0), (4 / 3, 4 / 3), 0.0, torch.Generator())
        assert view.shape == (3, 48, 48)
        assert (view.float() - expected.float()).abs().mean() < 6.0
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.jpg"):
        decode_crop(str(broken), 48, (1.0, 1.0), (1.0, 1.0), 0.0, torch.Generator())


def test_batch_normalisation_equals_the_per_image_path():
    pixels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    per_image = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    expected = torch.stack([per_image(p) for p in pixels])
    torch.testing.assert_close(BatchNormalizer(mean, std)(pixels), expected)
    floats = torch.randn(2, 3, 4, 4)
    assert BatchNormalizer(mean, std)(floats) is floats


def test_the_decode_setting_picks_the_path(jpegs):
    folder = DataSection(
        dataset="imagefolder", root=str(jpegs), crop_scale=[0.2, 1.0], interpolation="bicubic"
    )
    assert isinstance(pretrain_views(folder, 32, 3, 0), DecoderCropViews)
    folder.decode = "full"
    assert isinstance(pretrain_views(folder, 32, 3, 0), SeededViews)
    digits = DataSection(
        dataset="mnist", crop_scale=[0.67, 1.0], interpolation="bilinear", limit=16
    )
    assert isinstance(pretrain_views(digits, 28, 3, 0), SeededViews)  # tensors: no JPEG


def test_bench_data_measures_both_paths(jpegs):
    rows = bench_data(jpegs, img_size=32, count=8, workers=1)
    assert [r["path"] for r in rows] == ["full", "full", "scaled", "scaled"]
    assert len({r["view"] for r in rows}) == 2  # MAE's view and ROPIM/SimMIM's
    assert all(r["loader_per_core"] > 0 and r["decode_per_core"] > 0 for r in rows)
    assert all(
        r["ratio"] == pytest.approx(r["loader_per_core"] / r["decode_per_core"]) for r in rows
    )
    # 32-px views of 500x375 JPEGs are decoded at 1/8 or 1/4 scale: the views differ from a
    # full-scale decode of the same box, but little.
    scaled = [r for r in rows if r["path"] == "scaled"]
    assert all(r["dct_differs"] > 0.5 and 0 < r["dct_mean_abs"] < 8 for r in scaled)
    assert all(r["dct_psnr_db"] > 25 for r in scaled)


def test_harness_and_plain_loop_are_timed_on_the_same_work(tmp_path):
    from ropim.suite.bench import harness_vs_plain

    cfg = load_config(TINY_CONFIG)
    (row,) = harness_vs_plain(cfg, steps=4, folder=tmp_path, rounds=1)
    assert row["harness"] > 0 and row["plain"] > 0
    assert row["ratio"] == pytest.approx(row["harness"] / row["plain"])
    assert not any(tmp_path.iterdir())  # the scratch runs are removed
