"""Files shipped inside the package, reachable from an installed copy: the documentation
(``ropim docs``) and the SLURM batch scripts (``ropim slurm``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ropim.harness.errors import ConfigError


def _files(folder: str, suffix: str) -> dict[str, Path]:
    root = resources.files("ropim") / folder
    return {
        Path(item.name).stem: Path(str(item))
        for item in sorted(root.iterdir(), key=lambda item: item.name)
        if item.name.endswith(suffix)
    }


def _named(kind: str, folder: str, suffix: str, name: str) -> Path:
    found = _files(folder, suffix)
    key = Path(name).stem
    if key not in found:
        raise ConfigError(f"no {kind} named {name!r}; choose one of: {', '.join(found)}")
    return found[key]


def doc_pages() -> dict[str, str]:
    """Each page's name and its first heading."""
    pages = {}
    for name, path in _files("docs", ".md").items():
        lines = path.read_text().splitlines()
        pages[name] = next((line.lstrip("# ") for line in lines if line.startswith("#")), "")
    return pages


def doc_page(name: str) -> Path:
    return _named("documentation page", "docs", ".md", name)


def slurm_scripts() -> dict[str, str]:
    """Each batch script's name and its first comment line."""
    scripts = {}
    for name, path in _files("slurm", ".sbatch").items():
        lines = path.read_text().splitlines()[1:]
        first = next((line.lstrip("# ") for line in lines if line.startswith("# ")), "")
        scripts[name] = first.split(":")[0].split(";")[0]
    return scripts


def slurm_script(name: str) -> Path:
    return _named("batch script", "slurm", ".sbatch", name)
