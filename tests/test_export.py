"""A run's encoder leaves as a timm folder that timm loads strictly and that computes the same."""

from __future__ import annotations

import timm
import torch

from downstream.encoder import load_pretrained_encoder
from ropim.cli import main
from ropim.harness.config import load_config
from ropim.harness.pretrain import pretrain
from tests.conftest import TINY_CONFIG, evaluate


def test_export_round_trips_through_timm_local_dir(tmp_path, capsys):
    run_dir = pretrain(load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}"]))
    results = tmp_path / "results.csv"
    evaluate("classification", run_dir, {"protocols": ["knn"], "knn": {"k": 10}}, results)
    out = tmp_path / "export"
    assert main(["export", str(run_dir), str(out), "--results", str(results)]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md"}

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    encoder, cfg = load_pretrained_encoder(run_dir)
    assert model.pretrained_cfg["input_size"] == (cfg.model.in_chans, 28, 28)
    assert tuple(model.pretrained_cfg["mean"]) == (0.1307,) * cfg.model.in_chans
    images = torch.randn(3, cfg.model.in_chans, 28, 28)
    with torch.no_grad():
        expected = encoder.eval().vit.forward_features(images)
        assert torch.equal(model.forward_features(images), expected)
    strict = timm.create_model(f"local-dir:{out}", pretrained=False)
    strict.load_state_dict(model.state_dict(), strict=True)

    card = (out / "README.md").read_text()
    assert "library_name: timm" in card and "ropim" in card and "| knn " in card
    assert "csiro-robotics/ROPIM" in card  # the recipe's source

    err = capsys.readouterr().err
    assert main(["export", str(run_dir), str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err and not err.count("Traceback")


def test_outside_weights_evaluate_like_the_run_they_came_from(tmp_path, capsys):
    import pandas as pd

    run_dir = pretrain(load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}"]))
    out = tmp_path / "export"
    assert main(["export", str(run_dir), str(out)]) == 0
    results = tmp_path / "results.csv"
    common = ["--config", str(TINY_CONFIG), "--results", str(results)]
    knn = ["--set", "classification.protocols=[knn]", "--set", "classification.knn.k=10"]
    assert main(["evaluate", str(run_dir), *common, *knn]) == 0
    args = ["evaluate", "--weights", f"local-dir:{out}", *common, *knn]
    assert main([*args, "--set", f"run.output_dir={tmp_path}"]) == 0
    rows = pd.read_csv(results)
    top1 = rows[rows["metric"] == "top1"].set_index("method")["value"]
    assert top1.loc["ropim"] == top1.loc[f"local-dir:{out}"]
    assert (tmp_path / "external").is_dir()
    assert main(["evaluate", "--weights", "nowhere:x", "--config", str(TINY_CONFIG)]) == 2
    assert "local-dir:PATH, timm:NAME or hf-hub:ORG/NAME" in capsys.readouterr().err
