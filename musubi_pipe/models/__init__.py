"""Architecture registry: `model.arch` names a family; stages reach models only through it.

A family module registers itself lazily: the registry maps a name to an import path, so
`import musubi_pipe.models` never imports torch. Adding an architecture means adding one line here
and one package under models/.
"""

from __future__ import annotations

import importlib

from musubi_pipe.errors import ConfigError

# arch name -> "module:attribute" of its Family object
_FAMILIES: dict[str, str] = {
    "wan": "musubi_pipe.models.wan.family:FAMILY",
}


def family_names() -> list[str]:
    """Return the registered architecture names, sorted."""
    return sorted(_FAMILIES)


def get_family(arch: str):
    """Return the Family object for `arch`; raise ConfigError naming `model.arch` if unknown."""
    if arch not in _FAMILIES:
        raise ConfigError([("model.arch", f"unknown architecture {arch!r}; choose one of {family_names()}")])
    module_name, attr = _FAMILIES[arch].split(":")
    return getattr(importlib.import_module(module_name), attr)
