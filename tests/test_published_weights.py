"""The authors' checkpoint files through the suite's protocols: small checkpoints written in MAE's
layout and in SimMIM's BEiT-style layout (with decoder keys and a pickled yacs config) evaluate
through k-NN and the linear probe; foreign, missing and mis-shaped keys fail in one line naming
them; an edited ``local-dir:`` folder is refused; an uncached ``hf-hub:`` name fails without
touching the network."""

from __future__ import annotations

import json
import socket
import sys
import types

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from downstream.encoder import load_pretrained_encoder
from ropim.cli import main
from ropim.harness.backbone import ViTBackbone
from ropim.harness.config import load_config
from ropim.harness.errors import CheckpointError
from ropim.harness.pretrain import pretrain
from ropim.harness.runtime import weights_digest
from ropim.suite.external import import_weights
from ropim.suite.results import read_results
from tests.conftest import PROJECT_ROOT, TINY_CONFIG

VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2}
BEIT = VIT | {"use_shared_rel_pos_bias": True, "use_abs_pos_emb": False, "init_values": 0.1}
BEIT |= {"use_rel_pos_bias": False}  # SimMIM's ViT-B: one shared table (USE_SHARED_RPB)
BEIT_SETTINGS = [
    "--set", "model.name=beit_base_patch16_224",
    "--set", "model.kwargs={depth: 2, embed_dim: 32, num_heads: 2, use_shared_rel_pos_bias: true,"
    " use_abs_pos_emb: false, init_values: 0.1, use_rel_pos_bias: false}",
]  # fmt: skip
PROBES = ["--set", "classification.protocols=[knn, linear]", "--set", "classification.knn.k=10"]
PROBES += ["--set", "classification.linear.epochs=2"]
PROBES += ["--set", "classification.linear.batch_size=64"]


def _encoder(name: str, kwargs: dict, size: int = 28) -> ViTBackbone:
    torch.manual_seed(1)
    return ViTBackbone(name, size, size // 4, **kwargs)


def mae_file(
    path, drop: str | None = None, extra: str | None = None, size: int = 28
) -> ViTBackbone:
    """facebookresearch/mae's layout: {'model': timm keys + decoder keys}."""
    encoder = _encoder("vit_tiny_patch16_224", VIT, size)
    state = dict(encoder.vit.state_dict())
    state |= {
        "mask_token": torch.zeros(1, 1, 16),
        "decoder_embed.weight": torch.zeros(16, 32),
        "decoder_pos_embed": torch.zeros(1, 17, 16),  # (shapes are not checked: dropped)
        "decoder_blocks.0.norm1.weight": torch.ones(16),
        "decoder_norm.weight": torch.ones(16),
        "decoder_pred.weight": torch.zeros(147, 16),
    }
    if drop:
        state = {k: v for k, v in state.items() if not k.startswith(drop)}
    if extra:
        state[extra] = torch.zeros(3)
    torch.save({"model": state}, path)
    return encoder


def simmim_file(path, monkeypatch, size: int = 28) -> ViTBackbone:
    """microsoft/SimMIM's (and ROPIM's) layout: 'encoder.'-prefixed BEiT-style keys, the mask
    token, the decoder, the relative position index buffers, and its yacs config pickled
    beside them."""
    encoder = _encoder("beit_base_patch16_224", BEIT, size)
    state = {f"encoder.{k}": v for k, v in encoder.vit.state_dict().items()}
    state["encoder.rel_pos_bias.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    state["encoder.mask_token"] = torch.zeros(1, 1, 32)
    state["decoder.0.weight"] = torch.zeros(147, 32, 1, 1)
    state["decoder.0.bias"] = torch.zeros(147)
    yacs = types.ModuleType("yacs.config")

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    yacs.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", yacs)
    config = CfgNode({"MODEL": CfgNode({"TYPE": "vit"}), "AMP_OPT_LEVEL": "O1"})
    torch.save({"model": state, "config": config, "epoch": 799}, path)
    monkeypatch.delitem(sys.modules, "yacs.config")  # reading must not need yacs
    return encoder


def _evaluate(weights, tmp_path, *extra: str) -> int:
    args = ["evaluate", "--weights", str(weights), "--config", str(TINY_CONFIG)]
    args += ["--results", str(tmp_path / "results.csv"), "--set", f"run.output_dir={tmp_path}"]
    return main([*args, *PROBES, *extra])


def test_mae_and_simmim_files_evaluate_through_the_probes(tmp_path, monkeypatch):
    mae = mae_file(tmp_path / "mae_pretrain_vit_tiny.pth")
    simmim = simmim_file(tmp_path / "simmim_pretrain.pth", monkeypatch)
    named = ["--name", "mae_official"]
    assert _evaluate(tmp_path / "mae_pretrain_vit_tiny.pth", tmp_path, *named) == 0
    assert _evaluate(tmp_path / "simmim_pretrain.pth", tmp_path, *BEIT_SETTINGS) == 0
    rows = read_results(tmp_path / "results.csv")
    top1 = rows[rows["metric"] == "top1"]
    methods = {"mae_official", str(tmp_path / "simmim_pretrain.pth")}
    assert set(top1["method"]) == methods and len(top1) == 4  # k-NN and linear each
    assert top1["value"].between(0, 1).all()
    for folder, source, layout in [
        (next((tmp_path / "external").glob("mae_official_*")), mae, "mae"),
        (next((tmp_path / "external").glob("simmim_pretrain_*")), simmim, "simmim"),
    ]:
        encoder, _ = load_pretrained_encoder(folder)
        assert weights_digest(encoder) == weights_digest(source)  # every tensor as written
        record = json.loads((folder / "run.json").read_text())
        assert record["layout"] == layout and len(record["weights_sha256"]) == 64
        assert record["dropped_keys"] == (6 if layout == "mae" else 4)


def test_foreign_missing_and_misshapen_keys_fail_in_one_line(tmp_path, capsys):
    mae_file(tmp_path / "foreign.pth", extra="blocks.0.attn.extra")
    assert _evaluate(tmp_path / "foreign.pth", tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown keys blocks.0.attn.extra" in err

    mae_file(tmp_path / "short.pth", drop="blocks.1.")
    assert _evaluate(tmp_path / "short.pth", tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing keys blocks.1." in err and "and 8 more" in err

    mae_file(tmp_path / "mae.pth")  # a ViT file read as a BEiT-style encoder: named, with a hint
    assert _evaluate(tmp_path / "mae.pth", tmp_path, *BEIT_SETTINGS) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.kwargs.use_abs_pos_emb" in err

    wide = ["--set", "model.kwargs={depth: 2, embed_dim: 64, num_heads: 2}"]
    assert _evaluate(tmp_path / "mae.pth", tmp_path, *wide) == 2
    err = capsys.readouterr().err
    assert "wrong shapes (file vs. model) blocks.0.attn.proj.bias (32,) vs. (64,)" in err


def test_an_edited_local_dir_is_refused(tmp_path, capsys):
    run_dir = pretrain(load_config(TINY_CONFIG, [f"run.output_dir={tmp_path}", "train.epochs=0.2"]))
    out = tmp_path / "export"
    assert main(["export", str(run_dir), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["tag"] == "ropim-ropim_tiny-seed0"  # the run's own name
    pretrained = config["pretrained_cfg"]
    assert pretrained["license"] == "mit" and "hf_hub_id" not in pretrained
    card = (out / "README.md").read_text()
    assert "license: mit" in card and "datasets: [mnist]" in card and str(tmp_path) not in card

    edited = json.loads(json.dumps(config))
    edited["model_args"]["num_heads"] = 4  # same shapes: only the export's record tells
    (out / "config.json").write_text(json.dumps(edited))
    with pytest.raises(Exception, match=r"edited after export \(num_heads 2 -> 4\)"):
        import_weights(f"local-dir:{out}", {}, tmp_path)

    edited.pop("ropim_model_args")  # the record removed too: the weights file keeps a copy
    (out / "config.json").write_text(json.dumps(edited))
    with pytest.raises(Exception, match=r"model.safetensors was exported with \(num_heads 2 -> 4"):
        import_weights(f"local-dir:{out}", {}, tmp_path)

    edited = json.loads(json.dumps(config))  # a folder from elsewhere, patch size 7 -> 14
    edited.pop("ropim_model_args")
    edited["model_args"]["patch_size"] = 14
    (out / "config.json").write_text(json.dumps(edited))
    weights = out / "model.safetensors"
    save_file(load_file(str(weights)), str(weights))  # no metadata: not one of our exports
    with pytest.raises(CheckpointError, match=r"patch_embed.proj.weight \(32, 3, 7, 7\) vs"):
        import_weights(f"local-dir:{out}", {}, tmp_path)

    (out / "config.json").write_text("{not json")
    args = ["evaluate", "--weights", f"local-dir:{out}", "--config", str(TINY_CONFIG)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --weights local-dir:") and err.count("\n") == 1


def test_an_uncached_hub_name_fails_in_one_line_without_the_network(tmp_path, monkeypatch):
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(CheckpointError, match="must already be in the local") as error:
        import_weights("hf-hub:nobody/not-a-cached-model", {}, tmp_path)
    assert "\n" not in str(error.value) and attempts == []


def test_published_checkpoints_run_every_task_and_table_the_differences(tmp_path, monkeypatch):
    """The published preset's flow on small checkpoints in MAE's and SimMIM's layouts: every
    task, a table of ours vs. published with the difference, protocol mismatches marked, a
    missing optional checkpoint skipped, nothing evaluated twice on a second run."""
    import yaml

    folder = tmp_path / "downloads"
    folder.mkdir()
    mae_file(folder / "mae_pretrain_vit_base.pth", size=32)
    simmim_file(folder / "simmim_pretrain__vit_base__img224__800ep.pth", monkeypatch, size=32)
    preset = yaml.safe_load((PROJECT_ROOT / "configs" / "published_checkpoints.yaml").read_text())
    tiny = yaml.safe_load((PROJECT_ROOT / "configs" / "table2_tiny.yaml").read_text())
    model = {"img_size": 32, "patch_size": 8}
    for entry in preset["published"]["checkpoints"].values():
        entry["model"] = entry["model"] | model
        entry["model"]["kwargs"] = entry["model"].get("kwargs", {}) | VIT
    preset |= {key: tiny[key] for key in ("segmentation", "detection")}
    preset["classification"] = {
        "protocols": ["knn", "linear"],
        "knn": {"k": 10},
        "linear": {"epochs": 2, "batch_size": 64, "optimizer": "sgd"},
    }
    preset["data"] = {"dataset": "mnist", "limit": 256}
    preset["run"]["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump(preset))
    args = [
        "published",
        "--config",
        str(path),
        "--checkpoints",
        str(folder),
        "--results",
        str(tmp_path / "results.csv"),
        "--reports",
        str(tmp_path / "reports"),
    ]
    assert main(args) == 0
    table = pd.read_csv(tmp_path / "reports" / "published_checkpoints.csv")
    assert set(table["checkpoint"]) == {"mae_official", "simmim_official"}  # ROPIM's skipped
    assert set(table["task"]) == {"classification", "segmentation", "detection"}
    row = table[(table["checkpoint"] == "mae_official") & (table["protocol"] == "linear")].iloc[0]
    assert row["published"] == 68.0 and row["same_protocol"]
    assert row["difference"] == pytest.approx(row["ours"] - 68.0, abs=0.01)
    simmim = table[(table["checkpoint"] == "simmim_official") & (table["protocol"] == "linear")]
    assert simmim.iloc[0]["published"] == 56.7 and not simmim.iloc[0]["same_protocol"]
    assert "classification.feature=avg classification.linear.layer=8" in simmim.iloc[0]["note"]
    miou = table[(table["checkpoint"] == "mae_official") & (table["metric"] == "mIoU")]
    assert miou.iloc[0]["published"] == 48.1
    rows = read_results(tmp_path / "results.csv")
    assert set(rows["method"]) == {"mae", "simmim"}  # the method whose recipes apply
    again = len(rows)
    assert main(args) == 0 and len(read_results(tmp_path / "results.csv")) == again


def test_the_probe_reads_any_block_and_the_report_marks_other_protocols():
    from ropim.harness.errors import ConfigError
    from ropim.suite.report import protocol_mismatches, read_references

    encoder = _encoder("beit_base_patch16_224", BEIT).eval()
    images = torch.randn(2, 3, 28, 28)
    last = encoder.pooled_features(images)
    assert torch.equal(encoder.pooled_features(images, layer=2)["avg"], last["avg"])
    assert not torch.allclose(encoder.pooled_features(images, layer=1)["avg"], last["avg"])
    with pytest.raises(ConfigError, match="layer 3 does not exist: the encoder has blocks 1..2"):
        encoder.pooled_features(images, layer=3)

    references = read_references()
    linear = references[references["protocol"] == "linear"]
    marked = protocol_mismatches(linear, {"feature": "cls", "layer": None})
    assert [references.loc[i, "method"] for i in marked] == ["simmim"]
    assert not protocol_mismatches(
        linear[linear["method"] == "simmim"], {"feature": "avg", "layer": 8}
    )
