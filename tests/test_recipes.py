"""The recipe card and the per-method protocol recipes the classification task applies."""

from __future__ import annotations

import csv
import io

import pytest

from downstream.classification.settings import ClassificationSettings, settings_for_method
from ropim.cli import main
from ropim.harness.registry import method_class


def _card(capsys, *args: str) -> list[dict[str, str]]:
    assert main(["recipes", "--format", "csv", *args]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "method,protocol,key,value,source"
    return list(csv.DictReader(io.StringIO(text)))


def _value(rows, method, protocol, key):
    (row,) = [r for r in rows if (r["method"], r["protocol"], r["key"]) == (method, protocol, key)]
    return row["value"], row["source"]


def test_card_lists_every_method_and_protocol_with_a_source_for_each_value(capsys):
    rows = _card(capsys)
    assert {(r["method"], r["protocol"]) for r in rows} >= {
        (m, p)
        for m in ("ropim", "mae", "simmim")
        for p in ("pretrain", "finetune", "linear", "knn", "segmentation", "detection")
    }
    assert all(r["source"] for r in rows)
    assert _value(rows, "ropim", "pretrain", "optim.clip_grad") == (
        "5.0",
        "ROPIM config.py:85, main_ropim.py:156-157",
    )
    assert _value(rows, "mae", "pretrain", "data.crop_scale")[0] == "[0.2, 1.0]"
    assert _value(rows, "simmim", "pretrain", "optim.schedule")[0] == "multistep"
    assert _value(rows, "ropim", "finetune", "layer_decay")[0] == "0.75"
    assert _value(rows, "simmim", "finetune", "base_lr")[0] == "0.00125"
    assert _value(rows, "mae", "linear", "optimizer")[0] == "lars"
    assert "DINO" in _value(rows, "ropim", "knn", "k")[1]


def test_card_resolves_a_preset_whose_values_win(capsys):
    rows = _card(capsys, "--config", "configs/table2_smoke.yaml", "--method", "mae")
    assert {r["method"] for r in rows} == {"mae"}
    assert _value(rows, "mae", "linear", "optimizer") == ("sgd", "config")
    assert _value(rows, "mae", "pretrain", "optim.base_lr") == ("0.0005", "config")
    assert _value(rows, "mae", "pretrain", "data.crop_scale")[0] == "[0.2, 1.0]"  # the recipe's
    assert _value(rows, "mae", "pretrain", "train.epochs") == ("12.0", "config")
    assert _value(rows, "mae", "pretrain", "model.init")[1] == "suite default"


def test_unknown_method_or_protocol_is_one_error_line(capsys):
    assert main(["recipes", "--method", "nosuch"]) == 2
    assert main(["recipes", "--protocol", "segment"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nosuch'" in err and "unknown protocol 'segment'" in err


def test_method_recipe_fills_only_what_the_config_left_unset():
    settings = ClassificationSettings.parse(
        {"finetune": {"base_lr": 1.0e-3, "epochs": 3}}, "classification"
    )
    resolved, sources = settings_for_method(settings, method_class("ropim").protocol_recipes)
    ft = resolved.finetune
    assert (ft.base_lr, ft.epochs) == (1.0e-3, 3)  # the config wins
    assert (ft.layer_decay, ft.clip_grad, ft.lr_batch_divisor) == (0.75, 5.0, 512)  # ROPIM's
    assert sources["finetune"]["base_lr"] == "config"
    assert "ropim_finetune__vit_base.yaml:24" in sources["finetune"]["layer_decay"]
    assert settings.finetune.layer_decay == 0.65  # the parsed settings are left as they were
    floor, _ = settings_for_method(settings, {})  # random init: the adapter's defaults
    assert floor.finetune.layer_decay == 0.65 and floor.finetune.clip_grad is None


@pytest.mark.parametrize("method", ["ropim", "mae", "simmim"])
def test_every_recipe_value_names_a_repository_file(method):
    recipe = method_class(method).recipe
    for key in recipe.values():
        assert (
            ".py" in recipe.source_of(key)
            or ".md" in recipe.source_of(key)
            or ".yaml" in (recipe.source_of(key))
        ), key


# The published values, restated from the official repositories (file, and line where the row
# names one, in each row's last column; docs/recipes.md lists them with links). Every one must
# be what the card resolves with no config (the suite's default batch of 128 on one device, so
# per-512-image rates appear × 128/512), and its source must name that file (and line).
PER_512 = 128 / 512
MMSEG = "upernet_mae-base_fp16_8x2_512x512_160k_ade20k.py"
OFFICIAL = [
    # ROPIM pre-training: csiro-robotics/ROPIM configs/vit_base/ropim_pretrain__vit_base.yaml
    ("ropim", "pretrain", "optim.base_lr", 1.5e-4, "ropim_pretrain__vit_base.yaml"),
    ("ropim", "pretrain", "optim.lr_batch_divisor", 512, "main_ropim.py"),
    ("ropim", "pretrain", "optim.warmup_epochs", 5, "ropim_pretrain__vit_base.yaml"),
    ("ropim", "pretrain", "optim.betas", [0.9, 0.95], "ropim_pretrain__vit_base.yaml"),
    ("ropim", "pretrain", "optim.weight_decay", 0.05, "ropim_pretrain__vit_base.yaml"),
    ("ropim", "pretrain", "optim.clip_grad", 5.0, "config.py"),
    ("ropim", "pretrain", "optim.min_lr", 5e-6 * PER_512, "main_ropim.py"),
    ("ropim", "pretrain", "optim.schedule", "cosine", "lr_scheduler.py"),
    ("ropim", "pretrain", "data.crop_scale", [0.67, 1.0], "data_ropim.py"),
    ("ropim", "pretrain", "data.interpolation", "bilinear", "data_ropim.py"),
    ("ropim", "pretrain", "model.drop_path", 0.1, "ropim_pretrain__vit_base.yaml"),
    ("ropim", "pretrain", "optim.warmup_lr", 5e-7 * PER_512, "ropim_pretrain__vit_base.yaml:21"),
    ("ropim", "pretrain", "optim.warmup_prefix", False, "lr_scheduler.py:22-31"),
    ("ropim", "finetune", "warmup_lr", 2.5e-7, "ropim_finetune__vit_base.yaml:21"),
    ("ropim", "finetune", "warmup_prefix", False, "lr_scheduler.py:22-31"),
    # ROPIM fine-tuning: configs/vit_base/ropim_finetune__vit_base.yaml
    ("ropim", "finetune", "epochs", 100, "ropim_finetune__vit_base.yaml"),
    ("ropim", "finetune", "warmup_epochs", 5, "ropim_finetune__vit_base.yaml"),
    ("ropim", "finetune", "base_lr", 5e-3, "ropim_finetune__vit_base.yaml"),
    ("ropim", "finetune", "lr_batch_divisor", 512, "main_finetune.py"),
    ("ropim", "finetune", "min_lr", 5e-6, "ropim_finetune__vit_base.yaml"),
    ("ropim", "finetune", "layer_decay", 0.75, "ropim_finetune__vit_base.yaml"),
    ("ropim", "finetune", "weight_decay", 0.05, "ropim_finetune__vit_base.yaml"),
    ("ropim", "finetune", "drop_path", 0.1, "ropim_finetune__vit_base.yaml"),
    ("ropim", "finetune", "clip_grad", 5.0, "main_finetune.py"),
    ("ropim", "finetune", "mixup", 0.8, "config.py"),
    ("ropim", "finetune", "cutmix", 1.0, "config.py"),
    ("ropim", "finetune", "label_smoothing", 0.1, "config.py"),
    ("ropim", "finetune", "rand_augment", "rand-m9-mstd0.5-inc1", "config.py"),
    ("ropim", "finetune", "random_erasing", 0.25, "config.py"),
    # MAE: facebookresearch/mae
    ("mae", "pretrain", "optim.base_lr", 1.5e-4, "PRETRAIN.md"),
    ("mae", "pretrain", "optim.lr_batch_divisor", 256, "main_pretrain.py"),
    ("mae", "pretrain", "optim.warmup_epochs", 40, "PRETRAIN.md"),
    ("mae", "pretrain", "optim.betas", [0.9, 0.95], "main_pretrain.py"),
    ("mae", "pretrain", "optim.weight_decay", 0.05, "PRETRAIN.md"),
    ("mae", "pretrain", "optim.clip_grad", None, "engine_pretrain.py"),
    ("mae", "pretrain", "optim.schedule", "cosine", "main_pretrain.py"),
    ("mae", "pretrain", "data.crop_scale", [0.2, 1.0], "main_pretrain.py"),
    ("mae", "pretrain", "data.interpolation", "bicubic", "main_pretrain.py"),
    ("mae", "pretrain", "model.drop_path", 0.0, "models_mae.py"),
    ("mae", "finetune", "epochs", 100, "FINETUNE.md"),
    ("mae", "finetune", "base_lr", 5e-4, "FINETUNE.md"),
    ("mae", "finetune", "lr_batch_divisor", 256, "main_finetune.py"),
    ("mae", "finetune", "warmup_epochs", 5, "FINETUNE.md"),
    ("mae", "finetune", "min_lr", 1e-6, "main_finetune.py"),
    ("mae", "finetune", "layer_decay", 0.65, "FINETUNE.md"),
    ("mae", "finetune", "weight_decay", 0.05, "FINETUNE.md"),
    ("mae", "finetune", "drop_path", 0.1, "FINETUNE.md"),
    ("mae", "finetune", "clip_grad", None, "main_finetune.py"),
    ("mae", "finetune", "mixup", 0.8, "FINETUNE.md"),
    ("mae", "finetune", "cutmix", 1.0, "FINETUNE.md"),
    ("mae", "finetune", "label_smoothing", 0.1, "main_finetune.py"),
    ("mae", "finetune", "random_erasing", 0.25, "main_finetune.py"),
    ("mae", "linear", "optimizer", "lars", "lars.py"),
    ("mae", "linear", "base_lr", 0.1, "main_linprobe.py"),
    ("mae", "linear", "lr_batch_divisor", 256, "main_linprobe.py"),
    ("mae", "linear", "epochs", 90, "main_linprobe.py"),
    ("mae", "linear", "warmup_epochs", 10, "main_linprobe.py"),
    ("mae", "linear", "batch_size", 16384, "main_linprobe.py"),
    ("mae", "linear", "weight_decay", 0.0, "main_linprobe.py"),
    ("mae", "linear", "augment", True, "main_linprobe.py"),
    # SimMIM: microsoft/SimMIM configs/vit_base__800ep/
    ("simmim", "pretrain", "optim.base_lr", 1e-4, "simmim_pretrain__vit_base__img224__800ep.yaml"),
    ("simmim", "pretrain", "optim.lr_batch_divisor", 512, "main_simmim.py"),
    (
        "simmim",
        "pretrain",
        "optim.warmup_epochs",
        10,
        "simmim_pretrain__vit_base__img224__800ep.yaml",
    ),
    (
        "simmim",
        "pretrain",
        "optim.betas",
        [0.9, 0.999],
        "simmim_pretrain__vit_base__img224__800ep.yaml",
    ),
    (
        "simmim",
        "pretrain",
        "optim.weight_decay",
        0.05,
        "simmim_pretrain__vit_base__img224__800ep.yaml",
    ),
    ("simmim", "pretrain", "optim.clip_grad", 5.0, "config.py:102"),
    ("simmim", "pretrain", "optim.warmup_lr", 5e-7 * PER_512, "img224__800ep.yaml:21"),
    (
        "simmim",
        "pretrain",
        "optim.schedule",
        "multistep",
        "simmim_pretrain__vit_base__img224__800ep",
    ),
    (
        "simmim",
        "pretrain",
        "optim.decay_at",
        [0.875],
        "simmim_pretrain__vit_base__img224__800ep.yaml",
    ),
    (
        "simmim",
        "pretrain",
        "optim.decay_rate",
        0.1,
        "simmim_pretrain__vit_base__img224__800ep.yaml",
    ),
    ("simmim", "pretrain", "data.crop_scale", [0.67, 1.0], "data_simmim.py"),
    ("simmim", "pretrain", "data.interpolation", "bilinear", "data_simmim.py"),
    ("simmim", "pretrain", "model.drop_path", 0.1, "simmim_pretrain__vit_base__img224__800ep.yaml"),
    ("simmim", "finetune", "base_lr", 1.25e-3, "simmim_finetune__vit_base__img224__800ep.yaml"),
    ("simmim", "finetune", "lr_batch_divisor", 512, "simmim_finetune__vit_base"),
    ("simmim", "finetune", "warmup_epochs", 20, "simmim_finetune__vit_base__img224__800ep.yaml"),
    ("simmim", "finetune", "layer_decay", 0.65, "simmim_finetune__vit_base__img224__800ep.yaml"),
    ("simmim", "finetune", "min_lr", 2.5e-7, "simmim_finetune__vit_base__img224__800ep.yaml"),
    ("simmim", "finetune", "clip_grad", 5.0, "config.py:102"),
    ("simmim", "finetune", "warmup_lr", 2.5e-7, "simmim_finetune__vit_base__img224__800ep.yaml:19"),
    ("mae", "linear", "momentum", 0.9, "util/lars.py:18"),
    ("mae", "linear", "trust_coeff", 0.001, "util/lars.py:18"),
    ("mae", "linear", "bn_batch", 512, "FINETUNE.md:142,150"),
    # UperNet: open-mmlab/mmsegmentation 0.x configs/mae/ (the same for every method)
    ("ropim", "segmentation", "lr", 1e-4, f"{MMSEG}:29-33"),
    ("ropim", "segmentation", "weight_decay", 0.05, f"{MMSEG}:29-33"),
    ("ropim", "segmentation", "layer_decay", 0.65, f"{MMSEG}:29-33"),
    ("ropim", "segmentation", "iterations", 160_000, f"{MMSEG}:3"),
    ("ropim", "segmentation", "batch_size", 2, f"{MMSEG}:48-49"),
    ("ropim", "segmentation", "warmup_iters", 1500, f"{MMSEG}:35-43"),
    ("ropim", "segmentation", "layer_scale", 1.0, f"{MMSEG}:17 "),
    ("ropim", "segmentation", "drop_path", 0.1, f"{MMSEG}:18"),
    ("ropim", "segmentation", "aux_weight", 0.4, "upernet_mae.py:48-49"),
    ("ropim", "segmentation", "slide_stride", 341, f"{MMSEG}:24"),
    # ViTDet: facebookresearch/detectron2 projects/ViTDet/configs
    ("mae", "detection", "lr", 1e-4, "common/optim.py:18-28"),
    ("mae", "detection", "weight_decay", 0.1, "common/optim.py:18-28"),
    ("mae", "detection", "layer_decay", 0.7, "modeling/backbone/vit.py:506-524"),
    ("mae", "detection", "decay_biases", True, "solver/build.py:148"),
    ("mae", "detection", "warmup_iters", 250, "mask_rcnn_vitdet_b_100ep.py:25-35"),
    ("mae", "detection", "decay_at", [8 / 9, 26 / 27], "mask_rcnn_vitdet_b_100ep.py:25-35"),
    ("mae", "detection", "iterations", 184375, "mask_rcnn_vitdet_b_100ep.py:25-35"),
    ("mae", "detection", "image_size", 1024, "coco_loader_lsj.py:6-22"),
    ("mae", "detection", "scale_range", [0.1, 2.0], "coco_loader_lsj.py:6-22"),
    ("mae", "detection", "window_size", 14, "mask_rcnn_vitdet.py:25"),
    ("mae", "detection", "drop_path", 0.1, "mask_rcnn_vitdet.py:15"),
    ("mae", "detection", "box_loss", "l1", "rpn.py:204"),
]


def test_card_resolves_every_official_value_with_its_source(capsys):
    import yaml

    rows = _card(capsys)
    wrong = []
    for method, protocol, key, expected, file in OFFICIAL:
        value, source = _value(rows, method, protocol, key)
        resolved = yaml.safe_load(value)
        if isinstance(expected, float) and isinstance(resolved, str):
            resolved = float(resolved)  # YAML 1.1 reads 5e-06 as a string
        if resolved != expected or file not in source:
            wrong.append(f"{method}/{protocol}/{key}: {value} from {source!r}")
    assert not wrong, wrong


def test_published_preset_card_holds_init_epochs_references_and_dense_tasks(capsys):
    rows = _card(capsys, "--config", "configs/table2_published.yaml")
    protocols = {r["protocol"] for r in rows}
    assert {"segmentation", "detection"} <= protocols
    for method in ("ropim", "simmim"):
        assert _value(rows, method, "pretrain", "model.init")[0] == "simmim"
        assert "±1σ" in _value(rows, method, "pretrain", "encoder.init_rule")[0]
        assert _value(rows, method, "pretrain", "encoder.relative_position")[0] == "shared"
        assert _value(rows, method, "pretrain", "encoder.layer_scale")[0] == "0.1"
        assert _value(rows, method, "pretrain", "encoder.absolute_position")[0] == "False"
    assert "xavier" in _value(rows, "mae", "pretrain", "encoder.init_rule")[0]
    decoder, source = _value(rows, "mae", "pretrain", "method.decoder_init")
    assert "xavier" in decoder and "models_mae.py:57,83-90,227" in source
    assert _value(rows, "mae", "pretrain", "train.epochs")[0] == "1600.0"
    detail = _value(rows, "simmim", "linear", "reference.protocol")[0]
    assert "block 8" in detail and "average-pooled" in detail
    assert _value(rows, "mae", "detection", "box_loss")[0] == "l1"
    assert _value(rows, "mae", "linear", "momentum")[0] == "0.9"
    iterations, source = _value(rows, "mae", "detection", "iterations")
    assert iterations == "184375" and "mask_rcnn_vitdet_b_100ep.py:25-35" in source
    for method in ("ropim", "mae", "simmim"):  # decoded as the official pipelines decode
        decode, source = _value(rows, method, "pretrain", "data.decode")
        assert decode == "full" and "main_pretrain.py:124" in source
    # The lr totals follow the devices asked for: ROPIM's 128 per device on 8 devices.
    eight = _card(capsys, "--config", "configs/table2_published.yaml", "--devices", "8")
    assert float(_value(eight, "ropim", "pretrain", "optim.lr")[0]) == pytest.approx(
        1.5e-4 * 1024 / 512
    )


def test_each_methods_fine_tune_optimiser_uses_its_own_layer_decay_and_floor():
    from timm.models import VisionTransformer

    from downstream.classification.finetune import finetune_optimizer

    model = VisionTransformer(
        img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2, num_classes=3
    )
    settings = ClassificationSettings.parse({}, "classification")
    scales, floors = {}, {}
    for method in ("ropim", "mae", "simmim"):
        resolved, _ = settings_for_method(settings, method_class(method).protocol_recipes)
        optimizer, floors[method] = finetune_optimizer(model, resolved.finetune, 1024)
        scales[method] = sorted({g["lr_scale"] for g in optimizer.param_groups})
    # stem, 2 blocks, head: 4 layer groups, scaled decay^3 ... decay^0
    assert scales["ropim"] == pytest.approx([0.75**k for k in (3, 2, 1, 0)])
    assert scales["mae"] == scales["simmim"] == pytest.approx([0.65**k for k in (3, 2, 1, 0)])
    assert floors["ropim"] == pytest.approx(5e-6 * 1024 / 512)  # per 512 images
    assert floors["simmim"] == pytest.approx(2.5e-7 * 1024 / 512)
    assert floors["mae"] == 1e-6  # absolute
