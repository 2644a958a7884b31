"""ROPIM as a method: the loss only sees the complement; shapes across timm ViTs."""

import pytest
import torch

from ropim.harness.backbone import ViTBackbone
from ropim.harness.errors import ConfigError
from ropim.harness.patches import patchify, unpatchify
from ropim.harness.registry import available_methods, build_method
from ropim.method.ropim import ROPIM
from tests.conftest import tiny_backbone


def test_loss_gradient_has_no_component_in_sketch_subspace():
    method = build_method({"name": "ropim", "ratio": 0.25}, tiny_backbone())
    images = torch.randn(3, 3, 28, 28)
    out = method.compute(images, torch.Generator().manual_seed(0))
    prediction = out.prediction.detach().requires_grad_(True)
    loss = method.loss(prediction, patchify(images, 7), out.state)
    (grad,) = torch.autograd.grad(loss, prediction)
    assert grad.abs().sum() > 0
    s = out.state.matrix()  # (B, N, K)
    torch.testing.assert_close(s.transpose(1, 2) @ grad, torch.zeros(3, s.shape[2], grad.shape[2]))
    # Equivalently: adding anything inside span(S) to the prediction leaves the loss unchanged.
    shift = s @ torch.randn(3, s.shape[2], grad.shape[2])
    torch.testing.assert_close(
        method.loss(prediction + shift, patchify(images, 7), out.state), loss
    )


def test_encoder_input_is_projected_patch_embedding():
    method = build_method({"name": "ropim"}, tiny_backbone())
    images = torch.randn(2, 3, 28, 28)
    phi = method.backbone.embed_patches(images)
    tokens, sketch = method.prepare(phi, torch.Generator().manual_seed(1))
    torch.testing.assert_close(tokens, sketch.project(phi))
    torch.testing.assert_close(sketch.project(tokens), tokens, atol=1e-5, rtol=1e-5)


def test_loss_equals_mean_abs_complement_of_residual():
    method = build_method({"name": "ropim"}, tiny_backbone())
    images = torch.randn(2, 3, 28, 28)
    out = method.compute(images, torch.Generator().manual_seed(0))
    residual = patchify(images, 7) - out.prediction
    dense = out.state.dense()
    expected = ((torch.eye(16) - dense) @ residual).abs().mean()
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize(
    "name,img,patch,kw",
    [
        ("vit_tiny_patch16_224", 32, 8, {"depth": 1}),
        ("vit_small_patch16_224", 48, 16, {"depth": 1}),
        ("vit_base_patch16_224", 64, 16, {"depth": 1}),
        ("vit_tiny_patch16_224", 28, 4, {"depth": 1, "embed_dim": 24, "num_heads": 2}),
    ],
)
def test_shapes_across_timm_vits_and_sizes(name, img, patch, kw):
    backbone = ViTBackbone(name, img, patch, **kw)
    method = build_method({"name": "ropim"}, backbone)
    images = torch.randn(2, 3, img, img)
    out = method.compute(images, torch.Generator().manual_seed(0))
    n = (img // patch) ** 2
    assert backbone.num_tokens == n
    assert out.prediction.shape == (2, n, patch * patch * 3)
    assert method.encoder_view(images, out.state).shape == images.shape
    assert method.to_images(out.prediction).shape == images.shape
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()


def test_patchify_roundtrip():
    images = torch.randn(2, 3, 28, 28)
    assert torch.equal(unpatchify(patchify(images, 7), 7, (4, 4), 3), images)
    # token 1 is the second patch of the first row
    assert torch.equal(
        patchify(images, 7)[:, 1].reshape(2, 7, 7, 3).permute(0, 3, 1, 2), images[:, :, :7, 7:14]
    )


def test_ropim_is_registered_and_validated():
    assert "ropim" in available_methods()
    assert isinstance(build_method({"name": "ropim"}, tiny_backbone()), ROPIM)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        build_method({"name": "ropim", "ratio": 1.2}, tiny_backbone())
    with pytest.raises(ConfigError, match="unknown method name 'ropimm'"):
        build_method({"name": "ropimm"}, tiny_backbone())
    with pytest.raises(ConfigError, match="method.ratio"):
        build_method({"name": "ropim", "ratoi": 0.2}, tiny_backbone())


def test_unknown_model_and_indivisible_size_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown model name 'vit_tiny_patch16_2244'"):
        ViTBackbone("vit_tiny_patch16_2244", 224, 16)
    with pytest.raises(ConfigError, match="not divisible by model.patch_size=16"):
        ViTBackbone("vit_tiny_patch16_224", 100, 16)
    with pytest.raises(ConfigError, match="not a plain timm VisionTransformer"):
        ViTBackbone("resnet18", 32, 4)
