"""The BEiT-style backbone (timm ``Beit``): no absolute positions, a shared relative position
bias, layer scale; pre-training through the same method interface, and fine-tuning with the
shared table copied into every block as BEiT/ROPIM do."""

from __future__ import annotations

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
    with pytest.raises(ConfigError, match="relative position bias; the dense tasks"):
        dense_encoder(untied, untied_cfg, 56)
