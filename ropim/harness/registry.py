"""Find a masking method by name: one module per method, named after it, in a method package
(``ropim.method`` holds ROPIM, ``baselines`` the others) or in an extra folder. Every method,
ROPIM included, is found the same way.

Extra folders come from ``method_dirs`` arguments or the ``ROPIM_METHOD_PATH`` environment
variable (``os.pathsep``-separated), so a user can try a method without touching the package.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import typing
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from ropim.harness.backbone import ViTBackbone
from ropim.harness.config import coerce_setting
from ropim.harness.errors import ConfigError
from ropim.harness.methods import MaskingMethod

METHOD_PACKAGES = ("ropim.method", "baselines")  # importable packages of method modules


def _package_dirs() -> dict[Path, str]:
    """Folder of each method package -> its import name."""
    found = {}
    for package in METHOD_PACKAGES:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            found[Path(folder).resolve()] = package
    return found


def _search_dirs(method_dirs: Iterable[str | Path] = ()) -> list[Path]:
    method_dirs = list(method_dirs)
    for folder in method_dirs:
        if not Path(folder).is_dir():
            raise ConfigError(f"--method-dir {folder} is not a folder; pass one holding <name>.py")
    env = [p for p in os.environ.get("ROPIM_METHOD_PATH", "").split(os.pathsep) if p]
    return [*_package_dirs(), *(Path(d) for d in method_dirs), *(Path(d) for d in env)]


def _candidates(method_dirs: Iterable[str | Path]) -> set[str]:
    names = set()
    for folder in _search_dirs(method_dirs):
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    return names


def _defines(module: ModuleType, name: str) -> list[type[MaskingMethod]]:
    return [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, MaskingMethod) and obj.name == name
    ]


ENTRY_POINT_GROUP = "ropim.methods"  # other installed packages declare methods here


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _entry_point_class(name: str) -> type[MaskingMethod] | None:
    """The class another installed package declares as ``name`` under ``ropim.methods``."""
    point = _entry_points().get(name)
    if point is None:
        return None
    try:
        cls = point.load()
    except Exception as exc:  # another package's code: name it instead of a traceback
        raise ConfigError(
            f"cannot load method {name!r} from entry point {point.value} ({ENTRY_POINT_GROUP}): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if not (inspect.isclass(cls) and issubclass(cls, MaskingMethod) and cls.name == name):
        raise ConfigError(
            f"entry point {name} = {point.value} ({ENTRY_POINT_GROUP}) must name a "
            f"MaskingMethod subclass with name = {name!r}"
        )
    return cls


def available_methods(method_dirs: Iterable[str | Path] = ()) -> list[str]:
    """Modules that define a method of their own name (helpers such as the sketch do not), and
    methods other installed packages declare under the ``ropim.methods`` entry point."""
    names = _candidates(method_dirs)
    found = {n for n in names if _defines(_import_method_module(n, method_dirs), n)}
    return sorted(found | set(_entry_points()))


def _import_method_module(name: str, method_dirs: Iterable[str | Path]) -> ModuleType:
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(
            f"method name {name!r} (method.name) must be a Python identifier such as 'ropim' "
            f"or 'my_method': it names the file <name>.py in a method folder"
        )
    packages = _package_dirs()
    for folder in _search_dirs(method_dirs):
        path = folder / f"{name}.py"
        if not path.is_file():
            continue
        if folder.resolve() in packages:
            return importlib.import_module(f"{packages[folder.resolve()]}.{name}")
        module_name = f"ropim_user_methods.{name}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # a user's file: name it instead of a traceback
            raise ConfigError(
                f"cannot load method file {path}: {type(exc).__name__}: {exc}"
            ) from None
        return module
    raise ConfigError(
        f"unknown method name {name!r} (method.name); available: "
        f"{', '.join(available_methods(method_dirs))}. A new method is one file "
        f"baselines/<name>.py defining a MaskingMethod subclass with name = '<name>'."
    )


def method_class(name: str, method_dirs: Iterable[str | Path] = ()) -> type[MaskingMethod]:
    if name not in _candidates(method_dirs) and isinstance(name, str) and name.isidentifier():
        declared = _entry_point_class(name)
        if declared is not None:
            return declared
    module = _import_method_module(name, method_dirs)
    found = _defines(module, name)
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
        hints = typing.get_type_hints(cls.__init__)
    except (NameError, TypeError):  # an annotation that does not resolve: values pass unchecked
        hints = {}
    for key, value in settings.items():  # each setting against its annotation, named
        if key in hints:
            settings[key] = coerce_setting(value, hints[key], f"method.{key}")
    try:
        method = cls(backbone, **settings)
    except (ValueError, TypeError) as exc:  # a value of the wrong kind or range
        raise ConfigError(f"method {name!r}: bad setting in {settings}: {exc}") from None
    method.settings = {"name": name} | {
        k: v for k, v in bound.arguments.items() if k not in ("self", "backbone")
    }
    return method
