"""Typed run configuration: YAML file + ``key.sub=value`` overrides, unknown keys rejected."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ropim.harness.architecture_values import IMAGE_CHANNELS, check_model_values
from ropim.harness.errors import ConfigError, check_name


@dataclass
class RunSection:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0


@dataclass
class ModelSection:
    name: str = "vit_base_patch16_224"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    drop_path: float | None = None  # None: the method's recipe (pre-training)
    # MAE's encoder: "sincos" fixes a 2-D sin-cos position embedding during pre-training,
    # "mae" initialises xavier-uniform (models_mae.py:37,67-90); defaults are timm's ViT.
    position: str = "learned"
    init: str = "timm"
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model


@dataclass
class DataSection:
    dataset: str = "mnist"  # "mnist" (bundled) or "imagefolder"
    root: str | None = None  # imagefolder: folder holding <split>/<class>/*.jpg
    split: str = "train"
    val_fraction: float = 0.2  # mnist: share of the 5,000 digits held out (fixed split)
    limit: int | None = None  # use a fixed random subset of N images (quick tests)
    crop_scale: list[float] | None = None  # None: the method's recipe
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])
    hflip: float = 0.5
    # The pre-training crop's resampling; None: the method's recipe. Evaluation views always
    # resize bicubic, as every official evaluation does.
    interpolation: str | None = None
    # Evaluation view: resize the shorter side to img_size / eval_crop_pct, centre-crop img_size.
    # None: 0.875 for image folders (Resize 256 -> CenterCrop 224, MAE util/datasets.py:52-61,
    # ROPIM data_finetune.py:139-146), 1.0 for the bundled digits (already centred at 28 px).
    eval_crop_pct: float | None = None
    mean: list[float] | None = None  # None: the dataset's own statistics
    std: list[float] | None = None
    num_workers: int = 0
    # Image folders: "scaled" crops in the JPEG decoder's space (libjpeg-turbo decodes at 1/2–1/8
    # scale when the crop allows, uint8 until the batch); "full": Pillow decodes every pixel,
    # then torchvision crops and normalises per image.
    decode: str = "scaled"
    on_bad_image: str = "error"  # or "skip": leave unreadable files out, each one recorded


@dataclass
class TrainSection:
    epochs: float = 10
    time_budget_s: float | None = None  # stop (and save) once training used this many seconds
    # Total training FLOPs of a pre-training (e.g. 3.0e15): its steps are floor(budget / one
    # step's counted FLOPs) and the schedule spans them; when set, train.epochs is not used.
    flops_budget: float | None = None
    batch_size: int = 128  # per device
    base_lr: float | None = None  # None: the method's recipe
    lr_batch_divisor: int | None = None
    warmup_epochs: float | None = None
    min_lr: float | None = None  # absolute; None: the recipe's base_min_lr, scaled like the lr
    warmup_lr: float | None = None  # absolute; None: the recipe's base_warmup_lr, scaled
    schedule: str | None = None  # cosine or multistep; None: the method's recipe
    decay_at: list[float] | None = None  # multistep: fractions of training where lr ×decay_rate
    weight_decay: float | None = None
    betas: list[float] | None = None
    # max gradient norm; null: the method's recipe (ROPIM, SimMIM: 5); false: no clipping
    clip_grad: float | bool | None = None
    precision: str = "auto"  # auto: bf16-mixed on CUDA, 32-true on CPU
    accelerator: str = "auto"
    checkpoint_every: int = 200  # steps
    keep_checkpoints: int = 2
    log_every: int = 10
    reconstruction_images: int = 8


@dataclass
class ProbeSection:
    enabled: bool = False  # logistic-regression probe vs. random init after pre-training
    max_iter: int = 2000
    knn_every: float = 0  # epochs between k-NN monitors during pre-training (0: off)
    knn_k: int = 20
    knn_train_images: int = 10_000  # a fixed subset of the train split as the k-NN bank


@dataclass
class LogSection:
    """Trackers beside the CSVs (``ropim.harness.tracking``)."""

    tensorboard: bool = True  # event files in <run>/tensorboard (`tensorboard --logdir runs`)
    wandb: bool = False  # needs the `wandb` extra; offline unless WANDB_MODE=online
    wandb_project: str = "ropim-bench"


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "ropim"})
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation, converting the few safe cases."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if annotation is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (inner,) = typing.get_args(annotation)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise UnsupportedType(f"{key}: unsupported setting type {annotation!r}")


class UnsupportedType(ConfigError):
    """An annotation the config types do not cover (a tuple, a custom class)."""


def coerce_setting(value: Any, annotation: Any, key: str) -> Any:
    """``value`` checked against ``annotation`` (a method's constructor argument): the config's
    types are checked and converted as in every section; other annotations pass unchecked."""
    try:
        return _coerce(value, annotation, key)
    except UnsupportedType:
        return value


def build_section(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """A dataclass from a raw mapping; unknown keys and ill-typed values name the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; allowed under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a mapping, got {value!r}")
            kwargs[name] = build_section(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


MAX_YAML_CHARS = 1_000_000  # a config is a few kB; bigger is a wrong file


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: a few nested aliases (a "billion laughs") expand
    to gigabytes once a config is copied or printed; ``base:`` shares settings instead."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"an alias (*{event.anchor}) is not allowed in a config; repeat the "
                "value or share it through 'base:'", event.start_mark
            )  # fmt: skip
        return super().compose_node(parent, index)


def safe_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML (no aliases, bounded size); errors name ``where`` and the
    line."""
    if len(text) > MAX_YAML_CHARS:
        raise ConfigError(f"{where} holds {len(text):,} characters; a config is at most 1 MB")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{where}{at} is not valid YAML: {problem}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, value = text.split("=", 1)
    if not key or "" in key.split("."):
        raise ConfigError(f"override {text!r} has an empty key")
    parsed = safe_yaml(value, f"the value of override {text[:80]!r}") if value != "" else None
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return raw


PRESETS = "presets"  # folder of the bundled presets inside the ropim package


def bundled_presets() -> dict[str, Path]:
    """The presets shipped inside the package, by name (file name without ``.yaml``)."""
    from importlib import resources

    folder = resources.files("ropim") / PRESETS
    if not folder.is_dir():
        return {}
    return {
        Path(item.name).stem: Path(str(item))
        for item in sorted(folder.iterdir(), key=lambda item: item.name)
        if item.name.endswith(".yaml")
    }


def find_config(path: str | Path) -> Path:
    """An existing file wins; otherwise a bundled preset of that name (``ropim_tiny``,
    ``ropim_tiny.yaml`` or ``configs/ropim_tiny.yaml``), so presets work installed, outside the
    checkout."""
    given = Path(path).expanduser()
    if given.is_file():
        return given
    presets = bundled_presets()
    name = given.stem if given.suffix in (".yaml", ".yml") else given.name
    if name in presets:
        return presets[name]
    raise ConfigError(
        f"config file not found: {path}; give a YAML file or a bundled preset name "
        f"({', '.join(presets) or 'none bundled'}; ropim configs lists them)"
    )


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, section by section (mappings merge, anything else
    replaces; a mapping holding ``_replace: true`` replaces its base mapping whole, e.g. a
    sibling preset's own ``compare.methods``)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and value.get("_replace") is True:
            out[key] = {k: v for k, v in value.items() if k != "_replace"}
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping from ``path`` (or the bundled preset of that name); a missing file or a
    syntax error is one line naming the file and the line. ``base: OTHER`` (a file beside this
    one, or a bundled preset name) inherits OTHER, merged section by section under this file."""
    path = find_config(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: base presets form a cycle ({' -> '.join(map(str, _seen))})")
    raw = _read_mapping(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must name one preset file, got {base!r}")
    beside = path.parent / base
    parent = read_yaml(beside if beside.is_file() else base, (*_seen, path.resolve()))
    return merged(parent, raw)


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; pass a YAML config") from None
    try:
        raw = safe_yaml(text, str(path))
    except ConfigError as exc:
        raise ConfigError(f"{exc}; fix the file") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides or []))
    return load_config_dict(raw, str(path) if path is not None else "overrides")


def load_config_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Validate a raw mapping; ``source`` says where it came from in error messages."""
    try:
        config = build_section(Config, raw, "")
        check_values(config)
        return config
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")


def check_clip_grad(value: float | bool | None, key: str) -> None:
    """A max norm must be positive; ``false`` turns clipping off, ``null`` keeps the recipe's
    (0 would zero every gradient)."""
    if value is True or (value is not None and value is not False and not value > 0):
        raise ConfigError(
            f"{key}={value!r} must be a positive max norm; false turns clipping off, "
            f"null keeps the method's recipe value"
        )


def check_values(config: Config) -> None:
    """Values of the right type that still cannot work (a zero batch, a negative rate, a
    number that is not finite, a clipping norm of 0)."""
    check_name("run.name", config.run.name)
    train = config.train
    if train.precision not in PRECISIONS:
        raise ConfigError(f"train.precision={train.precision!r} must be one of {PRECISIONS}")
    if train.accelerator not in ACCELERATORS:
        raise ConfigError(f"train.accelerator={train.accelerator!r} must be one of {ACCELERATORS}")
    check_clip_grad(train.clip_grad, "train.clip_grad")
    if config.data.on_bad_image not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_image={config.data.on_bad_image!r} must be error or skip")
    if config.data.decode not in ("scaled", "full"):
        raise ConfigError(f"data.decode={config.data.decode!r} must be scaled or full")
    if train.schedule not in (None, "cosine", "multistep"):
        raise ConfigError(f"train.schedule={train.schedule!r} must be cosine or multistep")
    if train.decay_at is not None and not all(0 < f < 1 for f in train.decay_at):
        raise ConfigError(
            f"train.decay_at={train.decay_at} must hold fractions of training between 0 and 1"
        )
    if config.data.interpolation not in (None, "bilinear", "bicubic"):
        raise ConfigError(
            f"data.interpolation={config.data.interpolation!r} must be bilinear or bicubic"
        )
    crop_pct = config.data.eval_crop_pct
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise ConfigError(f"data.eval_crop_pct={crop_pct} must be in (0, 1] (0.875: 256 -> 224)")
    scale = config.data.crop_scale
    if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise ConfigError(f"data.crop_scale={scale} must be [low, high] with 0 < low <= high <= 1")
    positive = {
        "train.epochs": train.epochs,
        "train.batch_size": train.batch_size,
        "train.log_every": train.log_every,
        "train.checkpoint_every": train.checkpoint_every,
        "train.keep_checkpoints": train.keep_checkpoints,
        "train.base_lr": train.base_lr,
        "train.lr_batch_divisor": train.lr_batch_divisor,
        "train.time_budget_s": train.time_budget_s,
        "train.flops_budget": train.flops_budget,
        "data.limit": config.data.limit,
        "model.img_size": config.model.img_size,
        "model.patch_size": config.model.patch_size,
        "model.in_chans": config.model.in_chans,
    }
    for key, value in positive.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{key}={value} must be a positive, finite number")
    if train.flops_budget is not None and train.time_budget_s is not None:
        raise ConfigError(
            f"train.flops_budget={train.flops_budget:g} and train.time_budget_s="
            f"{train.time_budget_s:g} are two budgets: set one (FLOPs are the same on every "
            f"machine, seconds are not)"
        )
    at_least_zero = {
        "train.min_lr": train.min_lr,
        "train.warmup_lr": train.warmup_lr,
        "train.warmup_epochs": train.warmup_epochs,
        "train.weight_decay": train.weight_decay,
        "model.drop_path": config.model.drop_path,
        "data.num_workers": config.data.num_workers,
        "train.reconstruction_images": train.reconstruction_images,
        "probe.knn_every": config.probe.knn_every,
    }
    for key, value in at_least_zero.items():
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{key}={value} must be a finite number, zero or more")
    _check_data(config.data)
    _check_train_extra(train)
    probe = config.probe
    for key, value in (("probe.knn_k", probe.knn_k), ("probe.max_iter", probe.max_iter),
                       ("probe.knn_train_images", probe.knn_train_images)):  # fmt: skip
        if not value >= 1:
            raise ConfigError(f"{key}={value} must be a whole number, 1 or more")
    model = config.model
    check_model_values(model.img_size, model.patch_size, model.in_chans, model.kwargs)


def _check_data(data: DataSection) -> None:
    ratio = data.crop_ratio
    if not (len(ratio) == 2 and all(math.isfinite(r) for r in ratio) and 0 < ratio[0] <= ratio[1]):
        raise ConfigError(
            f"data.crop_ratio={ratio} must be [low, high] aspect ratios with 0 < low <= high "
            f"(the recipes' [0.75, 1.3333])"
        )
    if not 0 <= data.hflip <= 1:
        raise ConfigError(f"data.hflip={data.hflip} is a probability: from 0 to 1")
    if not 0 < data.val_fraction < 1:
        raise ConfigError(
            f"data.val_fraction={data.val_fraction} must lie strictly between 0 and 1"
        )
    for key, values in (("data.mean", data.mean), ("data.std", data.std)):
        if values is None:
            continue
        if len(values) != IMAGE_CHANNELS or not all(math.isfinite(v) for v in values):
            raise ConfigError(f"{key}={values} must be {IMAGE_CHANNELS} finite numbers (R, G, B)")
        if key == "data.std" and not all(v > 0 for v in values):
            raise ConfigError(f"{key}={values} must be positive: images are divided by it")


def _check_train_extra(train: TrainSection) -> None:
    betas = train.betas
    if betas is not None and not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        raise ConfigError(
            f"train.betas={betas} must be two numbers in [0, 1) (Adam's beta1, beta2; e.g. "
            f"[0.9, 0.95]), or null for the method's recipe"
        )


def save_config(config: Config, path: str | Path) -> None:
    try:
        Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    except OSError as exc:
        raise ConfigError(
            f"cannot write {path} ({exc.strerror or exc}): choose a writable run.output_dir"
        ) from None
