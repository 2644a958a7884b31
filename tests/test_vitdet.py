"""ViTDet's parts: window attention, decomposed relative position, the pyramid widths and
aligned RoIAlign, each held to what it must equal."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.ops import MultiScaleRoIAlign

from downstream.detection.vitdet import (
    AlignedRoIAlign,
    ViTDetBlock,
    ViTDetPyramid,
    global_blocks,
    to_vitdet,
    window_partition,
    window_unpartition,
)
from ropim.harness.errors import ConfigError
from tests.conftest import tiny_backbone


def test_global_blocks_are_vitdets_for_twelve_and_spread_for_other_depths():
    assert global_blocks(12) == [2, 5, 8, 11]
    assert global_blocks(24) == [5, 11, 17, 23]


@pytest.mark.parametrize("size", [(8, 8), (10, 7)])
def test_window_partition_then_unpartition_is_the_identity(size):
    x = torch.randn(2, *size, 5)
    windows, padded = window_partition(x, 4)
    assert windows.shape[1:] == (4, 4, 5) and padded == (12 if size[0] > 8 else 8, 8)
    torch.testing.assert_close(window_unpartition(windows, 4, padded, size), x)


def _grid_tokens(backbone, batch=2):
    h, w = backbone.grid
    return torch.randn(batch, h, w, backbone.embed_dim)


def test_zero_relative_position_leaves_the_pretrained_block_unchanged():
    backbone = tiny_backbone(28, 7)  # a 4x4 grid
    block = backbone.vit.blocks[0].eval()
    x = _grid_tokens(backbone)
    expected = block(x.flatten(1, 2)).view_as(x)
    windowed = ViTDetBlock(copy.deepcopy(block), 0, backbone.grid).eval()
    torch.testing.assert_close(windowed(x), expected)
    with torch.no_grad():
        windowed.attn.rel_pos_h.normal_()  # a trained table does change the output
    assert not torch.allclose(windowed(x), expected)


def test_a_window_covering_the_grid_equals_global_attention():
    backbone = tiny_backbone(28, 7)
    block = backbone.vit.blocks[0].eval()
    global_block = ViTDetBlock(copy.deepcopy(block), 0, backbone.grid).eval()
    covering = ViTDetBlock(copy.deepcopy(block), 4, backbone.grid).eval()
    with torch.no_grad():
        for table in ("rel_pos_h", "rel_pos_w"):
            values = torch.randn_like(getattr(global_block.attn, table))
            getattr(global_block.attn, table).copy_(values)
            getattr(covering.attn, table).copy_(values)
    x = _grid_tokens(backbone)
    torch.testing.assert_close(covering(x), global_block(x))
    smaller = ViTDetBlock(copy.deepcopy(block), 2, backbone.grid).eval()
    assert not torch.allclose(smaller(x), global_block(x))  # 2x2 windows: local only


def test_pretrained_weights_load_with_only_the_new_tables_missing():
    plain = tiny_backbone(28, 7)
    windowed = to_vitdet(tiny_backbone(28, 7), window=2, global_indices=[1])
    missing, unexpected = windowed.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(unexpected) == ["vit.norm.bias", "vit.norm.weight"]  # ViTDet has no final norm
    assert sorted(missing) == sorted(
        f"vit.blocks.{i}.attn.rel_pos_{axis}" for i in range(2) for axis in "hw"
    )


def test_pyramid_has_vitdets_widths_and_strides():
    backbone = tiny_backbone(32, 8, embed_dim=32)
    pyramid = ViTDetPyramid(backbone, window=2, global_indices=[1])
    levels = pyramid(torch.randn(1, 3, 32, 32))
    assert [tuple(x.shape[1:]) for x in levels] == [(8, 16, 16), (16, 8, 8), (32, 4, 4), (32, 2, 2)]
    assert pyramid.strides == [2.0, 4.0, 8.0, 16.0]


def test_aligned_roi_align_is_the_unaligned_one_shifted_by_half_a_pixel():
    ramp = torch.arange(32.0).repeat(32, 1)[None, None]  # value = x coordinate
    features = OrderedDict(("0", ramp) for _ in range(1))
    boxes = [torch.tensor([[4.0, 4.0, 12.0, 12.0]])]
    shapes = [(32, 32)]
    aligned = AlignedRoIAlign(["0"], output_size=2, sampling_ratio=2)(features, boxes, shapes)
    unaligned = MultiScaleRoIAlign(["0"], output_size=2, sampling_ratio=2)(features, boxes, shapes)
    torch.testing.assert_close(unaligned - aligned, torch.full_like(aligned, 0.5))
    # Box centres sampled at 4+2+-1 and 4+6+-1, minus the half pixel: 5.5 and 9.5.
    torch.testing.assert_close(aligned[0, 0, 0], torch.tensor([5.5, 9.5]))


def test_bench_dense_reports_every_variant_from_its_own_process():
    from ropim.suite.bench_dense import VARIANTS, bench_dense

    rows = bench_dense(detection_size=64, segmentation_size=64, depth=2, cap_gib=8, iterations=1)
    assert [r["variant"] for r in rows] == list(VARIANTS)
    for row in rows:
        assert "error" not in row, row
        assert row["seconds"] > 0 and row["peak_mib"] >= row["model_mib"] > 0


def test_bench_dense_reports_a_variant_that_does_not_fit():
    from ropim.suite.bench_dense import bench_dense

    (row,) = bench_dense(("vitdet_global",), detection_size=64, depth=2, cap_gib=0.05)
    assert "0.05 GiB cap" in row["error"]
    with pytest.raises(ConfigError, match="unknown bench-dense variant.*'vitdet'"):
        bench_dense(("vitdet",))


def test_detectron2_groups_decay_biases_but_not_norms_or_positions():
    from timm.models import VisionTransformer

    from ropim.harness.optim import layer_decay_adamw

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = VisionTransformer(
                img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2, num_classes=0
            )
            self.head = nn.Linear(8, 3)

        def group_matcher(self, coarse=False):
            return {
                "stem": r"^vit\.(?:cls_token|pos_embed|patch_embed)",
                "blocks": r"^vit\.blocks\.(\d+)",
            }

        def no_weight_decay(self):
            return {"vit.pos_embed", "vit.cls_token"}

    model = Tiny()
    optimizer = layer_decay_adamw(model, 1e-4, 0.1, 0.5, (0.9, 0.999), decay_biases=True)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    decay = {name: group_of[id(p)]["weight_decay"] for name, p in model.named_parameters()}
    scale = {name: group_of[id(p)]["lr_scale"] for name, p in model.named_parameters()}
    assert decay["head.bias"] == decay["vit.blocks.0.mlp.fc1.bias"] == 0.1  # biases decayed
    assert decay["vit.blocks.0.norm1.weight"] == decay["vit.blocks.0.norm1.bias"] == 0.0
    assert decay["vit.pos_embed"] == 0.0 and decay["vit.blocks.1.attn.qkv.weight"] == 0.1
    # stem 0.5^3, block 0 0.5^2, block 1 0.5, the rest (final norm, head) 1
    assert (
        scale["vit.patch_embed.proj.weight"] == 0.125 and scale["vit.blocks.0.norm1.weight"] == 0.25
    )
    assert scale["vit.blocks.1.mlp.fc2.bias"] == 0.5 and scale["head.weight"] == 1.0
    timm_groups = layer_decay_adamw(model, 1e-4, 0.1, 0.5, (0.9, 0.999))
    no_decay = {
        id(p) for g in timm_groups.param_groups if g["weight_decay"] == 0 for p in g["params"]
    }
    assert id(model.head.bias) in no_decay  # timm's fine-tune groups: all 1-D parameters exempt
