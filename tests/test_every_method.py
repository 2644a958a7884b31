"""Generic tests, parametrised over every registered method (the package's, any file dropped
into baselines/, and any other installed package's ropim.methods entry point): a new method
gets the suite's per-method checks without any test edited. Each method is built with its
``test_settings`` on the suite's 28-px, 2-block test backbone."""

from __future__ import annotations

import sys
import typing
from pathlib import Path

import pytest
import torch

from ropim.cli import main
from ropim.harness.config import TrainSection, load_config
from ropim.harness.errors import ConfigError
from ropim.harness.optim import build_optimizer, resolve
from ropim.harness.pretrain import pretrain
from ropim.harness.registry import available_methods, build_method, method_class
from tests.conftest import TINY_CONFIG, SimulatedCrash, crash_after, tiny_backbone

# Every registered method, plus a stateful example (a frozen EMA teacher, a counter, a ramp)
# kept with the tests: stateful methods pass the same checks.
EXAMPLES = (str(Path(__file__).parent / "method_examples"),)
METHODS = available_methods()
DIRS = {name: () for name in METHODS} | {"frozenteacher": EXAMPLES}
CASES = [*METHODS, "frozenteacher"]


def _build(name: str):
    cls = method_class(name, DIRS[name])
    try:
        return build_method({"name": name, **cls.test_settings}, tiny_backbone(), DIRS[name])
    except ConfigError as exc:
        pytest.fail(
            f"{name} cannot be built on the test backbone (28-px images, 7-px patches, 2 blocks, "
            f"width 32): {exc}. Fix: give {cls.__name__} a test_settings dict with settings that "
            f"fit it (docs/methods.md, 'test_settings')."
        )


def _digits() -> torch.Tensor:
    from ropim.harness.data.datasets import MnistDigits

    images = MnistDigits("train").images[:8].float().div(255).sub(0.13).div(0.31)
    return images.expand(-1, 3, -1, -1)


@pytest.mark.parametrize("name", CASES)
def test_overfits_a_fixed_batch(name):
    method = _build(name)
    images = _digits()
    method.train()
    frozen = {n: p.clone() for n, p in method.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(method.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = method(images, torch.Generator().manual_seed(0))  # the same draws every step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    for module in method._untrained:  # declared state: eval mode, no gradient, unmoved
        assert not module.training and all(not p.requires_grad for p in module.parameters())
    now = dict(method.named_parameters())
    assert [n for n in frozen if not torch.equal(frozen[n], now[n])] == []


@pytest.mark.parametrize("name", CASES)
def test_resumes_to_the_weights_of_an_uninterrupted_run(name, tmp_path):
    _build(name)  # a method that does not fit the test backbone says how to fix that
    settings = {"name": name, **method_class(name, DIRS[name]).test_settings}
    flat = ", ".join(f"{k}: {v}" for k, v in settings.items())
    common = ["train.reconstruction_images=0", f"method={{{flat}}}"]

    def cfg(folder):
        return load_config(TINY_CONFIG, [f"run.output_dir={tmp_path / folder}", *common])

    def weights(run_dir):
        from safetensors.torch import load_file

        folder = run_dir / "checkpoints"
        return load_file(str(folder / (folder / "latest").read_text() / "model.safetensors"))

    dirs = DIRS[name]
    straight = weights(pretrain(cfg("a"), method_dirs=dirs))
    with pytest.raises(SimulatedCrash):
        pretrain(cfg("b"), after_step=[crash_after(5)], method_dirs=dirs)
    resumed = weights(pretrain(cfg("b"), resume=True, method_dirs=dirs))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("name", CASES)
def test_weight_decay_exclusions_are_real_parameters_kept_out_of_decay(name):
    method = _build(name)
    names = method.trained_parameters()  # state declared untrained is never optimised
    excluded = method.no_weight_decay() & set(names)  # timm lists tokens a model may lack
    optimizer = build_optimizer(method, resolve(TrainSection(), method.recipe, 1))
    free = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert [n for n in excluded if id(names[n]) not in free] == []
    assert [n for n, p in names.items() if p.ndim <= 1 and id(p) not in free] == []
    assert [n for n, p in names.items() if id(p) not in optimised] == []
    frozen = [n for n, p in method.named_parameters() if id(p) in optimised and n not in names]
    assert frozen == [], f"untrained state handed to the optimiser: {frozen}"


@pytest.mark.parametrize("name", CASES)
def test_every_recipe_value_has_a_source(name):
    cls = method_class(name, DIRS[name])
    for key in cls.recipe.values():
        assert cls.recipe.source_of(key).strip(), f"{name}: recipe.{key} has no source"
    for protocol, recipe in cls.protocol_recipes.items():
        for key in recipe.values:
            assert recipe.source_of(key).strip(), f"{name}: {protocol}.{key} has no source"
    for choice, (what, where) in cls.fixed_choices.items():
        assert what.strip() and where.strip(), f"{name}: fixed choice {choice}"


@pytest.mark.parametrize("name", CASES)
def test_a_bad_setting_is_one_error_naming_the_key(name):
    dirs = DIRS[name]
    with pytest.raises(ConfigError, match="no_such_key"):
        build_method({"name": name, "no_such_key": 1}, tiny_backbone(), dirs)
    hints = typing.get_type_hints(method_class(name, dirs).__init__)
    numeric = [k for k, t in hints.items() if t in (int, float)]
    if numeric:  # a number given as text: refused by the constructor's annotation
        with pytest.raises(ConfigError, match=rf"method\.{numeric[0]} must be"):
            build_method({"name": name, numeric[0]: "abc"}, tiny_backbone(), dirs)


def test_a_method_from_another_installed_package_is_listed(tmp_path, monkeypatch, capsys):
    """A package declaring ``fancy = fancy_methods:Fancy`` under ``ropim.methods``."""
    (tmp_path / "fancy_methods.py").write_text(
        "from baselines.simmim import SimMIM\n\n\nclass Fancy(SimMIM):\n    name = 'fancy'\n"
    )
    info = tmp_path / "fancy_methods-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fancy-methods\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ropim.methods]\nfancy = fancy_methods:Fancy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["methods"]) == 0
    assert "fancy" in capsys.readouterr().out.split()
    method = build_method({"name": "fancy", "mask_patch_size": 14}, tiny_backbone())
    assert type(method).__name__ == "Fancy"
    sys.modules.pop("fancy_methods", None)
