"""Checkpoints: weights in safetensors, training state through Fabric, written atomically.

Layout: ``<run>/checkpoints/step_<n>/{model.safetensors,state.pt}`` plus ``latest`` naming the
newest complete one. A crash mid-write leaves the previous checkpoint and ``latest`` intact.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ropim.harness.errors import CheckpointError
from ropim.harness.records import write_atomic

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"


def backbone_signature(backbone: nn.Module) -> dict[str, str]:
    """What must match for encoder weights to load: timm model, sizes, depth."""
    return {
        "model": backbone.name,  # type: ignore[attr-defined]
        "img_size": str(backbone.img_size),  # type: ignore[attr-defined]
        "patch_size": str(backbone.patch_size),  # type: ignore[attr-defined]
        "in_chans": str(backbone.in_chans),  # type: ignore[attr-defined]
        "embed_dim": str(backbone.embed_dim),  # type: ignore[attr-defined]
        "depth": str(len(backbone.vit.blocks)),  # type: ignore[attr-defined]
    }


def architecture_signature(
    module: nn.Module, backbone: nn.Module, **identity: str
) -> dict[str, str]:
    """What a model built around ``backbone`` must match to load weights: the backbone's
    signature, what else names it (method, task, classes) and its parameter count."""
    return {
        **identity,
        **backbone_signature(backbone),
        "num_parameters": str(sum(p.numel() for p in module.parameters())),
    }


def check_architecture(
    metadata: dict[str, str],
    module: nn.Module,
    path: str | Path,
    expected: dict[str, str] | None = None,
) -> None:
    """Refuse weights from another architecture, naming every key that differs; ``expected``
    defaults to the module's own ``signature()`` (methods, downstream models) or, for a
    backbone, its backbone signature."""
    if expected is None and hasattr(module, "signature"):
        expected = module.signature()  # type: ignore[operator]
    elif expected is None:
        expected = backbone_signature(module)
    differences = [
        f"{key}: checkpoint {metadata[key]!r} vs. this config {value!r}"
        for key, value in expected.items()
        if key in metadata and metadata[key] != value
    ]
    if differences:
        raise CheckpointError(
            f"checkpoint {path} is from another architecture ({'; '.join(differences)})"
        )


def save_weights(module: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; never unpickles anything."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint weights not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None


def load_weights(
    module: nn.Module, path: str | Path, expected: dict[str, str] | None = None
) -> dict[str, str]:
    """Load weights saved by :func:`save_weights`, refusing another architecture by name."""
    tensors, metadata = read_weights(path)
    check_architecture(metadata, module, path, expected)
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return metadata


def weight_peak(path: Path, keys: set[str] | None = None) -> float:
    """The largest magnitude among a weights file's floating-point values (those of ``keys``
    when given; inf if any is not finite), read one tensor at a time."""
    from safetensors import safe_open

    peak = 0.0
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            if keys is not None and key not in keys:
                continue
            tensor = handle.get_tensor(key)
            if tensor.is_floating_point() and tensor.numel():
                values = tensor.detach().float()
                if not torch.isfinite(values).all():
                    return float("inf")
                peak = max(peak, float(values.abs().max()))
    return peak


def _complete(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file() and (path / STATE_FILE).is_file()


def _step_of(path: Path) -> int:
    """The step a ``step_<n>`` folder holds (-1 for a name that is not one)."""
    try:
        return int(path.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


class CheckpointDir:
    """The checkpoints of one run."""

    def __init__(self, run_dir: str | Path, keep: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = max(1, keep)

    def _latest_name(self) -> str | None:
        pointer = self.root / "latest"
        return pointer.read_text().strip() if pointer.is_file() else None

    def _complete_steps(self) -> list[Path]:
        """Complete ``step_*`` folders, oldest step first (by number, not by name)."""
        found = [p for p in self.root.glob("step_*") if _step_of(p) >= 0 and _complete(p)]
        return sorted(found, key=_step_of)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names; if that one is gone or incomplete (deleted by hand
        after a bad write), or the pointer itself is lost, the newest complete ``step_*``
        folder, said on stderr — a run never silently starts again over its checkpoints."""
        name = self._latest_name()
        named = self.root / name if name is not None else None
        if named is not None and _complete(named):
            return named
        complete = self._complete_steps()
        if not complete:
            if named is None:
                return None
            raise CheckpointError(
                f"{self.root / 'latest'} names {named}, which is incomplete, and no complete "
                f"checkpoint is left; delete {self.root} to start afresh"
            )
        what = f"{named} is missing or incomplete" if named else f"{self.root / 'latest'} is lost"
        print(f"{what}; using {complete[-1].name}", file=sys.stderr)
        return complete[-1]

    def newest_sane(
        self, bound: float, keys: set[str] | None = None
    ) -> tuple[Path | None, list[tuple[Path, float]]]:
        """After a divergence: the newest complete checkpoint, at or before the one ``latest``
        names, whose weights are all finite and at most ``bound`` in magnitude, and the newer
        ones that are not (with their largest magnitude). Weights can blow up steps before the
        loss does, so "the last finite loss" alone may name a checkpoint that diverges again.
        ``keys`` limits the check to those tensors (the parameters: a float step counter among
        the buffers may be large and healthy)."""
        latest = self.latest()
        if latest is None:
            return None, []
        blown = []
        for path in reversed(
            [p for p in self._complete_steps() if _step_of(p) <= _step_of(latest)]
        ):
            peak = weight_peak(path / WEIGHTS_FILE, keys)
            if peak <= bound:
                return path, blown
            blown.append((path, peak))
        return None, blown

    def point_latest_at(self, path: Path) -> None:
        """Make ``latest`` name ``path`` (atomically); newer checkpoints stay on disk."""
        write_atomic(self.root / "latest", path.name)

    def save(
        self,
        fabric: Any,
        step: int,
        module: nn.Module,
        state: dict[str, Any],
        metadata: dict[str, str],
    ) -> Path:
        """Write ``step_<n>`` (rank 0 writes weights; Fabric writes the training state)."""
        final = self.root / f"step_{step:08d}"
        staging = self.root / f".staging_step_{step:08d}"
        try:
            if fabric.global_rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
                save_weights(module, staging / WEIGHTS_FILE, metadata | {"step": str(step)})
            fabric.barrier()
            fabric.save(staging / STATE_FILE, state)
            fabric.barrier()
        except OSError as exc:  # a full disk, a lost mount: the previous checkpoint stays
            shutil.rmtree(staging, ignore_errors=True)
            kept = self._latest_name() or "none yet"
            raise CheckpointError(
                f"could not write the checkpoint of step {step} to {staging.parent} "
                f"({exc.strerror or exc}); the previous one ({kept}) is intact: free space "
                f"or fix the folder, then resume"
            ) from None
        if fabric.global_rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            self.point_latest_at(final)
            self._prune(final)
        fabric.barrier()
        return final

    def _prune(self, newest: Path) -> None:
        """Keep the ``keep`` highest steps, by number, and always the one just written."""
        steps = sorted(self.root.glob("step_*"), key=_step_of)
        for old in steps[: -self.keep]:
            if old != newest:
                shutil.rmtree(old, ignore_errors=True)

    def load(
        self,
        fabric: Any,
        path: Path,
        module: nn.Module,
        state: dict[str, Any],
        signature: dict[str, str] | None = None,
    ) -> dict:
        """Restore weights into ``module`` and the training state in place; returns leftovers."""
        load_weights(module, path / WEIGHTS_FILE, signature)
        try:
            with warnings.catch_warnings():  # torch's own advice would be the wrong one here
                warnings.simplefilter("ignore")
                return fabric.load(path / STATE_FILE, state, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError) as exc:
            raise CheckpointError(
                f"{path / STATE_FILE} is not a training state written by this suite (refused "
                f"without unpickling anything: {type(exc).__name__}); delete {path} to resume "
                f"from the newest checkpoint before it, or start a new run"
            ) from None
