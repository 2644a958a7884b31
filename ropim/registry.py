"""Find a masking method by name: ``ropim`` here, any ``baselines/<name>.py``, or extra folders.

Extra folders come from ``method_dirs`` arguments or the ``ROPIM_METHOD_PATH`` environment
variable (``os.pathsep``-separated), so a user can try a method without touching the package.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from ropim.backbone import ViTBackbone
from ropim.errors import ConfigError
from ropim.method import MaskingMethod

BUILTIN_METHODS = {"ropim": "ropim.ropim"}
BASELINES_DIR = Path(__file__).resolve().parent.parent / "baselines"


def _search_dirs(method_dirs: Iterable[str | Path] = ()) -> list[Path]:
    env = [p for p in os.environ.get("ROPIM_METHOD_PATH", "").split(os.pathsep) if p]
    return [BASELINES_DIR, *(Path(d) for d in method_dirs), *(Path(d) for d in env)]


def available_methods(method_dirs: Iterable[str | Path] = ()) -> list[str]:
    names = set(BUILTIN_METHODS)
    for folder in _search_dirs(method_dirs):
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    return sorted(names)


def _import_method_module(name: str, method_dirs: Iterable[str | Path]) -> ModuleType:
    if name in BUILTIN_METHODS:
        return importlib.import_module(BUILTIN_METHODS[name])
    for folder in _search_dirs(method_dirs):
        path = folder / f"{name}.py"
        if not path.is_file():
            continue
        if folder.resolve() == BASELINES_DIR:
            return importlib.import_module(f"baselines.{name}")
        module_name = f"ropim_user_methods.{name}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        return module
    raise ConfigError(
        f"unknown method name {name!r} (method.name); available: "
        f"{', '.join(available_methods(method_dirs))}. A new method is one file "
        f"baselines/<name>.py defining a MaskingMethod subclass with name = '<name>'."
    )


def method_class(name: str, method_dirs: Iterable[str | Path] = ()) -> type[MaskingMethod]:
    module = _import_method_module(name, method_dirs)
    found = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, MaskingMethod) and obj.name == name
    ]
    if len(found) != 1:
        raise ConfigError(
            f"{module.__file__} must define exactly one MaskingMethod subclass with "
            f"name = {name!r}; found {len(found)}"
        )
    return found[0]


def build_method(
    settings: dict[str, Any], backbone: ViTBackbone, method_dirs: Iterable[str | Path] = ()
) -> MaskingMethod:
    """Instantiate ``settings['name']`` with the remaining keys as its keyword arguments."""
    settings = dict(settings)
    name = settings.pop("name", None)
    if not name:
        raise ConfigError("method.name is missing; e.g. method.name=ropim")
    cls = method_class(name, method_dirs)
    signature = inspect.signature(cls.__init__)
    try:
        bound = signature.bind(None, backbone, **settings)
    except TypeError as exc:
        allowed = [p for p in signature.parameters if p not in ("self", "backbone")]
        keys = ", ".join(f"method.{key}" for key in allowed)
        message = f"bad settings for method {name!r}: {exc}. Allowed keys: {keys}"
        raise ConfigError(message) from None
    bound.apply_defaults()
    try:
        method = cls(backbone, **settings)
    except ValueError as exc:
        raise ConfigError(f"method {name!r}: {exc}") from None
    method.settings = {"name": name} | {
        k: v for k, v in bound.arguments.items() if k not in ("self", "backbone")
    }
    return method
