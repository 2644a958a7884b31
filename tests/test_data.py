import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from ropim.harness.config import DataSection
from ropim.harness.data.batching import epoch_batches
from ropim.harness.data.datasets import load_images
from ropim.harness.data.transforms import pretrain_transform
from ropim.harness.data.views import SeededViews
from ropim.harness.errors import ConfigError, DataError


def test_bundled_digits_split_is_fixed_stratified_and_disjoint():
    train = load_images(DataSection(dataset="mnist", split="train"))
    val = load_images(DataSection(dataset="mnist", split="val"))
    assert len(train) == 4000 and len(val) == 1000
    train_px = {bytes(train.images[i].numpy()) for i in range(len(train))}
    assert not any(bytes(val.images[i].numpy()) in train_px for i in range(0, 1000, 7))
    assert torch.bincount(val.labels, minlength=10).tolist() == [100] * 10
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and 0 <= label < 10


def test_limit_takes_a_fixed_subset_spanning_the_classes():
    a = load_images(DataSection(dataset="mnist", limit=100))
    b = load_images(DataSection(dataset="mnist", limit=100))
    labels = [a[i][1] for i in range(len(a))]
    assert len(a) == 100 and set(labels) == set(range(10))
    assert a.indices == b.indices


def test_views_are_a_function_of_seed_epoch_and_index():
    images = load_images(DataSection(dataset="mnist", limit=8))
    view = DataSection(crop_scale=[0.67, 1.0], interpolation="bilinear")
    transform = pretrain_transform(view, 28, 3)
    views = SeededViews(images, transform, seed=1)
    a = views[3][0]
    torch.manual_seed(123)  # global RNG state must not matter
    assert torch.equal(views[3][0], a)
    assert a.shape == (3, 28, 28) and a.dtype == torch.float32
    views.set_epoch(1)
    assert not torch.equal(views[3][0], a)


def test_epoch_batches_shard_ranks_and_resume_mid_epoch():
    full = epoch_batches(100, 10, seed=0, epoch=2)
    assert len(full) == 10 and sorted(sum(full, [])) == list(range(100))
    assert epoch_batches(100, 10, seed=0, epoch=2, start_batch=4) == full[4:]
    r0 = epoch_batches(100, 10, seed=0, epoch=2, rank=0, world_size=2)
    r1 = epoch_batches(100, 10, seed=0, epoch=2, rank=1, world_size=2)
    assert len(r0) == len(r1) == 5
    assert not set(sum(r0, [])) & set(sum(r1, []))
    assert epoch_batches(100, 10, seed=0, epoch=3) != full


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(DataError, match=f"dataset folder not found: {tmp_path}/nowhere/train"):
        load_images(DataSection(dataset="imagefolder", root=str(tmp_path / "nowhere")))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_images(DataSection(dataset="imagefolder", root=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="data.root is required"):
        load_images(DataSection(dataset="imagefolder"))
    with pytest.raises(ConfigError, match="unknown data.dataset='cifar'"):
        load_images(DataSection(dataset="cifar"))


def test_image_folder_reads_images_and_names_a_corrupt_file(tmp_path):
    for cls in ("cat", "dog"):
        folder = tmp_path / "train" / cls
        folder.mkdir(parents=True)
        Image.new("RGB", (40, 30), color=(10, 200, 30)).save(folder / "a.jpg")
    images = load_images(DataSection(dataset="imagefolder", root=str(tmp_path)))
    views = SeededViews(
        images,
        pretrain_transform(DataSection(crop_scale=[0.67, 1.0], interpolation="bilinear"), 32, 3),
        seed=0,
    )
    assert len(views) == 2 and views[0][0].shape == (3, 32, 32)
    bad = tmp_path / "train" / "dog" / "b.jpg"
    bad.write_bytes(b"not a jpeg")
    images = load_images(DataSection(dataset="imagefolder", root=str(tmp_path)))
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        [images[i] for i in range(len(images))]


def test_evaluation_view_is_resize_256_then_centre_crop_224_on_folders():
    from ropim.harness.data.transforms import eval_resize, eval_transform

    folder = DataSection(dataset="imagefolder", mean=[0.5] * 3, std=[0.5] * 3)
    assert eval_resize(folder, 224) == 256
    assert eval_resize(DataSection(dataset="mnist"), 28) == 28  # digits: the whole image
    assert eval_resize(DataSection(dataset="imagefolder", eval_crop_pct=1.0), 224) == 224
    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    expected = v2.functional.center_crop(
        v2.functional.resize(image, 256, interpolation=v2.InterpolationMode.BICUBIC), 224
    )
    view = eval_transform(folder, 224, 3)(image)
    assert view.shape == (3, 224, 224)
    torch.testing.assert_close(view, (expected.float() / 255 - 0.5) / 0.5)
