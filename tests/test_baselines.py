"""MAE and SimMIM: who sees what, which pixels count, and that each method can learn."""

import json
import math
from pathlib import Path

import pytest
import torch

from ropim.harness.backbone import ViTBackbone
from ropim.harness.config import TrainSection, load_config
from ropim.harness.errors import ConfigError
from ropim.harness.patches import patchify
from ropim.harness.pretrain import pretrain
from ropim.harness.registry import available_methods, build_method
from tests.conftest import PROJECT_ROOT, TINY_CONFIG, tiny_backbone


def _mae(**kw):
    settings = {"name": "mae", "decoder_depth": 1, "decoder_dim": 16, "decoder_heads": 2} | kw
    return build_method(settings, tiny_backbone(img_size=56, patch_size=4))  # 196 tokens


def test_mae_keeps_exactly_a_quarter_of_tokens_different_per_image():
    method = _mae()
    tokens = torch.randn(6, 196, 32)
    _, mask = method.prepare(tokens, torch.Generator().manual_seed(0))
    assert mask.keep.shape == (6, 49)
    assert torch.all(mask.masked.sum(1) == 147)
    assert torch.all((1 - mask.masked).gather(1, mask.keep) == 1)
    assert len({tuple(row.tolist()) for row in mask.keep}) == 6


def test_mae_encoder_sees_only_the_visible_tokens(monkeypatch):
    method = _mae()
    images = torch.randn(3, 3, 56, 56)
    seen = {}
    run_blocks = method.backbone.run_blocks

    def spy(sequence):
        seen["input"] = sequence
        return run_blocks(sequence)

    monkeypatch.setattr(method.backbone, "run_blocks", spy)
    out = method.compute(images, torch.Generator().manual_seed(1))
    assert seen["input"].shape == (3, 1 + 49, 32)
    positioned = method.backbone.add_position(method.backbone.embed_patches(images))[:, 1:]
    expected = positioned.gather(1, out.state.keep.unsqueeze(-1).expand(-1, -1, 32))
    torch.testing.assert_close(seen["input"][:, 1:], expected)
    assert out.prediction.shape == (3, 196, 48)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_loss_ignores_visible_patches(norm_pix_loss):
    method = _mae(norm_pix_loss=norm_pix_loss)
    images = torch.randn(2, 3, 56, 56)
    out = method.compute(images, torch.Generator().manual_seed(2))
    target = patchify(images, 4)
    changed = out.prediction.detach().clone()
    visible = out.state.masked == 0
    changed[visible] += 100.0
    torch.testing.assert_close(method.loss(changed, target, out.state), out.loss.detach())
    changed[~visible] += 1.0
    assert not torch.allclose(method.loss(changed, target, out.state), out.loss.detach())


def test_simmim_masks_the_configured_share_in_whole_32px_blocks():
    method = build_method({"name": "simmim"}, tiny_backbone(img_size=224, patch_size=16))
    tokens = torch.randn(4, 196, 32)
    masked_tokens, hidden = method.prepare(tokens, torch.Generator().manual_seed(0))
    assert torch.all(hidden.sum(1) == 30 * 4)  # ceil(0.6 * 49) blocks of 2x2 tokens
    blocks = hidden.view(4, 7, 2, 7, 2)
    assert torch.all(blocks.amax((2, 4)) == blocks.amin((2, 4)))  # blocks are all-or-nothing
    assert len({tuple(row.tolist()) for row in hidden}) == 4
    mask_token = method.mask_token.expand(4, 196, 32)
    torch.testing.assert_close(masked_tokens[hidden == 1], mask_token[hidden == 1])
    torch.testing.assert_close(masked_tokens[hidden == 0], tokens[hidden == 0])


def test_simmim_loss_ignores_unmasked_pixels():
    method = build_method({"name": "simmim", "mask_patch_size": 14}, tiny_backbone())
    images = torch.randn(2, 3, 28, 28)
    out = method.compute(images, torch.Generator().manual_seed(3))
    target = patchify(images, 7)
    changed = out.prediction.detach().clone()
    changed[out.state == 0] -= 50.0
    torch.testing.assert_close(method.loss(changed, target, out.state), out.loss.detach())
    expected = (out.prediction - target).abs()[out.state == 1].mean()
    torch.testing.assert_close(out.loss, expected)


def test_simmim_block_size_must_be_a_multiple_of_the_patch_size():
    with pytest.raises(ConfigError, match="mask_patch_size=10 must be a multiple"):
        build_method({"name": "simmim", "mask_patch_size": 10}, tiny_backbone())
    with pytest.raises(ConfigError, match="mask_ratio"):
        build_method({"name": "mae", "mask_ratio": 1.0}, tiny_backbone())


def _readme_example_method() -> str:
    """The example in docs/methods.md, verbatim."""
    from tests.conftest import PROJECT_ROOT

    readme = (PROJECT_ROOT / "docs" / "methods.md").read_text()
    section = readme
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_a_method_file_in_a_folder_plugs_in_by_name(tmp_path):
    folder = tmp_path / "my_methods"
    folder.mkdir()
    (folder / "zerohalf.py").write_text(_readme_example_method())
    assert "zerohalf" in available_methods([folder])
    cfg = load_config(
        TINY_CONFIG,
        [f"run.output_dir={tmp_path}", "method={name: zerohalf, share: 0.3}", "train.epochs=0.5"],
    )
    run_dir = pretrain(cfg, method_dirs=(folder,))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["method"] == {"name": "zerohalf", "share": 0.3}
    assert record["recipe"]["lr_batch_divisor"] == 256 and record["steps"] == 4
    assert record["optim"]["lr"] == 1e-3 * 32 / 256
    assert (run_dir / "reconstructions.png").is_file()


def test_baselines_are_discovered():
    assert {"ropim", "mae", "simmim"} <= set(available_methods())


COMPARE_CONFIG = """
compare:
  name: cmp
  seeds: [0, 1]
  methods:
    ropim: {method: {ratio: 0.25}}
    mae: {method: {decoder_depth: 1, decoder_dim: 16, decoder_heads: 2}, train: {base_lr: 1.0e-3}}
    simmim: {method: {mask_patch_size: 14}}
model: {name: vit_tiny_patch16_224, img_size: 28, patch_size: 7,
        kwargs: {depth: 2, embed_dim: 32, num_heads: 2}}
data: {dataset: mnist, limit: 128}
train: {epochs: 0.5, batch_size: 32, log_every: 1, checkpoint_every: 10}
"""


def _compare_file(tmp_path, text=COMPARE_CONFIG):
    path = tmp_path / "cmp.yaml"
    path.write_text(text + f"run: {{output_dir: {tmp_path}}}\n")
    return path


def test_compare_runs_every_method_and_seed_under_one_budget(tmp_path):
    from ropim.suite.compare import check_run_dirs, plan_comparison, run_comparison, summarize

    planned = plan_comparison(_compare_file(tmp_path), methods=["ropim", "mae", "simmim"])
    assert [p.label for p in planned] == [
        "ropim_seed0",
        "ropim_seed1",
        "mae_seed0",
        "mae_seed1",
        "simmim_seed0",
        "simmim_seed1",
    ]
    run_dirs = run_comparison(planned)
    assert all(
        (d / "run.json").is_file() and (d / "reconstructions.png").is_file() for d in run_dirs
    )
    check_run_dirs(run_dirs)
    records = {d.name: json.loads((d / "run.json").read_text()) for d in run_dirs}
    assert records["mae_seed0"]["recipe"]["lr_batch_divisor"] == 256
    assert records["mae_seed0"]["optim"]["lr"] == pytest.approx(1e-3 * 32 / 256)
    assert records["simmim_seed1"]["optim"]["clip_grad"] == 5.0
    assert records["simmim_seed1"]["optim"]["betas"] == [0.9, 0.999]
    assert {r["steps"] for r in records.values()} == {2}
    table = summarize(run_dirs)
    assert "mae_seed1" in table and "epochs" in table
    # A second call skips finished runs instead of training again.
    again = run_comparison(planned)
    assert again == run_dirs


def test_comparison_with_mismatched_budget_is_refused(tmp_path):
    from ropim.suite.compare import check_budget_parity, check_run_dirs, plan_comparison

    bad = COMPARE_CONFIG.replace("train: {base_lr: 1.0e-3}", "train: {batch_size: 16}")
    with pytest.raises(ConfigError, match="train.batch_size is part of the shared budget"):
        plan_comparison(_compare_file(tmp_path, bad))
    planned = plan_comparison(_compare_file(tmp_path))
    configs = {p.label: p.config for p in planned}
    configs["simmim_seed1"].data.hflip = 0.0
    with pytest.raises(ConfigError, match=r"data.hflip is 0.5 vs. 0.0"):
        check_budget_parity(configs)
    configs["simmim_seed1"].data.hflip = 0.5
    configs["simmim_seed1"].data.crop_scale = [0.2, 1.0]  # a recipe's own: not budget
    check_budget_parity(configs)
    configs["mae_seed0"].train.epochs = 1.0
    with pytest.raises(ConfigError, match="'ropim_seed0' and 'mae_seed0' .*train.epochs"):
        check_budget_parity(configs)
    # Finished run folders are checked the same way, from their saved configs.
    from ropim.harness.config import save_config

    for label, cfg in configs.items():
        (tmp_path / label).mkdir()
        save_config(cfg, tmp_path / label / "config.yaml")
    with pytest.raises(ConfigError, match="train.epochs is 0.5 vs. 1.0"):
        check_run_dirs([tmp_path / label for label in configs])


def test_time_budget_stops_training_and_records_epochs_reached(tmp_path):
    cfg = load_config(
        TINY_CONFIG,
        [f"run.output_dir={tmp_path}", "train.epochs=1000", "train.time_budget_s=3"],
    )
    run_dir = pretrain(cfg)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["budget"] == {
        "kind": "seconds",
        "epochs": 1000.0,
        "flops_budget": None,
        "time_budget_s": 3.0,
        "stopped_by": "time_budget",
    }
    assert record["train_time_s"] >= 3.0  # it stopped because the budget was used up
    assert 0 < record["epochs_completed"] < 1000
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert latest == f"step_{record['steps']:08d}"


def test_each_method_pretrains_with_its_own_recipe_unless_forced_shared(tmp_path):
    from ropim.harness.pretrain import fill_from_recipe
    from ropim.harness.registry import method_class
    from ropim.suite.compare import plan_comparison

    planned = plan_comparison(_compare_file(tmp_path))
    for run in planned:
        fill_from_recipe(run.config, method_class(run.method).recipe)
    scales = {
        p.method: (p.config.data.crop_scale, p.config.data.interpolation, p.config.model.drop_path)
        for p in planned
    }
    assert scales == {
        "ropim": ([0.67, 1.0], "bilinear", 0.1),
        "mae": ([0.2, 1.0], "bicubic", 0.0),
        "simmim": ([0.67, 1.0], "bilinear", 0.1),
    }

    shared = COMPARE_CONFIG.replace("data: {", "data: {crop_scale: [0.5, 1.0], ")
    with pytest.raises(ConfigError, match=r"data.crop_scale=\[0.5, 1.0\].*force_shared"):
        plan_comparison(_compare_file(tmp_path, shared))
    forced = shared.replace("  name: cmp", "  name: cmp\n  force_shared: [data.crop_scale]")
    planned = plan_comparison(_compare_file(tmp_path, forced))
    for run in planned:
        fill_from_recipe(run.config, method_class(run.method).recipe)
    assert {tuple(p.config.data.crop_scale) for p in planned} == {(0.5, 1.0)}
    unset = COMPARE_CONFIG.replace("  name: cmp", "  name: cmp\n  force_shared: [model.drop_path]")
    with pytest.raises(ConfigError, match="force_shared lists model.drop_path; set its shared"):
        plan_comparison(_compare_file(tmp_path, unset))


def test_recipe_schedules_clipping_and_min_lr_resolve_per_method():
    from ropim.harness.config import TrainSection
    from ropim.harness.optim import pretrain_scheduler, resolve
    from ropim.harness.registry import method_class

    ropim = resolve(TrainSection(batch_size=256), method_class("ropim").recipe, world_size=2)
    assert ropim.clip_grad == 5.0 and ropim.schedule == "cosine"
    assert ropim.min_lr == pytest.approx(5e-6)  # 5e-6 per 512 images, 512 in total
    simmim = resolve(TrainSection(batch_size=64), method_class("simmim").recipe, world_size=1)
    assert simmim.schedule == "multistep" and simmim.decay_at == (0.875,)
    mae = resolve(TrainSection(clip_grad=1.0, min_lr=1e-5), method_class("mae").recipe, 1)
    assert mae.clip_grad == 1.0 and mae.min_lr == 1e-5  # the config wins

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=simmim.lr)
    scheduler = pretrain_scheduler(optimizer, simmim, total_steps=80, warmup_steps=10)
    lrs = []
    for step in range(80):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[5] < lrs[10] == pytest.approx(simmim.lr)  # warmup, then the full rate
    assert lrs[69] == pytest.approx(simmim.lr) and lrs[70] == pytest.approx(0.1 * simmim.lr)


def test_published_recipe_mode_lets_each_method_keep_its_own_budget(tmp_path):
    from ropim.suite.compare import plan_comparison

    planned = {p.method: p.config for p in plan_comparison("configs/table2_published.yaml")}
    epochs = {name: planned[name].train.epochs for name in ("ropim", "mae", "simmim")}
    assert epochs == {"ropim": 300, "mae": 1600, "simmim": 800}  # MAE's released checkpoints
    inits = {name: planned[name].model.init for name in ("ropim", "mae", "simmim")}
    assert inits == {"ropim": "simmim", "mae": "mae", "simmim": "simmim"}
    assert planned["mae"].train.batch_size == 512 and planned["simmim"].train.batch_size == 256
    assert planned["ropim"].model.name.startswith("beit")
    assert planned["ropim"].model.kwargs["use_shared_rel_pos_bias"] is True
    assert planned["mae"].model.name.startswith("vit")
    own_model = COMPARE_CONFIG.replace(
        "ropim: {method: {ratio: 0.25}}", "ropim: {method: {ratio: 0.25}, model: {patch_size: 4}}"
    )
    with pytest.raises(ConfigError, match="published_recipe also allows its own 'model'"):
        plan_comparison(_compare_file(tmp_path, own_model))
    published = own_model.replace("  name: cmp", "  name: cmp\n  mode: published_recipe")
    assert {
        p.config.model.patch_size for p in plan_comparison(_compare_file(tmp_path, published))
    } == {4, 7}


COMPARISON_PRESETS = sorted(
    str(p)
    for p in (PROJECT_ROOT / "configs").glob("*.yaml")
    if "\ncompare:" in f"\n{p.read_text()}"
)


def test_no_two_comparison_presets_write_the_same_report():
    """A sibling preset inherits its base's compare.scale, which names the report: one that
    kept it overwrote reports/table2_smoke.md."""
    from ropim.harness.config import read_yaml

    names = {}
    for preset in COMPARISON_PRESETS:
        section = read_yaml(preset)["compare"]
        names.setdefault(section.get("scale") or Path(preset).stem, []).append(preset)
    assert [group for group in names.values() if len(group) > 1] == []


@pytest.mark.parametrize("preset", COMPARISON_PRESETS, ids=lambda p: p.rsplit("/", 1)[-1])
def test_every_comparison_preset_builds_each_of_its_methods(preset):
    """A preset's method settings must fit its model (SimMIM's blocks must tile the grid...):
    caught here, not an hour into `make reproduce-table2`."""
    from ropim.harness.pretrain import fill_from_recipe
    from ropim.harness.registry import method_class
    from ropim.harness.runtime import build_encoder
    from ropim.suite.compare import plan_comparison

    for run in plan_comparison(preset):  # the preset's own depth: data2vec's top_k needs it
        if run.pretrained:
            fill_from_recipe(run.config, method_class(run.method).recipe)
            build_method(run.config.method, build_encoder(run.config))


@pytest.mark.parametrize("backbone_name", ["vit_tiny_patch16_224", "beit_base_patch16_224"])
def test_each_method_exempts_from_weight_decay_what_its_official_optimiser_does(backbone_name):
    """MAE's ``add_weight_decay`` gets no skip list: every ≥2-D parameter is decayed. ROPIM's
    and SimMIM's ``optimizer.py`` skip 1-D parameters, biases and the encoder's
    ``no_weight_decay`` = {pos_embed, cls_token}: SimMIM's ViT mask token and the shared
    relative position table are decayed (timm's Beit would exempt the table)."""
    from ropim.harness.optim import build_optimizer, resolve

    beit = backbone_name.startswith("beit")
    extra = {"use_abs_pos_emb": False, "use_shared_rel_pos_bias": True} if beit else {}

    def undecayed(name):
        torch.manual_seed(0)
        backbone = ViTBackbone(backbone_name, 28, 7, depth=1, embed_dim=32, num_heads=2, **extra)
        settings = {
            "mae": {"decoder_depth": 1, "decoder_dim": 32, "decoder_heads": 2},
            "simmim": {"mask_patch_size": 14},
        }
        method = build_method({"name": name, **settings.get(name, {})}, backbone)
        optimizer = build_optimizer(method, resolve(TrainSection(), method.recipe, 1))
        free = {
            id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]
        }
        decayed = {n for n, p in method.named_parameters() if id(p) not in free}
        if beit:
            assert "backbone.vit.rel_pos_bias.relative_position_bias_table" in decayed
        if name == "simmim":
            assert "mask_token" in decayed
        return {n for n, p in method.named_parameters() if id(p) in free and p.ndim > 1}

    tokens = {"backbone.vit.cls_token"} | (set() if beit else {"backbone.vit.pos_embed"})
    if not beit:
        assert undecayed("mae") == set()  # cls token, mask token, positions: all decayed
    assert undecayed("ropim") == tokens
    assert undecayed("simmim") == tokens


def test_mae_decoder_is_initialised_as_models_mae():
    """xavier-uniform on every decoder Linear with zero biases, LayerNorm eps 1e-6
    (facebookresearch/mae models_mae.py:57,83-90,227)."""

    method = _mae(decoder_depth=2, decoder_dim=32, decoder_heads=2)
    linears = [m for m in method.decoder_blocks.modules() if isinstance(m, torch.nn.Linear)]
    for layer in [method.decoder_embed, method.decoder_pred, *linears]:
        bound = math.sqrt(6 / (layer.in_features + layer.out_features))
        assert 0.8 * bound < layer.weight.abs().max() <= bound
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    norms = [m for m in method.modules() if isinstance(m, torch.nn.LayerNorm)]
    decoder_norms = [m for m in method.decoder_blocks.modules() if m in norms]
    assert method.decoder_norm.eps == 1e-6 and all(n.eps == 1e-6 for n in decoder_norms)


def test_ropim_warms_up_from_its_warmup_lr_under_a_cosine_over_all_steps():
    """ROPIM lr_scheduler.py:22-31: timm's cosine with t_initial = all steps and warmup from
    WARMUP_LR × batch / 512; MAE's lr_sched.py: from 0, the cosine after warmup."""
    from ropim.harness.optim import pretrain_scheduler, resolve
    from ropim.harness.registry import method_class

    def lrs(name: str) -> tuple[list[float], float, float]:
        settings = resolve(TrainSection(batch_size=1024), method_class(name).recipe, 1)
        optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=settings.lr)
        scheduler = pretrain_scheduler(optimizer, settings, total_steps=100, warmup_steps=10)
        found = []
        for step in range(100):
            scheduler.step_update(step)
            found.append(optimizer.param_groups[0]["lr"])
        return found, settings.lr, settings.min_lr

    ropim, lr, min_lr = lrs("ropim")
    assert ropim[0] == pytest.approx(5e-7 * 1024 / 512)
    cosine_at_10 = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * 10 / 100))
    assert ropim[10] == pytest.approx(cosine_at_10) and ropim[10] < lr
    mae, lr, _ = lrs("mae")
    assert mae[0] == 0.0 and mae[10] == pytest.approx(lr)
    simmim, lr, _ = lrs("simmim")
    assert simmim[0] == pytest.approx(5e-7 * 1024 / 512) and simmim[10] == pytest.approx(lr)
