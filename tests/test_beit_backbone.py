"""The backbones beyond timm's plain ViT. BEiT-style (timm ``Beit``): no absolute positions, a
shared relative position bias, layer scale; pre-training through the same method interface, and
fine-tuning with the shared table copied into every block as BEiT/ROPIM do. MAE-style: a fixed
2-D sin-cos position embedding and xavier initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from downstream.encoder import dense_encoder, load_pretrained_encoder
from ropim.harness.backbone import ViTBackbone
from ropim.harness.config import load_config
from ropim.harness.errors import ConfigError
from ropim.harness.pretrain import pretrain
from ropim.harness.registry import build_method
from tests.conftest import TINY_CONFIG

BEIT = {
    "depth": 2,
    "embed_dim": 32,
    "num_heads": 2,
    "use_abs_pos_emb": False,
    "use_shared_rel_pos_bias": True,
    "use_rel_pos_bias": False,
    "init_values": 0.1,
}
BEIT_OVERRIDES = [
    "model.name=beit_base_patch16_224",
    "model.kwargs={depth: 2, embed_dim: 32, num_heads: 2, use_abs_pos_emb: false, "
    "use_shared_rel_pos_bias: true, init_values: 0.1}",
]


def _beit() -> ViTBackbone:
    torch.manual_seed(0)
    return ViTBackbone("beit_base_patch16_224", 28, 7, **BEIT)


def test_beit_backbone_has_a_shared_bias_and_no_absolute_positions():
    backbone = _beit()
    assert backbone.relative_position == "shared" and backbone.vit.pos_embed is None
    assert backbone.num_tokens == 16 and backbone(torch.randn(2, 3, 28, 28)).shape == (2, 16, 32)
    assert float(backbone.vit.blocks[0].gamma_1.detach().mean()) == pytest.approx(0.1)  # scale
    plain = ViTBackbone("vit_tiny_patch16_224", 28, 7, depth=2, embed_dim=32, num_heads=2)
    assert plain.relative_position is None


def test_beit_backbone_computes_what_timms_beit_computes():
    backbone = _beit()
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ours = backbone.run_blocks(backbone.add_position(backbone.embed_patches(images)))
        torch.testing.assert_close(ours, backbone.vit.forward_features(images))


@pytest.mark.parametrize("settings", [{"name": "ropim"}, {"name": "simmim", "mask_patch_size": 14}])
def test_ropim_and_simmim_train_a_beit_backbone(settings):
    method = build_method(settings, _beit())
    loss = method(torch.randn(4, 3, 28, 28), torch.Generator().manual_seed(0))
    loss.backward()
    table = method.backbone.vit.rel_pos_bias.relative_position_bias_table
    assert torch.isfinite(loss) and table.grad is not None and table.grad.abs().sum() > 0


def test_mae_refuses_a_backbone_with_relative_position_bias():
    with pytest.raises(ConfigError, match="mae drops 75% of the tokens"):
        build_method({"name": "mae"}, _beit())


def test_fine_tuning_unties_the_shared_table_into_equal_per_block_copies(tmp_path):
    cfg = load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", *BEIT_OVERRIDES])
    run_dir = pretrain(cfg)
    shared, _ = load_pretrained_encoder(run_dir)
    untied, untied_cfg = load_pretrained_encoder(run_dir, per_layer_bias=True)
    assert shared.relative_position == "shared" and untied.relative_position == "per_layer"
    table = shared.vit.rel_pos_bias.relative_position_bias_table
    for block in untied.vit.blocks:
        assert torch.equal(block.attn.relative_position_bias_table, table)
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(untied.eval()(images), shared.eval()(images))
    with pytest.raises(ConfigError, match="use a 'vit_\\*' backbone for detection"):
        dense_encoder(untied, untied_cfg, 56)


def test_fine_tuning_decays_the_per_block_tables_as_the_papers_optimiser_does(tmp_path):
    """ROPIM's and SimMIM's ``build_finetune_optimizer`` exempt 1-D parameters, biases,
    ``pos_embed`` and ``cls_token``: the per-block relative tables are decayed, although timm's
    ``Beit.no_weight_decay`` would exempt them."""
    from downstream.classification.finetune import finetune_optimizer
    from downstream.classification.settings import ClassificationSettings

    cfg = load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", *BEIT_OVERRIDES])
    untied, _ = load_pretrained_encoder(pretrain(cfg), per_layer_bias=True)
    ft = ClassificationSettings.parse({}, "classification").finetune
    optimizer, _ = finetune_optimizer(untied.vit, ft, 8, untied.vit_no_weight_decay())
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    vit = untied.vit
    assert all(
        decay[id(b.attn.relative_position_bias_table)] == ft.weight_decay > 0 for b in vit.blocks
    )
    assert decay[id(vit.cls_token)] == decay[id(vit.blocks[0].gamma_1)] == 0.0
    assert decay[id(vit.blocks[0].attn.qkv.weight)] == ft.weight_decay


def test_dense_tasks_carry_the_shared_table_per_block_resized_to_the_crop(tmp_path):
    from downstream.pyramid import ViTPyramid

    cfg = load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", *BEIT_OVERRIDES])
    run_dir = pretrain(cfg)
    shared, cfg = load_pretrained_encoder(run_dir)
    table = shared.vit.rel_pos_bias.relative_position_bias_table  # (2*4-1)^2 + 3 rows
    same = dense_encoder(shared, cfg, 28, relative_ok=True)
    assert same.relative_position == "per_layer"
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(same.eval()(images), shared.eval()(images))
    larger = dense_encoder(shared, cfg, 56, relative_ok=True)  # an 8x8 grid
    for block in larger.vit.blocks:
        resized = block.attn.relative_position_bias_table
        assert resized.shape == ((2 * 8 - 1) ** 2 + 3, table.shape[1])
        assert torch.equal(resized[-3:], table[-3:])  # the cls rows are carried as they are
        centre = (2 * 8 - 1) ** 2 // 2  # offset (0, 0) in the 15x15 table; 24 in the 7x7 one
        torch.testing.assert_close(resized[centre], table[24], atol=1e-3, rtol=0)
    levels = ViTPyramid(larger, [0, 1, 1, 1])(torch.randn(1, 3, 56, 56))
    assert [tuple(level.shape[-2:]) for level in levels] == [(32, 32), (16, 16), (8, 8), (4, 4)]


def _mae_style(**kwargs) -> ViTBackbone:
    torch.manual_seed(0)
    size = {"depth": 2, "embed_dim": 32, "num_heads": 2}
    return ViTBackbone("vit_tiny_patch16_224", 28, 7, **kwargs, **size)


def test_sincos_position_is_maes_fixed_table():
    backbone = _mae_style(position="sincos")
    table = backbone.vit.pos_embed[0]
    assert not backbone.vit.pos_embed.requires_grad
    assert torch.equal(table[0], torch.zeros(32))  # the cls token's position
    token = 1 + 1 * 4 + 2  # row 1, column 2 of the 4x4 grid
    # channel 0: sin(column·ω_0); 8: cos(column·ω_0); 16: sin(row·ω_0); 17: sin(row·ω_1)
    omega_1 = 1 / 10000 ** (1 / 8)
    expected = torch.tensor([math.sin(2), math.cos(2), math.sin(1), math.sin(omega_1)])
    torch.testing.assert_close(table[token, [0, 8, 16, 17]], expected)


def test_sincos_position_stays_fixed_in_pretraining_and_trains_downstream(tmp_path):
    mae = "method={name: mae, decoder_depth: 1, decoder_dim: 32, decoder_heads: 2}"
    overrides = ["model.position=sincos", "model.init=mae", mae]
    cfg = load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", "train.epochs=0.25", *overrides])
    before = _tiny_encoder(cfg).vit.pos_embed.detach().clone()
    run_dir = pretrain(cfg)
    backbone, _ = load_pretrained_encoder(run_dir)
    assert torch.equal(backbone.vit.pos_embed.detach(), before)  # not moved by pre-training
    assert backbone.vit.pos_embed.requires_grad  # MAE fine-tunes it


def _tiny_encoder(cfg):
    from ropim.harness.runtime import build_encoder

    return build_encoder(cfg)


def test_mae_init_is_xavier_uniform_with_zero_biases():
    mae, timm_default = _mae_style(init="mae"), _mae_style()
    fc = mae.vit.blocks[0].mlp.fc1
    bound = math.sqrt(6 / (fc.in_features + fc.out_features))
    assert fc.weight.abs().max() <= bound and fc.weight.abs().max() > 0.9 * bound
    assert torch.equal(fc.bias, torch.zeros_like(fc.bias))
    assert not torch.equal(fc.weight, timm_default.vit.blocks[0].mlp.fc1.weight)
    assert mae.vit.pos_embed.requires_grad  # init alone leaves the learned position


def test_mae_style_options_need_a_plain_vit():
    with pytest.raises(ConfigError, match="MAE's encoder"):
        ViTBackbone("beit_base_patch16_224", 28, 7, position="sincos", **BEIT)
    with pytest.raises(ConfigError, match="model.position='rope'"):
        _mae_style(position="rope")


def test_simmim_init_cuts_at_one_std_and_rescales_output_projections():
    """ROPIM's and SimMIM's ``_trunc_normal_`` cuts at ±1σ (std 0.02): std 0.0108, none beyond
    0.02; block l's attn.proj and mlp.fc2 then divided by √(2l) (``fix_init_weight``)."""
    torch.manual_seed(0)
    beit = {**BEIT, "embed_dim": 192, "num_heads": 3}
    official = ViTBackbone("beit_base_patch16_224", 28, 7, init="simmim", **beit).vit
    timm_init = ViTBackbone("beit_base_patch16_224", 28, 7, **beit).vit
    qkv, conv = official.blocks[0].attn.qkv.weight, official.patch_embed.proj.weight
    for weight in (qkv, conv, official.cls_token):
        assert weight.abs().max() <= 0.02
    assert qkv.std().item() == pytest.approx(0.02 * 0.5379, rel=0.05)
    assert conv.std().item() == pytest.approx(0.02 * 0.5379, rel=0.05)
    for layer, block in enumerate(official.blocks, start=1):
        for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert weight.abs().max() <= 0.02 / math.sqrt(2 * layer) + 1e-9
    assert torch.equal(official.blocks[0].attn.q_bias, torch.zeros_like(qkv[0]))
    assert timm_init.blocks[0].attn.qkv.weight.abs().max() > 0.04  # timm's: uncut at ±2σ


def test_maes_decoder_positions_are_maes_table_in_maes_channel_order():
    """MAE's decoder adds the same fixed 2-D sin-cos table as its encoder (models_mae.py:71-72,
    util/pos_embed.py): sin and cos of the column first, then of the row."""
    from ropim.harness.registry import build_method

    backbone = _mae_style()
    method = build_method({"name": "mae", "decoder_dim": 16, "decoder_heads": 2,
                           "decoder_depth": 1}, backbone)  # fmt: skip
    table = method.decoder_pos[0]
    assert table.shape == (1 + 16, 16) and torch.equal(table[0], torch.zeros(16))
    token = 1 + 3 * 4 + 1  # row 3, column 1
    # channel 0: sin(column·ω_0); 4: cos(column·ω_0); 8: sin(row·ω_0); 12: cos(row·ω_0)
    expected = torch.tensor([math.sin(1), math.cos(1), math.sin(3), math.cos(3)])
    torch.testing.assert_close(table[token, [0, 4, 8, 12]], expected)
