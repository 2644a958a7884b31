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
        for p in ("pretrain", "finetune", "linear", "knn")
    }
    assert all(r["source"] for r in rows)
    assert _value(rows, "ropim", "pretrain", "clip_grad") == (
        "5.0",
        "ROPIM config.py:85, main_ropim.py:156-157",
    )
    assert _value(rows, "mae", "pretrain", "crop_scale")[0] == "[0.2, 1.0]"
    assert _value(rows, "simmim", "pretrain", "schedule")[0] == "multistep"
    assert _value(rows, "ropim", "finetune", "layer_decay")[0] == "0.75"
    assert _value(rows, "simmim", "finetune", "base_lr")[0] == "0.00125"
    assert _value(rows, "mae", "linear", "optimizer")[0] == "lars"
    assert "DINO" in _value(rows, "ropim", "knn", "k")[1]


def test_card_resolves_a_preset_whose_values_win(capsys):
    rows = _card(capsys, "--config", "configs/table2_smoke.yaml", "--method", "mae")
    assert {r["method"] for r in rows} == {"mae"}
    assert _value(rows, "mae", "linear", "optimizer") == ("sgd", "config")
    assert _value(rows, "mae", "pretrain", "base_lr") == ("0.0005", "config")
    assert _value(rows, "mae", "pretrain", "crop_scale")[0] == "[0.2, 1.0]"  # the recipe's


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
