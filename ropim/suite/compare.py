"""Run several methods under one budget, and refuse comparisons whose budgets differ.

A comparison config is an ordinary run config (the shared budget: backbone, data and
augmentation, batch size, epochs or seconds, precision) plus a ``compare`` section naming the
methods, their own settings (masking, decoder, and their published optimiser recipe) and the
seeds. Each (method, seed) is one run: ``<output_dir>/<compare.name>/<method>_seed<s>``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from downstream.tasks import all_tasks
from ropim.harness.claims import WorkUnit, share_work
from ropim.harness.config import Config, apply_overrides, load_config_dict, read_yaml
from ropim.harness.encoder_run import write_encoder_run
from ropim.harness.errors import ConfigError, check_name
from ropim.harness.pretrain import pretrain, resolve_pretraining
from ropim.harness.records import read_run_record
from ropim.harness.resolution import given_keys
from ropim.harness.runtime import build_encoder

# What every run of a comparison must share; each method owns everything else.
BUDGET_KEYS = (
    "model",
    "data",
    "train.batch_size",
    "train.epochs",
    "train.time_budget_s",
    "train.flops_budget",
    "train.precision",
    "train.accelerator",
)
# Each method's own recipe sets these (MAE: bicubic crops 0.2–1, no drop path); a comparison
# equalises one only when compare.force_shared lists it (an ablation, recorded in the run's config).
RECIPE_OWNED = ("data.crop_scale", "data.interpolation", "model.drop_path")
COMPARE_KEYS = {
    "name",
    "scale",
    "seeds",
    "methods",
    "random_init",
    "force_shared",
    "tasks",
    "left_out",
    "mode",
}
# identical_budget: one shared budget (the headline). published_recipe: each method at its own
# published backbone, epochs, batch and schedule, to reproduce its published numbers.
MODES = ("identical_budget", "published_recipe")
RANDOM_INIT = "random_init"  # the floor row: the shared encoder at its seeded initialisation
# The optimiser values a method may set for itself (its published recipe).
RECIPE_KEYS = {
    "base_lr",
    "lr_batch_divisor",
    "warmup_epochs",
    "betas",
    "weight_decay",
    "clip_grad",
}


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def budget_of(config: Config) -> dict[str, Any]:
    """The shared budget of a run: :data:`BUDGET_KEYS` less the recipe-owned keys."""
    as_dict = config.to_dict()
    for key in RECIPE_OWNED:
        section, name = key.split(".")
        as_dict[section].pop(name, None)
    return {key: _lookup(as_dict, key) for key in BUDGET_KEYS}


def _check_recipe_owned(raw: dict[str, Any], force_shared: Any, path: str | Path) -> None:
    if not isinstance(force_shared, list) or not set(force_shared) <= set(RECIPE_OWNED):
        raise ConfigError(
            f"compare.force_shared={force_shared!r} in {path} must list keys from "
            f"{list(RECIPE_OWNED)}"
        )
    for key in RECIPE_OWNED:
        value = _lookup(raw, key)
        if key in force_shared and value is None:
            raise ConfigError(f"compare.force_shared lists {key}; set its shared value in {path}")
        if key not in force_shared and value is not None:
            raise ConfigError(
                f"{key}={value!r} in {path}: in a comparison each method takes {key} from its "
                f"own recipe; add {key} to compare.force_shared to give all methods this value"
            )


def check_budget_parity(configs: dict[str, Config]) -> None:
    """Raise naming the first budget key on which any two runs differ."""
    labels = list(configs)
    if len(labels) < 2:
        return
    reference = budget_of(configs[labels[0]])
    for label in labels[1:]:
        budget = budget_of(configs[label])
        for key in BUDGET_KEYS:
            if budget[key] != reference[key]:
                detail = _first_difference(reference[key], budget[key], key)
                raise ConfigError(
                    f"runs {labels[0]!r} and {label!r} do not share one budget: {detail}. "
                    f"A comparison needs identical {', '.join(BUDGET_KEYS)}."
                )


def _first_difference(a: Any, b: Any, key: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for sub in sorted(set(a) | set(b)):
            if a.get(sub) != b.get(sub):
                return _first_difference(a.get(sub), b.get(sub), f"{key}.{sub}")
    return f"{key} is {a!r} vs. {b!r}"


def check_run_dirs(run_dirs: list[Path]) -> None:
    """Budget parity of finished runs, read from their saved ``config.yaml``."""
    configs = {}
    for run_dir in run_dirs:
        raw = read_yaml(run_dir / "config.yaml")
        configs[run_dir.name] = load_config_dict(raw, f"{run_dir}/config.yaml")
    check_budget_parity(configs)
    seeds: dict[str, set[int]] = {}
    for cfg in configs.values():
        seeds.setdefault(cfg.method["name"], set()).add(cfg.run.seed)
    if len({frozenset(s) for s in seeds.values()}) > 1:
        raise ConfigError(f"methods were run with different seed lists: {seeds}")


@dataclass
class PlannedRun:
    method: str
    seed: int
    config: Config
    pretrained: bool = True  # False: the random-initialisation floor, evaluated untrained
    given: set[str] = field(default_factory=set)  # dotted keys the preset set for this run

    @property
    def label(self) -> str:
        return f"{self.method}_seed{self.seed}"


def read_comparison(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """A comparison config as a mapping: base presets merged, overrides applied."""
    raw = read_yaml(path)
    if not raw:
        raise ConfigError(f"comparison config {path} is empty")
    return apply_overrides(raw, list(overrides or []))


def plan_comparison(
    path: str | Path, overrides: list[str] | None = None, methods: list[str] | None = None
) -> list[PlannedRun]:
    """Expand a comparison config into one config per (method, seed), budget-checked."""
    return plan_runs(read_comparison(path, overrides), path, methods)


def plan_runs(
    raw: dict[str, Any], path: str | Path, methods: list[str] | None = None
) -> list[PlannedRun]:
    """:func:`plan_comparison` of a mapping already read (``path`` names it in errors)."""
    raw = copy.deepcopy(raw)
    section = raw.pop("compare", None)
    for task in all_tasks():  # task sections: read after pre-training, not by it
        raw.pop(task.name, None)
    if not isinstance(section, dict) or not section.get("methods"):
        raise ConfigError(f"{path} needs a compare section with compare.methods")
    unknown = set(section) - COMPARE_KEYS
    if unknown:
        first = sorted(unknown)[0]
        raise ConfigError(f"unknown key compare.{first}; allowed: {sorted(COMPARE_KEYS)}")
    mode = section.get("mode", MODES[0])
    if mode not in MODES:
        raise ConfigError(f"compare.mode={mode!r} in {path} must be one of {MODES}")
    published = mode == "published_recipe"
    own_sections = {"method", "train", "model", "data"} if published else {"method", "train"}
    _check_recipe_owned(raw, section.get("force_shared", []), path)
    seeds = _seeds(section, raw)
    random_init = section.get("random_init", False)
    if not isinstance(random_init, bool):
        raise ConfigError(
            f"compare.random_init={random_init!r} in {path} must be true or false (the floor: "
            f"the same encoder with no pre-training)"
        )
    floor = random_init and (not methods or RANDOM_INIT in methods)
    chosen = [m for m in methods if m != RANDOM_INIT] if methods else list(section["methods"])
    missing = [m for m in chosen if m not in section["methods"]]
    if missing:
        raise ConfigError(f"method {missing[0]!r} is not listed under compare.methods in {path}")
    name = check_name("compare.name", section.get("name") or Path(path).stem)
    planned = []
    for method in chosen:
        check_name(f"compare.methods key {method!r}", method)
        own = section["methods"][method] or {}
        extra = set(own) - own_sections
        if extra:
            raise ConfigError(
                f"compare.methods.{method}.{sorted(extra)[0]}: a method may only set its own "
                f"'method' settings and its recipe under 'train' (compare.mode="
                f"published_recipe also allows its own 'model' and 'data')"
            )
        budget_keys = set(own.get("train") or {}) - RECIPE_KEYS
        if budget_keys and not published:
            raise ConfigError(
                f"compare.methods.{method}.train.{sorted(budget_keys)[0]} is part of the shared "
                f"budget; set it once under train (a method may set: {sorted(RECIPE_KEYS)})"
            )
        for seed in seeds:
            run_raw = copy.deepcopy(raw)
            run_raw["method"] = {"name": method} | (own.get("method") or {})
            for part in ("train", "model", "data"):
                run_raw.setdefault(part, {}).update(own.get(part) or {})
            run_raw.setdefault("run", {})
            run_raw["run"]["seed"] = seed
            run_raw["run"]["name"] = f"{method}_seed{seed}"
            output = Path(run_raw["run"].get("output_dir", "runs")) / name
            run_raw["run"]["output_dir"] = str(output)
            config = load_config_dict(run_raw, f"{path} ({method}, seed {seed})")
            planned.append(PlannedRun(method, seed, config, given=given_keys(run_raw)))
    if floor:  # --methods random_init selects the floor alone
        for seed in seeds:  # the same encoder every method starts from, with no pre-training
            run_raw = copy.deepcopy(raw)
            run_raw["method"] = {"name": RANDOM_INIT}
            run_raw.setdefault("run", {}).update(seed=seed, name=f"{RANDOM_INIT}_seed{seed}")
            run_raw["run"]["output_dir"] = str(
                Path(raw.get("run", {}).get("output_dir", "runs")) / name
            )
            config = load_config_dict(run_raw, f"{path} (random init, seed {seed})")
            planned.append(PlannedRun(RANDOM_INIT, seed, config, pretrained=False))
    if not published:
        check_budget_parity({p.label: p.config for p in planned})
    return planned


def _seeds(section: dict[str, Any], raw: dict[str, Any]) -> list[int]:
    """compare.seeds: distinct whole numbers (absent: run.seed alone)."""
    if "seeds" not in section or section["seeds"] is None:
        return [raw.get("run", {}).get("seed", 0)]
    seeds = section["seeds"]
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ConfigError(
            f"compare.seeds={seeds!r} must list distinct whole numbers, 0 or more (e.g. [0, 1, "
            f"2]); leave it out to run run.seed alone"
        )
    return seeds


def check_methods(planned: list[PlannedRun], method_dirs: tuple = ()) -> None:
    """Build every method of the plan once (its first seed) on its encoder, with every value
    resolved: an unknown method or a setting it cannot take is one error now."""
    seen = set()
    for run in planned:
        if run.pretrained and run.method not in seen:
            seen.add(run.method)
            resolve_pretraining(copy.deepcopy(run.config), 1, method_dirs)


def _finished(run_dir: Path) -> bool:
    return (run_dir / "run.json").is_file() and (
        read_run_record(run_dir).get("status") == "finished"
    )


def claims_dir(planned: list[PlannedRun]) -> Path:
    """Where the processes sharing this comparison's folder claim its work."""
    first = planned[0].config.run
    return Path(first.output_dir) / ".claims"


def run_comparison(planned: list[PlannedRun], method_dirs: tuple = ()) -> list[Path]:
    """Run each planned run; finished runs are skipped, interrupted ones resumed. Several
    processes on one folder split the runs (:func:`ropim.harness.claims.share_work`)."""
    units = []
    for index, run in enumerate(planned, 1):
        run_dir = Path(run.config.run.output_dir) / run.config.run.name
        units.append(
            WorkUnit(
                key=f"pretrain.{run.label}",
                label=f"[{index}/{len(planned)}] {run.label}",
                done=lambda run_dir=run_dir: _finished(run_dir),
                run=lambda run=run: _run_one(run, method_dirs),
            )
        )
    if planned:
        share_work(units, claims_dir(planned))
    return [Path(run.config.run.output_dir) / run.config.run.name for run in planned]


def _run_one(run: PlannedRun, method_dirs: tuple) -> None:
    if not run.pretrained:
        record = {"method": {"name": run.method}, "recipe": {}, "optim": {}}
        write_encoder_run(run.config, build_encoder(run.config), record)
        return
    pretrain(run.config, resume=True, method_dirs=method_dirs)


def summarize(run_dirs: list[Path]) -> str:
    """A plain-text table of what each run cost and reached (read from ``run.json``)."""
    header = f"{'run':<22}{'epochs':>8}{'train s':>9}{'img/s':>8}{'stopped by':>13}  probe"
    lines = [header]
    for run_dir in run_dirs:
        record = read_run_record(run_dir)
        probe = record.get("probe", {}).get("pretrained_accuracy", {})
        probe_text = " ".join(f"{k} {v:.1%}" for k, v in probe.items()) or "-"
        lines.append(
            f"{run_dir.name:<22}{record['epochs_completed']:>8.2f}{record['train_time_s']:>9.0f}"
            f"{record['images_per_s']:>8.0f}{record['budget']['stopped_by']:>13}  {probe_text}"
        )
    return "\n".join(lines)
