"""Bring an encoder not trained here into the downstream protocols.

``local-dir:PATH`` (a timm model folder, e.g. one ``ropim export`` wrote) or ``timm:NAME``
(weights already in the user's timm/Hugging Face cache; nothing is downloaded) becomes a
finished "run" under ``<output_dir>/external/``: its config (the model from the weights' own
config, the data and seed from the user's config, the normalisation from the weights'
``pretrained_cfg``), a ``run.json`` naming the source as the method, and one checkpoint. Every
task then evaluates it exactly as it evaluates a run of the suite, and its result rows carry the
source in the ``method`` column.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import timm
from timm.models.vision_transformer import VisionTransformer

from ropim.harness.config import load_config_dict
from ropim.harness.encoder_run import write_encoder_run
from ropim.harness.errors import CheckpointError, ConfigError
from ropim.harness.records import json_object
from ropim.harness.runtime import build_encoder

BUILD_ARGS = {"img_size", "patch_size", "in_chans", "num_classes", "drop_path_rate"}


def _create(spec: str) -> tuple[VisionTransformer, str, dict[str, Any]]:
    """The model with its weights, its timm architecture and the arguments it was built with."""
    kind, _, target = spec.partition(":")
    if kind == "local-dir":
        folder = Path(target).expanduser()
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"--weights {spec}: {config_file} not found; pass a timm folder")
        try:
            saved = json_object(config_file)
        except ValueError as exc:
            raise ConfigError(
                f"--weights {spec}: {exc}; re-export the folder (ropim export) or fix the file"
            ) from None
        args, architecture = saved.get("model_args", {}), saved.get("architecture")
        name = f"local-dir:{folder}"
    elif kind == "timm":
        args, name, architecture = {}, target, target
    else:
        raise ConfigError(f"--weights {spec!r} must be local-dir:PATH or timm:NAME")
    try:  # offline unless HF_HUB_OFFLINE=0 (set before the Hub was imported: ropim/__init__)
        model = timm.create_model(name, pretrained=True)
    except Exception as exc:  # timm/hub raise many kinds; the user needs the one line
        raise CheckpointError(
            f"--weights {spec}: timm could not load it ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); for timm:NAME the weights must already be in "
            f"the local cache (HF_HUB_OFFLINE=0 allows downloads)"
        ) from None
    if not isinstance(model, VisionTransformer):
        raise ConfigError(
            f"--weights {spec} builds a {type(model).__name__}; the suite's protocols take a "
            f"plain timm VisionTransformer"
        )
    return model, architecture, args


def import_weights(spec: str, raw: dict[str, Any], output_dir: str | Path = "runs") -> Path:
    """A run directory holding ``spec``'s encoder, ready for ``evaluate_run``."""
    model, architecture, args = _create(spec)
    pretrained = model.pretrained_cfg
    chans, height, _ = pretrained.get("input_size", (3, 224, 224))
    patch = model.patch_embed.patch_size[0]
    kwargs = {k: v for k, v in args.items() if k not in BUILD_ARGS}  # none for a timm name
    seed = (raw.get("run") or {}).get("seed", 0)
    slug = hashlib.blake2b(spec.encode(), digest_size=4).hexdigest()
    name = f"{Path(spec.split(':', 1)[1]).name}_{slug}"
    cfg_raw = {
        "run": {"name": name, "output_dir": str(Path(output_dir) / "external"), "seed": seed},
        "method": {"name": spec},
        "model": {
            "name": architecture,
            "img_size": int(height),
            "patch_size": int(patch),
            "in_chans": int(chans),
            "drop_path": 0.0,
            "kwargs": kwargs,
        },
        "data": dict(raw.get("data") or {})
        | {"mean": list(pretrained["mean"]), "std": list(pretrained["std"])},
    }
    cfg = load_config_dict(cfg_raw, f"--weights {spec}")
    encoder = build_encoder(cfg)
    missing, unexpected = encoder.vit.load_state_dict(model.state_dict(), strict=False)
    unexpected = [k for k in unexpected if not k.startswith("head")]
    if missing or unexpected:
        raise CheckpointError(
            f"--weights {spec} does not fit {cfg.model.name}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    shutil.rmtree(Path(cfg.run.output_dir) / cfg.run.name / "checkpoints", ignore_errors=True)
    record = {
        "method": {"name": spec},
        "weights_source": spec,
        "dataset": {"name": "external", "root": None, "images": None},
        "budget": {},
    }
    return write_encoder_run(cfg, encoder, record)
