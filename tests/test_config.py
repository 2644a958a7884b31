import pytest

from ropim.harness.config import load_config
from ropim.harness.errors import ConfigError


def test_yaml_and_overrides_resolve_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: {name: a}\ntrain: {epochs: 3}\nmethod: {name: ropim, ratio: 0.2}\n")
    cfg = load_config(
        path,
        ["train.base_lr=1e-3", "train.epochs=5", "method.ratio=0.3", "model.kwargs={depth: 2}"],
    )
    assert cfg.run.name == "a"
    assert cfg.train.epochs == 5.0
    assert cfg.train.base_lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.method == {"name": "ropim", "ratio": 0.3}
    assert cfg.model.kwargs == {"depth": 2}


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.epoch=3", "unknown config key train.epoch"),
        ("trian.epochs=3", "unknown config key trian"),
        ("train.batch_size=abc", "train.batch_size must be an integer"),
        ("probe.enabled=maybe", "probe.enabled must be true or false"),
        ("train.epochs", "must look like key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    import yaml

    from ropim.suite.compare import plan_comparison

    folder = Path(__file__).resolve().parent.parent / "configs"
    for path in sorted(folder.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if "compare" in raw:
            assert len(plan_comparison(path)) >= 3, path
        elif "published" in raw:  # each checkpoint's architecture builds
            from ropim.harness.config import load_config_dict
            from ropim.harness.runtime import build_encoder
            from ropim.suite.published import _entries

            for entry in _entries(raw, path).values():
                small = entry["model"] | {"kwargs": entry["model"].get("kwargs", {}) | {"depth": 1}}
                build_encoder(load_config_dict({"model": small}, str(path)))
        else:
            load_config(path)


def test_unknown_crop_interpolation_is_refused_by_name():
    from ropim.harness.config import load_config
    from tests.conftest import TINY_CONFIG

    with pytest.raises(
        ConfigError, match="data.interpolation='lanczos' must be bilinear or bicubic"
    ):
        load_config(TINY_CONFIG, ["data.interpolation=lanczos"])


def test_a_preset_inherits_its_base_and_configs_prints_the_result(tmp_path, capsys):
    import yaml

    from ropim.cli import main
    from ropim.harness.config import read_yaml

    (tmp_path / "child.yaml").write_text(
        "base: table2_tiny\ncompare: {seeds: [5]}\ntrain: {epochs: 3}\n"
    )
    raw = read_yaml(tmp_path / "child.yaml")
    assert raw["compare"]["seeds"] == [5] and raw["compare"]["name"] == "table2_tiny"
    assert raw["train"]["epochs"] == 3 and raw["train"]["batch_size"] == 32  # merged, not replaced
    assert main(["configs", str(tmp_path / "child.yaml"), "train.epochs=4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["epochs"] == 4 and "base" not in printed
    args = [
        "reproduce",
        "--config",
        str(tmp_path / "child.yaml"),
        "--print-config",
        "train.epochs=5",
    ]
    assert main(args) == 0 and yaml.safe_load(capsys.readouterr().out)["train"]["epochs"] == 5
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="base presets form a cycle"):
        read_yaml(tmp_path / "loop.yaml")
