"""Bring an encoder not trained here into the downstream protocols.

``--weights`` takes:

- ``PATH.pth``/``.pt``/``.safetensors``: an author's checkpoint file (MAE's, SimMIM's, BEiT's
  or ROPIM's layout, detected from its keys or named with ``--layout``; see
  :mod:`ropim.suite.weights_files`). The architecture is the config's ``model`` section.
- ``local-dir:PATH``: a timm model folder (e.g. one ``ropim export`` wrote).
- ``timm:NAME`` / ``hf-hub:ORG/NAME``: weights already in the user's timm/Hugging Face cache;
  nothing is downloaded (``HF_HUB_OFFLINE=1`` is set before the Hub is imported).

Every source is loaded strictly into the suite's encoder (an unknown, missing or mis-shaped key
is one error naming it; nothing is resampled) and becomes a finished "run" under
``<output_dir>/external/``: the config, a ``run.json`` naming the source (with the file's
sha256 and layout), and one checkpoint. Every task then evaluates it exactly as it evaluates a
run of the suite; its result rows carry ``label`` (default: the source) as the method.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import timm
from torch import Tensor

from ropim.harness.architecture_values import check_model_values
from ropim.harness.backbone import check_vit_family
from ropim.harness.config import load_config_dict
from ropim.harness.encoder_run import write_encoder_run
from ropim.harness.errors import CheckpointError, ConfigError, check_name
from ropim.harness.records import json_object
from ropim.harness.runtime import build_encoder
from ropim.suite.weights_files import (
    check_and_load,
    detect_layout,
    encoder_weights,
    read_file,
    sha256_of,
)

BUILD_ARGS = {"img_size", "patch_size", "in_chans", "num_classes", "drop_path_rate"}
FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
EXPORT_ARGS_KEY = "ropim_model_args"  # the model arguments a `ropim export` was written with


def _timm_source(spec: str) -> tuple[dict[str, Tensor], str, dict[str, Any], dict[str, Any]]:
    """Weights, architecture, model arguments and pretrained_cfg of a timm/Hub name."""
    kind, _, target = spec.partition(":")
    name = target if kind == "timm" else spec
    try:  # offline unless HF_HUB_OFFLINE=0 (set before the Hub was imported: ropim/__init__)
        model = timm.create_model(name, pretrained=True)
        args: dict[str, Any] = {}
        architecture = target
        if kind == "hf-hub":
            from timm.models._hub import load_model_config_from_hf

            _, architecture, args = load_model_config_from_hf(target)
            args = args or {}
    except Exception as exc:  # timm/hub raise many kinds; the user needs the one line
        raise CheckpointError(
            f"--weights {spec}: timm could not load it ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:200]}); the weights must already be in the "
            f"local timm/Hugging Face cache (HF_HUB_OFFLINE=0 allows downloads)"
        ) from None
    return model.state_dict(), architecture, args, dict(model.pretrained_cfg)


def _local_dir(spec: str) -> tuple[dict[str, Tensor], str, dict[str, Any], dict[str, Any], Path]:
    folder = Path(spec.partition(":")[2]).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"--weights {spec}: {config_file} not found; pass a timm folder")
    try:
        saved = json_object(config_file)
    except ValueError as exc:
        raise ConfigError(
            f"--weights {spec}: {exc}; re-export the folder (ropim export) or fix the file"
        ) from None
    args, architecture = saved.get("model_args") or {}, saved.get("architecture")
    if not isinstance(architecture, str) or not isinstance(args, dict):
        raise ConfigError(f"--weights {spec}: {config_file} needs 'architecture' and 'model_args'")
    exported = saved.get(EXPORT_ARGS_KEY)
    if exported is not None and exported != args:
        detail = _changes(exported, args)
        raise ConfigError(
            f"--weights {spec}: {config_file} was edited after export ({detail}); these "
            f"weights were trained as {exported}: restore model_args"
        )
    check_vit_family(architecture, f"--weights {spec}: {config_file} architecture")
    pretrained = saved.get("pretrained_cfg") or {}
    if not isinstance(pretrained, dict):
        raise ConfigError(f"--weights {spec}: {config_file} pretrained_cfg must be a mapping")
    for key in ("mean", "std"):
        values = pretrained.get(key)
        if not (
            isinstance(values, list)
            and len(values) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        ):
            raise ConfigError(
                f"--weights {spec}: {config_file} pretrained_cfg.{key}={values!r} must be three "
                f"numbers (the normalisation the weights were trained with)"
            )
    weights_file = folder / "model.safetensors"
    tensors = read_file(weights_file)
    _check_exported_args(spec, weights_file, args)
    return tensors, architecture, args, pretrained, weights_file


def _changes(exported: dict[str, Any], args: dict[str, Any]) -> str:
    """``key old -> new`` for each model argument edited since the export."""
    changed = sorted(k for k in set(args) | set(exported) if args.get(k) != exported.get(k))
    return ", ".join(f"{k} {exported.get(k)!r} -> {args.get(k)!r}" for k in changed)


def _check_exported_args(spec: str, weights_file: Path, args: dict[str, Any]) -> None:
    """Our exports also store the model arguments in the weights file's metadata: an edited
    config.json whose record was removed as well is still recognised."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights_file), framework="pt") as handle:
            stored = (handle.metadata() or {}).get(EXPORT_ARGS_KEY)
    except Exception:  # noqa: BLE001 - unreadable metadata: read_file already read the weights
        return
    if stored is None:
        return
    try:
        exported = json.loads(stored)
    except ValueError:
        return
    if exported != args:
        detail = _changes(exported, args)
        raise ConfigError(
            f"--weights {spec}: config.json's model_args differ from those {weights_file.name} "
            f"was exported with ({detail}): restore model_args"
        )


def _model_section(architecture: str, args: dict[str, Any], pretrained: dict[str, Any]) -> dict:
    check_vit_family(architecture, "the weights' architecture")
    size = pretrained.get("input_size", (args.get("in_chans", 3), 224, 224))
    if not (isinstance(size, (list, tuple)) and len(size) == 3):
        raise ConfigError(f"pretrained_cfg.input_size={size!r} must be [channels, height, width]")
    chans, height, _ = size
    args = {k: _square(v, k) if k in ("img_size", "patch_size") else v for k, v in args.items()}
    patch = args.get("patch_size")
    if patch is None:  # a registered name: its patch size is in the name (…patch16…)
        patch = timm.create_model(architecture, pretrained=False).patch_embed.patch_size[0]
    section = {
        "name": architecture,
        "img_size": _whole(args.get("img_size", height), "img_size"),
        "patch_size": _whole(patch, "patch_size"),
        "in_chans": _whole(args.get("in_chans", chans), "in_chans"),
        "drop_path": 0.0,
        "kwargs": {k: v for k, v in args.items() if k not in BUILD_ARGS},
    }
    check_model_values(
        section["img_size"], section["patch_size"], section["in_chans"], section["kwargs"],
        prefix="model_args.",
    )  # fmt: skip
    return section


def _whole(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"model_args.{key}={value!r} must be a whole number")
    return value


def _square(value: Any, key: str) -> Any:
    """timm writes sizes as [h, w]; the suite's encoder is square."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"model_args.{key}={value}: the suite's encoder takes square sizes")
        value = value[0]
    return value


def import_weights(
    spec: str,
    raw: dict[str, Any],
    output_dir: str | Path = "runs",
    label: str | None = None,
    layout: str | None = None,
    method: str | None = None,
) -> Path:
    """A run directory holding ``spec``'s encoder, ready for ``evaluate_run``: named after
    ``label``; its rows carry ``method`` (default ``label``, else the source), whose published
    fine-tune recipe the classification fine-tune then follows."""
    if label is not None:
        check_name("--name", label)
    method = method or label or spec
    data = dict(raw.get("data") or {})
    record: dict[str, Any] = {"weights_source": spec}
    kind = spec.partition(":")[0]
    if kind in ("timm", "hf-hub", "local-dir"):
        if kind == "local-dir":
            tensors, architecture, args, pretrained, file = _local_dir(spec)
            record["weights_sha256"] = sha256_of(file)
        else:
            tensors, architecture, args, pretrained = _timm_source(spec)
        model = _model_section(architecture, args, pretrained)
        weights, dropped = encoder_weights(tensors, "timm")
        data |= {"mean": list(pretrained["mean"]), "std": list(pretrained["std"])}
        settings = f"{spec}'s config ({architecture}, {args or 'default arguments'})"
    elif Path(spec).suffix in FILE_SUFFIXES or Path(spec).expanduser().is_file():
        path = Path(spec).expanduser()
        tensors = read_file(path)
        layout = layout or detect_layout(list(tensors))
        weights, dropped = encoder_weights(tensors, layout)
        model = dict(raw.get("model") or {}) | {"drop_path": 0.0}
        record |= {"weights_sha256": sha256_of(path), "layout": layout, "dropped_keys": dropped}
        settings = f"the config's model section ({model.get('name')}, {model.get('kwargs', {})})"
    else:
        raise ConfigError(
            f"--weights {spec!r} must be a .pth/.pt/.safetensors file, local-dir:PATH, "
            f"timm:NAME or hf-hub:ORG/NAME"
        )
    seed = (raw.get("run") or {}).get("seed", 0)
    slug = hashlib.blake2b(spec.encode(), digest_size=4).hexdigest()
    stem = Path(spec.split(":", 1)[-1]).name.removesuffix(Path(spec).suffix)
    stem = re.sub(r"[^A-Za-z0-9_.+=@-]", "-", stem).lstrip(".")[:100] or "weights"
    name = f"{label or stem}_{slug}"
    cfg_raw = {
        "run": {"name": name, "output_dir": str(Path(output_dir) / "external"), "seed": seed},
        "method": {"name": method},
        "model": model,
        "data": data,
    }
    cfg = load_config_dict(cfg_raw, f"--weights {spec}")
    encoder = build_encoder(cfg)
    check_and_load(encoder.vit, weights, f"--weights {spec}", settings)
    shutil.rmtree(Path(cfg.run.output_dir) / cfg.run.name / "checkpoints", ignore_errors=True)
    record |= {
        "method": {"name": method},
        "dataset": {"name": "external", "root": None, "images": None},
        "budget": {},
    }
    return write_encoder_run(cfg, encoder, record)


def model_args_record(args: dict[str, Any]) -> dict[str, Any]:
    """What ``ropim export`` adds to config.json so an edited copy is recognised."""
    return {EXPORT_ARGS_KEY: json.loads(json.dumps(args))}
