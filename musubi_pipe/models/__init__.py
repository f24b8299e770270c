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
    "hunyuan_video": "musubi_pipe.models.hunyuan_video.family:FAMILY",
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
