"""Find the config groups (conf/) and recipes (recipes/): the repo's top-level folders in a
source checkout or editable install, or the copies packed into the wheel (_conf/, _recipes/)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]


def _find(top_level: str, packed: str) -> Path:
    for candidate in (_PACKAGE.parent / top_level, _PACKAGE / packed):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"musubi_pipe: cannot find its {top_level}/ folder next to {_PACKAGE}")


def conf_dir() -> Path:
    """Return the folder holding config.yaml and the config groups."""
    return _find("conf", "_conf")


def recipes_dir() -> Path:
    """Return the folder holding the bundled recipes."""
    return _find("recipes", "_recipes")
