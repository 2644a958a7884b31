"""The method interface beyond pixels: a setting of the wrong type is one line before anything
trains, and a method whose prediction is not pixels (no reconstruct hook) trains to done."""

from __future__ import annotations

import json
import textwrap

import pytest

from ropim.cli import main
from ropim.harness.config import load_config
from ropim.harness.errors import ConfigError
from ropim.harness.pretrain import pretrain
from tests.conftest import TINY_CONFIG

GRADIENTS = textwrap.dedent(
    '''
    import torch
    from ropim.harness.methods import MaskingMethod, Recipe


    class Gradients(MaskingMethod):
        """Predicts each patch's mean horizontal gradient (one number, not its pixels)."""

        name = "gradients"
        recipe = Recipe(base_lr=1e-3, lr_batch_divisor=256, warmup_epochs=0, betas=(0.9, 0.95))

        def __init__(self, backbone, share: float = 0.5):
            super().__init__(backbone)
            self.share = share
            self.head = torch.nn.Linear(backbone.embed_dim, 1)

        def prepare(self, patch_tokens, generator):
            b, n, _ = patch_tokens.shape
            keep = torch.rand(b, n, 1, generator=generator, device=patch_tokens.device)
            keep = keep > self.share
            return patch_tokens * keep, keep

        def decode(self, features, state):
            return self.head(features)

        def loss(self, prediction, target, state):  # target: patchified pixels
            gradient = (target[..., 1:] - target[..., :-1]).mean(dim=-1, keepdim=True)
            return (prediction - gradient).pow(2).mean()

        def encoder_view(self, images, state):
            return images
    '''
)


def test_a_setting_of_the_wrong_type_is_named_before_training(tmp_path, capsys):
    args = ["pretrain", "--config", str(TINY_CONFIG), f"run.output_dir={tmp_path}",
            "method={name: simmim, mask_patch_size: abc}"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "method.mask_patch_size must be an integer, got 'abc'" in err
    assert not (tmp_path / "ropim_tiny" / "checkpoints").exists()


def test_a_non_pixel_method_trains_to_done_and_skips_its_figure(tmp_path, capsys):
    folder = tmp_path / "methods"
    folder.mkdir()
    (folder / "gradients.py").write_text(GRADIENTS)
    cfg = load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", "method={name: gradients}"])
    run_dir = pretrain(cfg, method_dirs=(folder,))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished" and record["reconstructions"].startswith("skipped")
    assert "reconstructions.png skipped" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="method.share must be a number"):
        pretrain(load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}",
                                           "method={name: gradients, share: lots}"]),
                 method_dirs=(folder,))  # fmt: skip
