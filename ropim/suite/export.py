"""``ropim export RUN OUT``: a run's encoder as a timm model folder, ready for the Hub.

The folder holds what ``timm.create_model("local-dir:OUT", pretrained=True)`` loads —
``config.json`` (architecture, model arguments, a ``pretrained_cfg`` with input size,
mean/std, interpolation and crop) and ``model.safetensors`` with timm's key names — written by
timm's own ``save_for_hf``, plus a ``README.md`` model card: method, budget, seed, the run's
downstream scores from the results CSV, the recipe with its sources, the code version.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
from timm.models import save_for_hf

from downstream.encoder import load_pretrained_encoder, pretrained_checkpoint
from ropim.harness.data.datasets import dataset_stats
from ropim.harness.data.transforms import EVAL_INTERPOLATION, eval_resize
from ropim.harness.errors import ConfigError
from ropim.harness.records import code_label, read_run_record
from ropim.suite.external import model_args_record
from ropim.suite.results import read_results


def export_run(
    run_dir: str | Path, out_dir: str | Path, results_path: str | Path = "results/results.csv"
) -> Path:
    run_dir, out = Path(run_dir), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new folder for the export")
    record = read_run_record(run_dir, finished=True)  # an unfinished run is not exported
    backbone, cfg = load_pretrained_encoder(run_dir)
    mean, std = dataset_stats(cfg.data)
    chans = cfg.model.in_chans
    size = cfg.model.img_size
    data_config = {
        "input_size": (chans, size, size),
        "mean": tuple(mean)[:chans],
        "std": tuple(std)[:chans],
        "interpolation": EVAL_INTERPOLATION,
        "crop_pct": size / eval_resize(cfg.data, size),
        "crop_mode": "center",
    }
    save_for_hf(backbone.vit, str(out), safe_serialization=True, data_config=data_config)
    args = _own_metadata(out / "config.json", run_tag(run_dir, record), cfg.model.kwargs)
    _record_args_in_weights(out / "model.safetensors", args)
    (out / "README.md").write_text(_model_card(run_dir, record, results_path))
    _readable(out)
    return out


def _record_args_in_weights(path: Path, args: dict[str, Any]) -> None:
    """The model arguments in the weights file's metadata too (the import compares them)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    metadata |= {k: json.dumps(v) for k, v in model_args_record(args).items()}
    save_file(load_file(str(path)), str(path), metadata=metadata)


def _readable(out: Path) -> None:
    """An export is for sharing: files readable by everyone (as the umask allows a new file),
    not the 0600 some writers use for their temporaries."""
    umask = os.umask(0)
    os.umask(umask)
    for path in out.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


LICENSE = "mit"  # the project's (LICENSE); the weights are this run's own
# timm's defaults for the architecture that describe someone else's weights
FOREIGN_KEYS = ("hf_hub_id", "hf_hub_filename", "url", "file", "source", "origin_url",
                "paper_ids", "paper_name", "notes", "architecture")  # fmt: skip


def run_tag(run_dir: Path, record: dict[str, Any]) -> str:
    """The run's own tag: ``ropim-table2_smoke-seed0`` for a run of a comparison (named
    ``<method>_seed<s>``), ``ropim-<run name>-seed0`` for a single run."""
    method, seed = record["method"]["name"], record["seed"]
    if run_dir.name == f"{method}_seed{seed}":
        raw = f"{method}-{run_dir.parent.name}-seed{seed}"
    else:
        raw = f"{method}-{run_dir.name}-seed{seed}"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in raw)


def _own_metadata(path: Path, tag: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """config.json with the run's tag and the project's license instead of timm's defaults,
    and the model arguments as exported (so an edited copy is refused on import)."""
    config = json.loads(path.read_text())
    pretrained = {k: v for k, v in config["pretrained_cfg"].items() if k not in FOREIGN_KEYS}
    config["pretrained_cfg"] = pretrained | {"tag": tag, "license": LICENSE}
    config |= model_args_record(config.get("model_args") or {})
    path.write_text(json.dumps(config, indent=2))
    return config.get("model_args") or {}


def _scores(run_dir: Path, results_path: str | Path) -> pd.DataFrame:
    rows = read_results(results_path)
    run_id = f"{run_dir.parent.name}/{run_dir.name}"
    rows = rows[(rows["run_id"] == run_id) & (rows["metric"] != "seconds")]
    keys = ["task", "protocol", "metric"]
    return rows.sort_values("recorded_at").drop_duplicates(keys, keep="last")[[*keys, "value"]]


def _model_card(run_dir: Path, record: dict[str, Any], results_path: str | Path) -> str:
    method, recipe, optim = record["method"], record["recipe"], record["optim"]
    budget = record.get("budget", {})
    arch = record["architecture"]
    code = record.get("code") or {}
    scores = _scores(run_dir, results_path)
    dataset = record["dataset"]["name"]
    lines = [
        "---",
        f"license: {LICENSE}",
        "library_name: timm",
        f"tags: [image-feature-extraction, self-supervised, masked-image-modeling, "
        f"{method['name']}, {run_tag(run_dir, record)}]",
        f"datasets: [{dataset}]",
        "---",
        "",
        f"# {method['name']} pre-trained {arch['model']} ({run_dir.name})",
        "",
        f"Encoder pre-trained with **{method['name']}** on {dataset} by the ROPIM benchmark "
        f"suite: run `{run_dir.parent.name}/{run_dir.name}`, checkpoint "
        f"`{pretrained_checkpoint(run_dir)}`.",
        "",
        "```python",
        "import timm",
        'model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True)',
        "```",
        "",
        "## Pre-training",
        "",
        f"- data: {record['dataset']['name']} ({record['dataset']['images']} images)",
        f"- budget: {budget.get('epochs')} epochs, time budget {budget.get('time_budget_s')} s; "
        f"stopped by {budget.get('stopped_by')} after {record.get('epochs_completed', 0):.2f} "
        f"epochs ({record.get('steps')} steps, {record.get('train_time_s', 0):.0f} s of training)",
        f"- seed {record['seed']}, {record['world_size']} device(s), {record['precision']}",
        f"- method settings: `{json.dumps(method)}`",
        f"- optimiser as trained: lr {optim['lr']:.3g} (base {optim['base_lr']} per "
        f"{optim['lr_batch_divisor']} images, total batch {optim['total_batch']}), warmup "
        f"{optim['warmup_epochs']} epochs, betas {optim['betas']}, weight decay "
        f"{optim['weight_decay']}, clip {optim['clip_grad']}, min lr {optim['min_lr']}",
        f"- published recipe: {recipe.get('source', '')}",
        f"- code: {code_label(code)} (dirty: {code.get('git_dirty')})",
        "",
        "## Downstream scores of this run",
        "",
    ]
    if len(scores):
        lines += [scores.to_markdown(index=False), ""]
    else:
        lines += ["None recorded for this run yet (`ropim evaluate RUN_DIR`).", ""]
    return "\n".join(lines)
