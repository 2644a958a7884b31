"""The package layers import one way, checked on the source (function-level imports too)."""

from __future__ import annotations

import ast
import zipfile
from pathlib import Path

from tests.conftest import PROJECT_ROOT

# Folders beside the team's checkout that a clone lacks; the project must not point into them
# (spelled in two parts so that this guard is not itself a citation).
TEAM_ONLY = ("../" + "shared", "spec" + "/")

# layer -> the layers it may import (besides itself)
ALLOWED = {
    "ropim.harness": set(),
    "ropim.method": {"ropim.harness"},
    "baselines": {"ropim.harness"},
    "downstream": {"ropim.harness"},
    "ropim.suite": {"ropim.harness", "ropim.method", "baselines", "downstream"},
    "ropim.cli": {"ropim.harness", "ropim.suite", "downstream"},
}


def _layer(module: str) -> str | None:
    if module in ("ropim", "ropim.__main__"):  # the package root and `python -m ropim`
        return "ropim.cli"
    return next(
        (layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")), None
    )


def _module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _imported_names(source: str) -> set[str]:
    """Each name ``from package import name`` brings, which may be a module of the package."""
    return {
        f"{node.module}.{alias.name}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    }


def _sources() -> list[Path]:
    tops = ("ropim", "baselines", "downstream")
    return [p for top in tops for p in (PROJECT_ROOT / top).rglob("*.py")]


def _violations(modules: dict[str, str]) -> list[str]:
    """``module name -> source``: every import that points up or sideways between layers."""
    found = []
    for module, source in modules.items():
        own = _layer(module)
        assert own is not None, f"{module} belongs to no layer; add it to ALLOWED"
        for name in _imports(source):
            target = _layer(name)
            if target is not None and target != own and target not in ALLOWED[own]:
                found.append(f"{module} imports {name}")
    return found


def test_every_module_imports_only_the_layers_below_it():
    modules = {_module_name(path): path.read_text() for path in _sources()}
    assert len(modules) > 40
    assert _violations(modules) == []


def test_the_checker_sees_violations_inside_functions_too():
    probe = "def f():\n    from ropim.suite.report import write_report\n"
    assert _violations({"ropim.harness.probe_module": probe}) == [
        "ropim.harness.probe_module imports ropim.suite.report"
    ]
    assert _violations({"baselines.x": "import downstream.tasks"}) == [
        "baselines.x imports downstream.tasks"
    ]
    assert _violations({"ropim.suite.x": "import baselines.mae"}) == []


def test_the_registries_are_routes_the_checker_sees():
    """Methods come from the packages ``pyproject.toml`` declares as entry points (the harness
    reads the group, and names no method package in its code); tasks from the imports of
    ``downstream/tasks.py``; each task's settings and run from imports inside its loaders."""
    import tomllib

    from downstream.tasks import all_tasks
    from ropim.harness.registry import PACKAGE_GROUP, available_methods, method_class

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    declared = project["entry-points"][PACKAGE_GROUP]
    assert set(declared.values()) == {"ropim.method", "baselines"}
    method_layers = {"ropim.method", "baselines"}
    for name in available_methods():
        assert _layer(method_class(name).__module__) in method_layers, name
    for path in (PROJECT_ROOT / "ropim" / "harness").rglob("*.py"):
        literals = {
            node.value
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        assert not literals & method_layers, path
    registry = _imported_names((PROJECT_ROOT / "downstream" / "tasks.py").read_text())
    for spec in all_tasks():
        package = f"downstream.{spec.name}"
        assert package in registry
        loaders = _imports((PROJECT_ROOT / "downstream" / spec.name / "__init__.py").read_text())
        assert any(m.startswith(package + ".") for m in loaders), spec.name


def test_nothing_cites_files_a_clone_does_not_hold():
    texts = [p.read_text() for p in _sources()]
    texts += [p.read_text() for p in (PROJECT_ROOT / "configs").glob("*.yaml")]
    texts += [(PROJECT_ROOT / "README.md").read_text()]
    texts += [p.read_text() for p in (PROJECT_ROOT / "docs").glob("*.md")]
    for text in texts:
        assert not any(marker in text for marker in TEAM_ONLY), "cites a team-only folder"


def test_wheel_ships_every_method_and_task(tmp_path):
    import shutil
    import subprocess
    import sys

    source = tmp_path / "source"  # setuptools builds in the source tree: build a copy
    for name in ("ropim", "baselines", "downstream"):
        shutil.copytree(
            PROJECT_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "baselines/maskfeat.py" in names and "baselines/data2vec.py" in names
    assert "baselines/mae.py" in names and "downstream/segmentation/__init__.py" in names
