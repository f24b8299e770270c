"""Architecture registry: `model.arch` names a family; stages reach models only through it.

Every package `models/<arch>/` with a `family.py` defining `FAMILY` (a models.base.Family whose `name` is
`<arch>`) is an architecture: adding one means adding its package, nothing here. Families are imported
only when asked for, and their modules import torch only inside methods, so `import musubi_pipe.models`
stays cheap.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from musubi_pipe.errors import ConfigError

# arch name -> "module:attribute" of its Family object: every models/<arch>/family.py
_FAMILIES: dict[str, str] = {
    folder.name: f"musubi_pipe.models.{folder.name}.family:FAMILY"
    for folder in sorted(Path(__file__).parent.iterdir())
    if (folder / "family.py").is_file() and not folder.name.startswith(("_", "."))
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


def lora_namings() -> list:
    """Every family's LoraNaming (how its LoRA files spell modules), for reading files of any architecture."""
    return [get_family(name).lora_naming for name in family_names()]


def lora_naming_for(names, metadata=None):
    """The LoraNaming of the architecture that module `names` (official or underscored) belong to: the file's
    `ss_base_model_version` when it names a family, else the first family claiming the names (Wan otherwise)."""
    arch = (metadata or {}).get("ss_base_model_version")
    if arch in _FAMILIES:
        return get_family(arch).lora_naming
    names = list(names)
    for naming in lora_namings():
        if naming.claims(names):
            return naming
    return get_family("wan").lora_naming
