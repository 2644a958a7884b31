"""Detection: digit scenes as COCO, reader errors, COCOeval, LSJ, the ViTDet pyramid, Mask R-CNN."""

from __future__ import annotations

import json

import pytest
import torch

from downstream.detection.coco_eval import coco_evaluate, merge_rank_predictions
from downstream.detection.dataset import CocoInstances, load_coco
from downstream.detection.model import SimpleFeaturePyramid, ViTDetMaskRCNN
from downstream.detection.settings import detection_settings
from downstream.detection.transforms import LargeScaleJitter
from downstream.scenes import SceneSpec, compose_scene, scene_digits, write_coco_scenes
from ropim.harness.config import load_config
from ropim.harness.errors import ConfigError, DataError
from ropim.harness.pretrain import pretrain
from tests.conftest import TINY_CONFIG, evaluate, tiny_backbone

SMALL = SceneSpec(canvas=48, train_scenes=6, val_scenes=4, max_digits=3)


def test_generated_annotations_load_and_score_ap_one_as_predictions(tmp_path):
    root = write_coco_scenes(tmp_path, SMALL)
    coco = load_coco(root / "annotations" / "instances_val.json")
    assert len(coco.imgs) == 4 and len(coco.cats) == 10
    digits = scene_digits("val")
    for image_id in coco.imgs:
        scene = compose_scene(SMALL, digits, "val", image_id - 1)
        anns = coco.imgToAnns[image_id]
        assert [a["category_id"] - 1 for a in anns] == [i.digit for i in scene.instances]
        for ann, instance in zip(anns, scene.instances, strict=True):
            assert (coco.annToMask(ann) == instance.mask).all()
            assert ann["area"] == instance.mask.sum()
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "segmentation": a["segmentation"],
            "score": 1.0,
        }
        for a in coco.dataset["annotations"]
    ]
    scores = coco_evaluate(coco, results, sorted(coco.imgs))
    assert scores["box_AP"] == pytest.approx(1.0) and scores["mask_AP"] == pytest.approx(1.0)
    assert scores["box_AP50"] == pytest.approx(1.0) and scores["mask_AP75"] == pytest.approx(1.0)
    # Shifting every box by half its width halves IoU: AP drops, so the check can fail.
    shifted = [r | {"bbox": [r["bbox"][0] + r["bbox"][2] / 2, *r["bbox"][1:]]} for r in results]
    assert coco_evaluate(coco, shifted, sorted(coco.imgs))["box_AP"] < 0.5
    assert coco_evaluate(coco, [], sorted(coco.imgs))["mask_AP"] == 0.0


def test_reader_targets_and_images_without_annotations(tmp_path):
    root = write_coco_scenes(tmp_path, SMALL)
    path = root / "annotations" / "instances_train.json"
    payload = json.loads(path.read_text())
    payload["annotations"] = [a for a in payload["annotations"] if a["image_id"] != 1]
    crowd = next(a for a in payload["annotations"] if a["image_id"] == 2)
    crowd["iscrowd"] = 1
    path.write_text(json.dumps(payload))
    data = CocoInstances(root, "train")
    image, target = data[0]
    assert image.shape == (3, 48, 48) and target["boxes"].shape == (0, 4)
    assert target["masks"].shape == (0, 48, 48)
    kept = data[1][1]
    all_on_image_2 = [a for a in payload["annotations"] if a["image_id"] == 2]
    assert len(kept["labels"]) == len(all_on_image_2) - 1  # the crowd region is not a target
    assert (kept["labels"] >= 1).all() and (kept["labels"] <= 10).all()
    box = kept["boxes"][0]
    mask = kept["masks"][0].bool()
    ys, xs = mask.nonzero(as_tuple=True)
    assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_malformed_annotations_and_missing_images_are_named(tmp_path):
    root = write_coco_scenes(tmp_path, SMALL)
    path = root / "annotations" / "instances_val.json"
    payload = json.loads(path.read_text())
    bad = payload["annotations"][2]
    bad["bbox"] = [1, 2, 3]
    path.write_text(json.dumps(payload))
    with pytest.raises(DataError, match=f"annotation id {bad['id']} .*malformed bbox"):
        CocoInstances(root, "val")
    bad["bbox"] = [1, 2, 3, 4]
    bad["image_id"] = 999
    path.write_text(json.dumps(payload))
    with pytest.raises(DataError, match=f"annotation id {bad['id']} .*not in 'images'"):
        CocoInstances(root, "val")
    path.write_text("{not json")
    with pytest.raises(DataError, match="cannot read COCO annotations"):
        CocoInstances(root, "val")
    (root / "train" / "scene_train_00000003.jpg").unlink()
    with pytest.raises(DataError, match="missing on disk, e.g. .*scene_train_00000003.jpg"):
        CocoInstances(root, "train")
    with pytest.raises(DataError, match="instances_test.json"):
        CocoInstances(root, "test")


def test_large_scale_jitter_crops_at_most_the_canvas_and_boxes_fit_the_masks(tmp_path):
    """detectron2's LSJ crops (FixedSizeCrop, pad=False): at most 64 px a side, never padded
    here (the model pads after normalising)."""
    data = CocoInstances(write_coco_scenes(tmp_path, SMALL), "train")
    jitter = LargeScaleJitter(64, [0.3, 2.0], 0.5, in_chans=3)
    torch.manual_seed(0)
    seen_fewer = seen_smaller = False
    for index in range(len(data)):
        for _ in range(4):
            image, target = jitter(*data[index])
            assert image.shape[0] == 3 and max(image.shape[1:]) <= 64
            assert image.dtype == torch.float32
            assert target["masks"].shape[1:] == image.shape[1:]
            seen_smaller |= min(image.shape[1:]) < 64
            assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"])
            for box, mask in zip(target["boxes"], target["masks"], strict=True):
                ys, xs = mask.nonzero(as_tuple=True)
                assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            seen_fewer |= len(target["labels"]) < len(data[index][1]["labels"])
    assert seen_fewer, "crops at scale 2 cut some digits away"
    assert seen_smaller, "scale 0.3 gives images smaller than the canvas, left unpadded"


def test_detector_pads_normalised_images_to_the_square_and_regresses_boxes_with_l1():
    """detectron2: normalise, then pad 0 to the square (rcnn.py:228-231); L1 box losses."""
    from downstream.detection.detectron2_io import l1_fastrcnn_loss
    from downstream.detection.model import ViTDetMaskRCNN

    model = ViTDetMaskRCNN(
        tiny_backbone(img_size=64, patch_size=8),
        3,
        64,
        [0.5] * 3,
        [0.25] * 3,
        fpn_channels=16,
        box_head_dim=32,
        mask_head_layers=[16],
        architecture="light",
    )
    transform = model.detector.transform
    transform.train()
    batch, _ = transform([torch.full((3, 40, 24), 0.5)])
    assert batch.tensors.shape == (1, 3, 64, 64) and batch.image_sizes == [(40, 24)]
    assert batch.tensors.abs().sum() == 0  # the mean colour, then zero padding
    transform.eval()
    assert transform([torch.rand(3, 40, 24)])[0].image_sizes == [(64, 38)]  # long side 64
    logits, deltas = torch.randn(4, 3), torch.zeros(4, 12)
    targets = [torch.tensor([[0.01, -0.02, 0.5, 0.0]] * 4)]
    _, loss = l1_fastrcnn_loss(logits, deltas, [torch.tensor([1, 2, 0, 0])], targets)
    assert loss.item() == pytest.approx(2 * 0.53 / 4)  # L1, not smooth-L1 (0.0049...)
    assert type(model.detector.rpn).__name__ == "L1RegionProposalNetwork"


@pytest.mark.parametrize("patch", [4, 8, 16])
@pytest.mark.parametrize("architecture", ["light", "vitdet"])
def test_simple_feature_pyramid_strides(patch, architecture):
    from downstream.detection.vitdet import ViTDetPyramid
    from downstream.pyramid import ViTPyramid

    backbone = tiny_backbone(img_size=64, patch_size=patch)
    if architecture == "vitdet":
        pyramid = ViTDetPyramid(backbone, window=2, global_indices=[1])
    else:
        pyramid = ViTPyramid(backbone, [len(backbone.vit.blocks) - 1])
    sfp = SimpleFeaturePyramid(pyramid, channels=8)
    features = sfp(torch.randn(1, 3, 64, 64))
    assert list(features) == ["0", "1", "2", "3", "pool"]
    expected = [patch / 4, patch / 2, patch, 2 * patch, 4 * patch]
    assert sfp.strides == expected
    for level, stride in zip(features.values(), expected, strict=True):
        assert level.shape == (1, 8, int(64 // stride), int(64 // stride))


def test_detection_refuses_patch_sizes_roi_align_cannot_scale():
    with pytest.raises(ConfigError, match="power-of-two patch size"):
        ViTDetMaskRCNN(tiny_backbone(img_size=28, patch_size=7), 10, 28, [0.5] * 3, [0.5] * 3)


def test_detection_settings_are_checked():
    with pytest.raises(ConfigError, match="detection.root is required .*COCO_DIR"):
        detection_settings({})
    with pytest.raises(ConfigError, match="detection.scale_range"):
        detection_settings({"dataset": "digit_scenes", "scale_range": [2.0, 1.0]})


def test_the_vitdet_schedule_is_detectron2s_184375_iterations_unless_epochs_are_set():
    coco = detection_settings({"root": "/data/coco"})
    total = coco.total_iterations(117_266, 8)
    assert total == 184_375  # mask_rcnn_vitdet_b_100ep.py: train.max_iter
    assert [round(share * total) for share in coco.decay_at] == [163_889, 177_546]  # milestones
    scenes = detection_settings({"dataset": "digit_scenes", "epochs": 2, "batch_size": 8})
    assert scenes.iterations is None and scenes.total_iterations(100, 1) == 25
    with pytest.raises(ConfigError, match="two schedule lengths"):
        detection_settings({"dataset": "digit_scenes", "epochs": 2, "iterations": 10})


def test_rank_predictions_merge_without_duplicates():
    rank0 = [{"image_id": 1, "score": 0.9}, {"image_id": 1, "score": 0.8}, {"image_id": 3}]
    rank1 = [{"image_id": 2, "score": 0.7}, {"image_id": 1, "score": 0.9}]  # 1 padded again
    merged = merge_rank_predictions([rank0, rank1])
    assert sorted(r["image_id"] for r in merged) == [1, 1, 2, 3]
    assert merged[:2] == rank0[:2]


TINY_DETECTION = {
    "dataset": "digit_scenes",
    "image_size": 48,
    "scale_range": [0.8, 1.25],
    "epochs": 16,
    "batch_size": 8,
    "lr": 1.0e-3,
    "warmup_iters": 5,
    "layer_decay": 0.9,
    "fpn_channels": 32,
    "box_head_dim": 64,
    "mask_head_layers": [32],
    "rpn_pre_nms_top_n": [200, 100],
    "rpn_post_nms_top_n": [100, 50],
    "rpn_batch_per_image": 64,
    "roi_batch_per_image": 64,
    "detections_per_image": 10,
    "log_every": 10,
    "checkpoint_every": 40,
    "scenes": {"canvas": 48, "train_scenes": 48, "val_scenes": 8, "max_digits": 2},
}


@pytest.mark.parametrize("architecture", ["light", "vitdet"])
def test_tiny_finetune_lowers_every_loss_and_finds_digits(tmp_path, architecture):
    overrides = [f"run.output_dir={tmp_path}", "model.patch_size=4"]
    run_dir = pretrain(load_config(TINY_CONFIG, overrides))
    raw = TINY_DETECTION | {"scenes": TINY_DETECTION["scenes"] | {"folder": str(tmp_path)}}
    # vitdet: 4x4 windows on the 12x12 grid in block 0, block 1 global; LayerNorm heads.
    raw |= {"architecture": architecture, "window_size": 4, "global_blocks": [1]}
    rows = evaluate("detection", run_dir, raw, tmp_path / "results.csv")
    value = {r["metric"]: r["value"] for r in rows}
    assert value["box_AP"] > 0 and value["mask_AP"] > 0, value
    scores = json.loads((run_dir / "detection.json").read_text())["scores"]
    first, last = scores["first_losses"], scores["last_losses"]
    assert set(first) == {
        "loss",
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss_objectness",
        "loss_rpn_box_reg",
    }
    # torchvision divides the box loss by all sampled RoIs: it starts near zero (the only
    # positives are the ground-truth boxes added as proposals, whose targets are zero), rises
    # as the RPN starts proposing near-misses, and falls later as regression is learned.
    assert all(last[k] < first[k] for k in first if k != "loss_box_reg"), (first, last)
    box_curve = scores["loss_curves"]["loss_box_reg"]
    # At 16 tiny epochs it has risen from that start and has not yet come down reliably (it
    # did for one pre-trained encoder and not for another): only the rise is asserted.
    assert len(box_curve) == 8 and box_curve[0] < 0.5 * max(box_curve), box_curve


def _gather_on_rank(rank: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    from downstream.detection.coco_eval import gather_predictions

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    local = [
        [{"image_id": 1, "score": 0.9}, {"image_id": 3, "score": 0.5}],
        [{"image_id": 2, "score": 0.8}, {"image_id": 1, "score": 0.9}],  # 1 again: padding
    ][rank]
    merged = gather_predictions(local)
    if rank == 0:
        with open(out_file, "w") as handle:
            json.dump(merged, handle)
    dist.destroy_process_group()


def test_predictions_from_two_processes_are_gathered_once(tmp_path):
    out = tmp_path / "merged.json"
    torch.multiprocessing.spawn(
        _gather_on_rank, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True
    )
    merged = json.loads(out.read_text())
    assert sorted(r["image_id"] for r in merged) == [1, 2, 3]


def test_a_frozen_encoder_keeps_its_weights_while_the_heads_train(tmp_path):
    import shutil

    from safetensors.torch import load_file

    from ropim.harness.checkpoint import WEIGHTS_FILE, CheckpointDir

    overrides = [f"run.output_dir={tmp_path}", "model.patch_size=4", "train.epochs=0.3"]
    run_dir = pretrain(load_config(TINY_CONFIG, overrides))
    pretrained = load_file(CheckpointDir(run_dir).latest() / WEIGHTS_FILE)
    raw = TINY_DETECTION | {"scenes": TINY_DETECTION["scenes"] | {"folder": str(tmp_path)}}
    raw |= {"architecture": "light", "epochs": 1}

    def blocks_after(freeze: bool) -> dict[str, torch.Tensor]:
        """The encoder's block weights after a detection fine-tune, by pre-training name."""
        shutil.rmtree(run_dir / "detection", ignore_errors=True)
        (run_dir / "detection.json").unlink(missing_ok=True)
        evaluate("detection", run_dir, raw | {"freeze_encoder": freeze}, tmp_path / "r.csv")
        trained = load_file(CheckpointDir(run_dir / "detection").latest() / WEIGHTS_FILE)
        prefix = "detector.backbone.pyramid.backbone."
        return {
            k[len(prefix) :]: v for k, v in trained.items() if k.startswith(prefix + "vit.blocks.")
        }

    frozen = blocks_after(True)
    assert frozen and all(torch.equal(v, pretrained[f"backbone.{k}"]) for k, v in frozen.items())
    moved = blocks_after(False)  # the check can fail: a full fine-tune moves the blocks
    assert any(not torch.equal(v, pretrained[f"backbone.{k}"]) for k, v in moved.items())
