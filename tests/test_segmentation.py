"""Segmentation: digit scenes in the ADE20K layout, the pyramid, mIoU maths, inference, UperNet."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from downstream.pyramid import ViTPyramid, default_out_indices
from downstream.scenes import (
    BACKGROUND_LABEL,
    IGNORE_LABEL,
    SceneSpec,
    compose_scene,
    scene_digits,
    write_ade20k_scenes,
)
from downstream.segmentation.dataset import IGNORE_INDEX, ADE20KSegmentation
from downstream.segmentation.finetune import finetune_segmentation
from downstream.segmentation.inference import predict_labels, slide_logits
from downstream.segmentation.metrics import confusion_matrix, segmentation_scores
from downstream.segmentation.settings import segmentation_settings
from ropim.harness.config import load_config
from ropim.harness.errors import ConfigError, DataError
from ropim.harness.pretrain import pretrain
from ropim.suite.results import read_results
from tests.conftest import TINY_CONFIG, SimulatedCrash, crash_after, evaluate, tiny_backbone

SMALL_SCENES = SceneSpec(canvas=56, train_scenes=6, val_scenes=3, max_digits=3)


def test_reader_returns_the_generated_labels_exactly(tmp_path):
    folder = write_ade20k_scenes(tmp_path, SMALL_SCENES)
    data = ADE20KSegmentation(tmp_path, "train", num_classes=11)
    assert len(data) == 6 and folder.name == "ADEChallengeData2016"
    digits = scene_digits("train")
    saw_ignore = False
    for index in range(len(data)):
        scene = compose_scene(SMALL_SCENES, digits, "train", index)
        image, label = data[index]
        expected = scene.label.astype(np.int64) - 1  # reduce zero label
        expected[scene.label == IGNORE_LABEL] = IGNORE_INDEX
        assert torch.equal(label, torch.from_numpy(expected))
        saw_ignore |= bool((label == IGNORE_INDEX).any())
        assert set(label.unique().tolist()) <= set(range(11)) | {IGNORE_INDEX}
        assert (label == BACKGROUND_LABEL - 1).float().mean() > 0.3
        digits_in_scene = {i.digit for i in scene.instances}
        assert set(label.unique().tolist()) - {10, IGNORE_INDEX} == digits_in_scene
        jpeg_error = (image.float() - torch.from_numpy(scene.image).permute(2, 0, 1)).abs()
        assert jpeg_error.mean() < 4, "images are the composed scenes (up to JPEG loss)"
    assert saw_ignore, "digit rims are written as ignore (0)"
    # Same spec, same files: reproducible, and the existing set is reused.
    before = (folder / "scenes.json").stat().st_mtime_ns
    assert write_ade20k_scenes(tmp_path, SMALL_SCENES) == folder
    assert (folder / "scenes.json").stat().st_mtime_ns == before
    assert not torch.equal(data[0][1], data[1][1])


def test_without_reduce_zero_label_labels_are_kept(tmp_path):
    write_ade20k_scenes(tmp_path, SMALL_SCENES)
    raw = ADE20KSegmentation(tmp_path, "val", num_classes=12, reduce_zero_label=False)
    written = np.asarray(Image.open(raw.labels[0]))
    assert torch.equal(raw[0][1], torch.from_numpy(written.astype(np.int64)))


def test_wrong_layout_and_bad_labels_are_named(tmp_path):
    with pytest.raises(DataError, match="ADEChallengeData2016/images/"):
        ADE20KSegmentation(tmp_path / "nowhere", "train", 11)
    folder = write_ade20k_scenes(tmp_path, SMALL_SCENES)
    shutil.rmtree(folder / "annotations" / "validation")
    with pytest.raises(DataError, match="annotations/validation"):
        ADE20KSegmentation(tmp_path, "val", 11)
    data = ADE20KSegmentation(tmp_path, "train", 11)
    Image.fromarray(np.full((56, 56), 40, dtype=np.uint8)).save(data.labels[2])
    with pytest.raises(DataError, match=r"holds value 40, outside the class range 1\.\.11"):
        data[2]
    data.labels[3].unlink()
    with pytest.raises(DataError, match="have no label map"):
        ADE20KSegmentation(tmp_path, "train", 11)


@pytest.mark.parametrize("patch", [4, 8, 16])
def test_pyramid_strides_are_quarter_half_one_and_two_patches(patch):
    backbone = tiny_backbone(img_size=64, patch_size=patch, depth=4)
    pyramid = ViTPyramid(backbone, default_out_indices(4))
    levels = pyramid(torch.randn(2, 3, 64, 64))
    assert pyramid.strides == [patch / 4, patch / 2, patch, patch * 2]
    for level, stride in zip(levels, pyramid.strides, strict=True):
        assert level.shape == (2, 32, int(64 / stride), int(64 / stride))


def test_default_blocks_follow_the_vit_b_recipe():
    assert default_out_indices(12) == [3, 5, 7, 11]
    assert default_out_indices(4) == [0, 1, 2, 3]
    pyramid = ViTPyramid(tiny_backbone(img_size=28), default_out_indices(2))
    assert [t.shape[-1] for t in pyramid(torch.randn(1, 3, 28, 28))] == [16, 8, 4, 2]


def test_miou_matches_a_hand_calculation():
    # 4 classes; class 3 is absent from both truth and prediction.
    truth = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 255, 255])
    guess = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 3, 1])
    matrix = confusion_matrix(guess, truth, 4)
    assert matrix.sum() == 8  # ignored pixels count nowhere
    scores = segmentation_scores(matrix)
    # class 0: inter 2, union 3+3-2=4; class 1: inter 1, union 2+2-1=3; class 2: 2/(3+3-2)=0.5
    iou = [2 / 4, 1 / 3, 2 / 4]
    assert scores["per_class_iou"][:3] == pytest.approx(iou)
    assert math.isnan(scores["per_class_iou"][3])
    assert scores["mIoU"] == pytest.approx(sum(iou) / 3)
    assert scores["mAcc"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert scores["aAcc"] == pytest.approx(5 / 8)
    # Accumulating two halves gives the matrix of the whole.
    halves = confusion_matrix(guess[:5], truth[:5], 4) + confusion_matrix(guess[5:], truth[5:], 4)
    assert torch.equal(halves, matrix)


def test_predicted_only_class_counts_with_zero_iou():
    matrix = torch.tensor([[5, 1], [0, 0]])  # class 1 never true, predicted once
    scores = segmentation_scores(matrix)
    assert scores["per_class_iou"] == pytest.approx([5 / 6, 0.0])
    assert scores["mIoU"] == pytest.approx(5 / 12)
    assert scores["mAcc"] == pytest.approx(5 / 6)


def test_slide_equals_whole_when_the_window_covers_the_image():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, kernel_size=3, padding=1)
    images = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        whole = conv(images)
        covering = slide_logits(conv, images, 5, crop=48, stride=32)
        assert torch.allclose(covering[..., :40], whole, atol=1e-6)
        # A per-pixel predictor gives the same logits for any overlap of windows.
        pointwise = torch.nn.Conv2d(3, 5, kernel_size=1)
        tiled = slide_logits(pointwise, images, 5, crop=16, stride=11)
        assert torch.allclose(tiled, pointwise(images), atol=1e-5)
    labels = predict_labels(conv, images, 5, "whole", 48, 32, (24, 20))
    assert labels.shape == (2, 24, 20)
    with pytest.raises(ValueError, match="stride"):
        slide_logits(conv, images, 5, crop=16, stride=17)


TINY_SEGMENTATION = {
    "dataset": "digit_scenes",
    "crop_size": 56,
    "scale": [224, 56],
    "ratio_range": [0.75, 1.5],
    "iterations": 60,
    "batch_size": 8,
    "lr": 2.0e-3,
    "layer_decay": 0.9,
    "warmup_iters": 6,
    "channels": 32,
    "aux_channels": 16,
    "slide_stride": 37,
    "log_every": 10,
    "checkpoint_every": 30,
    "scenes": {"canvas": 56, "train_scenes": 64, "val_scenes": 16, "max_digits": 2},
}


def test_tiny_finetune_lowers_the_loss_and_beats_all_background(tmp_path):
    cfg = load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}"])
    run_dir = pretrain(cfg)
    raw = TINY_SEGMENTATION | {"scenes": TINY_SEGMENTATION["scenes"] | {"folder": str(tmp_path)}}
    results = tmp_path / "results.csv"
    rows = evaluate("segmentation", run_dir, raw, results)
    value = {r["metric"]: r["value"] for r in rows}
    assert value["mIoU"] > value["majority_mIoU"] > 0, value
    saved = (run_dir / "segmentation.json").read_text()
    assert '"last_loss"' in saved
    scores = __import__("json").loads(saved)["scores"]
    assert scores["last_loss"] < 0.8 * scores["first_loss"], scores
    table = read_results(results)
    assert set(table["task"]) == {"segmentation"} and "mIoU" in set(table["metric"])
    assert (run_dir / "segmentation" / "metrics.csv").is_file()
    # The finished fine-tune resumes from its last checkpoint: no training, same predictions.
    again = finetune_segmentation(run_dir, segmentation_settings(raw))
    assert again["mIoU"] == pytest.approx(value["mIoU"], abs=1e-6)
    # Killed after iteration 40 (last checkpoint: 30), then resumed: the very same weights.
    finished = _segmenter_weights(run_dir)
    shutil.rmtree(run_dir / "segmentation")
    with pytest.raises(SimulatedCrash):
        finetune_segmentation(run_dir, segmentation_settings(raw), [crash_after(40)])
    resumed = finetune_segmentation(run_dir, segmentation_settings(raw))
    assert resumed["mIoU"] == again["mIoU"]
    assert all(torch.equal(finished[k], _segmenter_weights(run_dir)[k]) for k in finished)


def _segmenter_weights(run_dir):
    folder = run_dir / "segmentation" / "checkpoints"
    return load_file(str(folder / (folder / "latest").read_text() / "model.safetensors"))


def test_segmentation_settings_are_checked():
    with pytest.raises(ConfigError, match="segmentation.inference"):
        segmentation_settings({"dataset": "digit_scenes", "inference": "tiles"})
    with pytest.raises(ConfigError, match="unknown config key segmentation.crop"):
        segmentation_settings({"crop": 3})
    with pytest.raises(ConfigError, match="segmentation.root is required .*ADE20K_DIR"):
        segmentation_settings({})


def _features(backbone, images):
    backbone.eval()  # no drop path
    with torch.no_grad():
        return backbone.run_blocks(backbone.add_position(backbone.embed_patches(images)))


@pytest.mark.parametrize("own_scale", [None, 0.5])
def test_plain_vit_rebuilt_with_relative_layers_starts_from_the_same_features(own_scale):
    """mmsegmentation's MAE backbone: zero relative tables and layer scale 1.0 per block leave a
    plain ViT's features unchanged (the dropped key bias shifts no attention weight); a layer
    scale the encoder already has is carried as it is."""
    from downstream.relative_layers import add_relative_layers
    from ropim.harness.runtime import build_encoder

    extra = [] if own_scale is None else [f"model.kwargs.init_values={own_scale}"]
    cfg = load_config(TINY_CONFIG, extra)
    torch.manual_seed(0)
    plain = build_encoder(cfg)
    for block in plain.vit.blocks:  # non-zero key biases and scales, so the test can fail
        torch.nn.init.normal_(block.attn.qkv.bias)
    rebuilt, rebuilt_cfg = add_relative_layers(plain, cfg, layer_scale=1.0)
    assert rebuilt.relative_position == "per_layer" and rebuilt_cfg.model.name.startswith("beit")
    block = rebuilt.vit.blocks[0]
    assert torch.count_nonzero(block.attn.relative_position_bias_table) == 0
    assert float(block.gamma_1.detach().mean()) == pytest.approx(own_scale or 1.0)
    images = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(_features(rebuilt, images), _features(plain, images))
    assert cfg.model.name == "vit_tiny_patch16_224"  # the caller's config is left as it was


def test_segmenter_of_a_plain_vit_run_has_per_block_tables_unless_told_not_to(tmp_path):
    from downstream.segmentation.finetune import build_segmenter

    run_dir = pretrain(load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}"]))
    settings = segmentation_settings(TINY_SEGMENTATION)
    model, cfg = build_segmenter(run_dir, settings, 11)
    encoder = model.encoder
    assert encoder.relative_position == "per_layer" and cfg.model.name.startswith("beit")
    assert encoder.vit.pos_embed.shape[1] == 1 + (56 // 7) ** 2  # resized to the crop
    decayed = {n for n, p in model.named_parameters() if n not in model.no_weight_decay()}
    assert any(n.endswith("relative_position_bias_table") for n in decayed)
    plain, _ = build_segmenter(
        run_dir, segmentation_settings(TINY_SEGMENTATION | {"relative_position": "none"}), 11
    )
    assert plain.encoder.relative_position is None
    whole = segmentation_settings(TINY_SEGMENTATION | {"inference": "whole"})
    with pytest.raises(ConfigError, match="relative_position=none"):
        build_segmenter(run_dir, whole, 11)


def test_a_vit_beit_layers_cannot_hold_is_refused_in_one_line():
    from downstream.relative_layers import add_relative_layers
    from ropim.harness.runtime import build_encoder

    cfg = load_config(TINY_CONFIG, ["model.kwargs.reg_tokens=2"])
    with pytest.raises(ConfigError, match="relative_position: none"):
        add_relative_layers(build_encoder(cfg), cfg, 1.0)
    with pytest.raises(ConfigError, match="segmentation.relative_position='global'"):
        segmentation_settings(TINY_SEGMENTATION | {"relative_position": "global"})


def test_mmsegmentation_loss_padding_and_weight_decay():
    """mmsegmentation 0.x: the loss is a mean over all pixels (ignored ones count 0,
    avg_non_ignore=False); images are normalised, then padded with 0 (labels 255); the
    layer-decay constructor decays pos_embed and cls_token (it compares unprefixed names)."""
    from downstream.segmentation.finetune import segmentation_optimizer
    from downstream.segmentation.model import UperNetSegmenter, segmentation_loss
    from downstream.segmentation.settings import SegmentationSettings
    from downstream.segmentation.transforms import TrainAugment

    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [IGNORE_INDEX, IGNORE_INDEX]]])
    kept = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    assert segmentation_loss({"logits": logits}, labels, 0.4).item() == pytest.approx(
        kept.item() / 2
    )

    augment = TrainAugment(32, [16, 16], [1.0, 1.0], 1.0, 0.0, False, [0.5] * 3, [0.25] * 3, 3)
    image = torch.full((3, 16, 16), 0.5 * 255)
    out, label = augment(image, torch.zeros(16, 16, dtype=torch.long), torch.Generator())
    assert out.shape == (3, 32, 32) and out.abs().max() < 1e-5  # mean colour and zero padding
    assert (label[16:] == IGNORE_INDEX).all() and (label[:16, :16] == 0).all()

    model = UperNetSegmenter(ViTPyramid(tiny_backbone(), [1]), 3, channels=16, aux_channels=8)
    optimizer = segmentation_optimizer(model, SegmentationSettings())
    decay_of = {
        id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]
    }
    vit = model.pyramid.backbone.vit
    assert decay_of[id(vit.pos_embed)] == decay_of[id(vit.cls_token)] == 0.05
    assert decay_of[id(vit.blocks[0].norm1.weight)] == 0.0
