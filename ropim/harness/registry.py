"""The method registry: method name -> class, built once per process from three sources,
in this order of precedence:

1. Method packages, declared in the ``ropim.method_packages`` entry-point group (this
   project's ``pyproject.toml`` declares its two): every module of such a package that
   defines a :class:`MaskingMethod` whose ``name`` is the module's own name (a name two
   packages define is an error). Adding a method is adding one such file; nothing else is
   edited.
2. Method classes other installed packages declare in the ``ropim.methods`` group
   (``maskfeat = "their_pkg.maskfeat:MaskFeat"``), loaded when first named.
3. Extra folders (``--method-dir``, ``ROPIM_METHOD_PATH``): a file ``<name>.py`` of the
   folder's listing, executed once (again only when it changes), so a user can try a method
   without touching a package. Names are looked up in listings, never joined into paths.

The harness itself names no method and no package.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import pkgutil
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

PACKAGE_GROUP = "ropim.method_packages"  # packages whose modules each may define one method
ENTRY_POINT_GROUP = "ropim.methods"  # other installed packages declare method classes here


def _defines(module: ModuleType, name: str) -> list[type[MaskingMethod]]:
    """The method classes a module defines under its own name (helpers define none)."""
    return [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, MaskingMethod) and obj.name == name
    ]


def _one_method(module: ModuleType, name: str, where: str) -> type[MaskingMethod] | None:
    found = _defines(module, name)
    if len(found) > 1:
        raise ConfigError(
            f"{where} defines {len(found)} MaskingMethod subclasses with name = {name!r}; keep one"
        )
    return found[0] if found else None


@functools.cache
def package_methods() -> dict[str, type[MaskingMethod]]:
    """Every method of the declared method packages, each module imported once."""
    found: dict[str, type[MaskingMethod]] = {}
    points = importlib.metadata.entry_points(group=PACKAGE_GROUP)
    for package in sorted({point.value for point in points}):
        package_path = importlib.import_module(package).__path__
        for info in pkgutil.iter_modules(package_path):
            if info.ispkg or info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{package}.{info.name}")
            cls = _one_method(module, info.name, str(module.__file__))
            if cls is None:
                continue
            if info.name in found:
                raise ConfigError(
                    f"method {info.name!r} is defined by {found[info.name].__module__} and "
                    f"{module.__name__} ({PACKAGE_GROUP} packages): rename one"
                )
            found[info.name] = cls
    return found


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _entry_point_class(point: importlib.metadata.EntryPoint) -> type[MaskingMethod]:
    """The class another installed package declares under ``ropim.methods``."""
    try:
        cls = point.load()
    except Exception as exc:  # another package's code: name it instead of a traceback
        raise ConfigError(
            f"cannot load method {point.name!r} from entry point {point.value} "
            f"({ENTRY_POINT_GROUP}): {type(exc).__name__}: {exc}"
        ) from None
    if not (inspect.isclass(cls) and issubclass(cls, MaskingMethod) and cls.name == point.name):
        raise ConfigError(
            f"entry point {point.name} = {point.value} ({ENTRY_POINT_GROUP}) must name a "
            f"MaskingMethod subclass with name = {point.name!r}"
        )
    return cls


def _user_folders(method_dirs: Iterable[str | Path] = ()) -> list[Path]:
    method_dirs = list(method_dirs)
    for folder in method_dirs:
        if not Path(folder).is_dir():
            raise ConfigError(f"--method-dir {folder} is not a folder; pass one holding <name>.py")
    env = [p for p in os.environ.get("ROPIM_METHOD_PATH", "").split(os.pathsep) if p]
    return [Path(d) for d in (*method_dirs, *env)]


def _folder_files(folder: Path) -> dict[str, Path]:
    """``name -> file`` for the method files a folder lists."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.py")) if not p.stem.startswith("_")}


@functools.cache
def _user_module(path: Path, modified_ns: int) -> ModuleType:
    """A user's method file, executed once per version of it."""
    module_name = f"ropim_user_methods.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a user's file: name it instead of a traceback
        raise ConfigError(f"cannot load method file {path}: {type(exc).__name__}: {exc}") from None
    return module


def _user_method(path: Path) -> type[MaskingMethod] | None:
    path = path.resolve()
    return _one_method(_user_module(path, path.stat().st_mtime_ns), path.stem, str(path))


def available_methods(method_dirs: Iterable[str | Path] = ()) -> list[str]:
    """Every method the registry can build: the method packages', the entry points', and the
    extra folders' files that define a method of their own name."""
    names = set(package_methods()) | set(_entry_points())
    for folder in _user_folders(method_dirs):
        names.update(n for n, path in _folder_files(folder).items() if _user_method(path))
    return sorted(names)


def method_class(name: str, method_dirs: Iterable[str | Path] = ()) -> type[MaskingMethod]:
    """The class registered as ``name`` (see the module's docstring for the order)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(
            f"method name {name!r} (method.name) must be a Python identifier such as 'ropim' "
            f"or 'my_method': it names the file <name>.py in a method folder"
        )
    if name in package_methods():
        return package_methods()[name]
    point = _entry_points().get(name)
    if point is not None:
        return _entry_point_class(point)
    for folder in _user_folders(method_dirs):
        path = _folder_files(folder).get(name)
        if path is not None:
            cls = _user_method(path)
            if cls is None:
                raise ConfigError(
                    f"{path} must define a MaskingMethod subclass with name = {name!r}"
                )
            return cls
    raise ConfigError(
        f"unknown method name {name!r} (method.name); available: "
        f"{', '.join(available_methods(method_dirs))}. A new method is one file "
        f"baselines/<name>.py defining a MaskingMethod subclass with name = '<name>'."
    )


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
