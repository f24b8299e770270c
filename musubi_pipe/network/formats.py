"""LoRA key layouts: read the files other tools write, write musubi, ComfyUI, official or diffusers layout.

Used by the `convert` tool (musubi_pipe.tools.convert) and by anything that needs a LoRA's weights whatever
layout its file uses (tests, inspection). Every conversion goes through one canonical in-memory form, keyed by
the official module path of the model (`blocks.0.self_attn.q`, `double_blocks.0.img_attn_qkv`):

    {"kind": "lora", "down": A [rank, in], "up": B [out, rank], "alpha": float}
    {"kind": "loha" | "lokr", "tensors": {"hada_w1_a": ..., ...} | {"lokr_w1": ..., ...}, "alpha": float}

    canonical, source_format = read_lora(tensors)          # any layout below, detected from the keys
    tensors = write_lora(canonical, "comfy")                # FORMATS: musubi | comfy | diffusers
    convert_file("in.safetensors", "out.safetensors", "diffusers", dtype="bfloat16")
    deltas = delta_weights(canonical)                       # {module: ΔW = up @ down * alpha / rank}

Module names are the architecture's (models.base.LoraNaming, found by models.lora_naming_for from the file's
`ss_base_model_version` or its names): underscored names are resolved and diffusers names translated through it.

Written layouts (FORMATS; what loads where is in /work/shared/reference/lora-formats.md sections 1 and 3; each
family lists the ones it writes in LoraNaming.save_formats):
- musubi: `lora_unet_<official path, . -> _>.lora_down.weight` / `.lora_up.weight` / `.alpha`, LoHa `.hada_*`,
  LoKr `.lokr_*` (+ `.alpha`). musubi-tuner, this project and ComfyUI load it; diffusers only when every block has
  all its linears (its `lora_unet_` converter is strict).
- comfy: `diffusion_model.<official path>.lora_A.weight` / `.lora_B.weight` with alpha baked in and no alpha key
  (musubi-tuner's `convert_lora.py --target other`). ComfyUI and diffusers (its `diffusion_model.` converter,
  where missing modules are fine) both load it, also for a LoRA on a subset of the modules. LoHa/LoKr keep their
  `hada_*` / `lokr_*` names and `.alpha` there: ComfyUI loads them, diffusers loads no LoHa/LoKr at all.
- official: `diffusion_model.<official path>.lora_down.weight` / `.lora_up.weight` / `.alpha`: ComfyUI and
  musubi-tuner (its diffusers-format converter keeps the alphas) load it; HunyuanVideo's default, because
  ComfyUI matches HunyuanVideo's `lora_unet_` names only for some modules (lora-formats.md 1.2).
- diffusers: `transformer.<path diffusers' loader expects>.lora_A.weight` / `.lora_B.weight`, alpha baked in, no
  alpha key, LoRA only. Wan: diffusers paths of the block linears (models/wan/names.py); HunyuanVideo: official
  paths (diffusers converts them itself), with an img_attn_qkv module and none it mishandles.

Key rules:
- The scale of a LoRA is alpha / rank (rank = rows of `down`); a file without alpha means alpha = rank, as in
  ComfyUI and diffusers (an alpha of 0 too, as the trainer reads it). Baking multiplies A and B each by
  sqrt(alpha / rank). convert_file records the baked alphas in the metadata (BAKED_ALPHA_KEY) and read_lora
  undoes the baking when it is given that metadata, so musubi -> comfy -> musubi returns the original tensors.
- Module names are official Wan paths. diffusers paths exist only for the block linears and are translated with
  models/wan/names.py; official paths of other modules (`head.head`, ...) pass through unchanged between musubi
  and comfy; underscored names (`lora_unet_head_head`) are read back through BLOCK_SUBPATHS / OTHER_LINEARS.
- Read also: Wan-Fun `lora_unet__blocks_...` (double underscore), `diffusion_model.` keys spelt with
  lora_down/lora_up (+ alpha), diffusion-pipe (= comfy layout), ai-toolkit (`diffusion_model.` or
  `transformer.` + diffusers paths, possibly `.alpha`), and diffusers files whose `lora_adapter_metadata` header
  sets lora_alpha. Any other key (`.diff`, `.diff_b`, `.dora_scale`, Tucker `_t1`/`_t2`) is a UserError.

Importing this module imports no torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from musubi_pipe.errors import UserError
from musubi_pipe.models import lora_naming_for

log = logging.getLogger("musubi_pipe")


@dataclass(frozen=True)
class Layout:
    """How one written format spells a module: key prefix, module naming, LoRA suffixes, alpha handling."""

    prefix: str
    naming: str  # "underscored" (official path, . -> _), "official" (dotted) or "diffusers" (dotted)
    down: str
    up: str
    bake_alpha: bool  # True: A and B carry sqrt(alpha/rank) each and no LoRA alpha key is written
    lycoris: bool  # whether LoHa/LoKr can be written
    description: str


FORMATS: dict[str, Layout] = {
    "musubi": Layout("lora_unet_", "underscored", "lora_down.weight", "lora_up.weight", False, True,
                     "lora_unet_<module>.lora_down/lora_up.weight + .alpha (musubi-tuner, ComfyUI)"),
    "comfy": Layout("diffusion_model.", "official", "lora_A.weight", "lora_B.weight", True, True,
                    "diffusion_model.<module>.lora_A/lora_B.weight, alpha baked in (ComfyUI, diffusers)"),
    "official": Layout("diffusion_model.", "official", "lora_down.weight", "lora_up.weight", False, True,
                       "diffusion_model.<module>.lora_down/lora_up.weight + .alpha (ComfyUI, musubi-tuner)"),
    "diffusers": Layout("transformer.", "diffusers", "lora_A.weight", "lora_B.weight", True, False,
                        "transformer.<diffusers module>.lora_A/lora_B.weight, alpha baked in (diffusers/PEFT)"),
}

# What read_lora reports as the source format, by (key prefix, module naming found after it).
SOURCE_FORMATS: dict[tuple[str, str], str] = {
    ("lora_unet__", "official"): "wan-fun",
    ("lora_unet_", "official"): "musubi",
    ("diffusion_model.", "official"): "comfy",  # also diffusion-pipe, musubi-tuner --target other; "official"
    # when spelt with lora_down/lora_up
    ("diffusion_model.", "diffusers"): "ai-toolkit",
    ("transformer.", "diffusers"): "diffusers",  # "ai-toolkit" when it has .alpha keys
    ("transformer.", "official"): "musubi-other",  # musubi-tuner --target other --diffusers_prefix transformer
}
# Key prefixes read, longest first (Wan-Fun's double underscore before musubi's).
READ_PREFIXES = ("lora_unet__", "lora_unet_", "diffusion_model.", "transformer.")
UNDERSCORED_PREFIXES = ("lora_unet__", "lora_unet_")

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
# Key suffix -> (adapter kind, role in the canonical form); alpha belongs to every kind.
SUFFIX_ROLES: dict[str, tuple[str | None, str]] = {
    "lora_down.weight": ("lora", "down"),
    "lora_up.weight": ("lora", "up"),
    "lora_A.weight": ("lora", "down"),
    "lora_B.weight": ("lora", "up"),
    "alpha": (None, "alpha"),
    **{suffix: ("loha", suffix) for suffix in LOHA_KEYS},
    **{suffix: ("lokr", suffix) for suffix in LOKR_KEYS},
}
_ROLE_KINDS = {role: kind for kind, role in SUFFIX_ROLES.values() if kind}
KIND_TITLES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}


BAKED_ALPHA_KEY = "ss_lora_baked_alpha"  # JSON: one alpha for every module, or {module: alpha}
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header with the PEFT LoraConfig (lora_alpha, ...)
# Metadata convert_file never copies: recomputed hashes, alpha records of the source layout.
_DROPPED_METADATA = ("sshs_model_hash", "sshs_legacy_hash", BAKED_ALPHA_KEY, PEFT_METADATA_KEY)
DTYPES = ("float32", "bfloat16", "float16")
_MAX_LISTED = 5


# -- reading ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Key:
    """One parsed file key."""

    prefix: str
    written: str  # the module path as the file spells it (dotted, or underscored without the prefix)
    suffix: str


def _split_key(key: str) -> _Key | None:
    """Split a key into prefix, module and a known suffix; None when it fits no layout read here."""
    prefix = next((p for p in READ_PREFIXES if key.startswith(p)), None)
    if prefix is None:
        return None
    rest = key[len(prefix):]
    if prefix in UNDERSCORED_PREFIXES:
        written, _, suffix = rest.partition(".")
    else:
        suffix = next((s for s in SUFFIX_ROLES if rest.endswith("." + s)), "")
        written = rest[: -len(suffix) - 1] if suffix else ""
    return _Key(prefix, written, suffix) if written and suffix in SUFFIX_ROLES else None


def _official_path(key: _Key, naming) -> tuple[str, str] | None:
    """(official module path, naming the file used), or None when an underscored name is not a module of `naming`."""
    if key.prefix in UNDERSCORED_PREFIXES:
        official = naming.official_from_underscored(key.written)
        return (official, "official") if official else None
    official = naming.official_from_diffusers(key.written)
    if official is not None:
        return official, "diffusers"
    return key.written, "official"


def _naming(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None):
    """The LoraNaming of the file's architecture, from its metadata or its module names."""
    names = []
    for key in tensors:
        parsed = _split_key(key)
        if parsed:
            names.append(parsed.written)
    return lora_naming_for(names, metadata)


def _unknown_keys_error(source: str, unknown: list[str], total: int, naming) -> UserError:
    more = f" (and {len(unknown) - _MAX_LISTED} more)" if len(unknown) > _MAX_LISTED else ""
    return UserError(
        f"{source}: {len(unknown)} of {total} keys fit no {naming.arch} LoRA layout this tool reads: "
        f"{', '.join(unknown[:_MAX_LISTED])}{more}. Expected lora_unet_<module>.lora_down.weight/.lora_up.weight/"
        ".alpha (musubi), diffusion_model.<module>.lora_A.weight/.lora_B.weight (ComfyUI, diffusion-pipe) or "
        "transformer.<diffusers module>.lora_A.weight/.lora_B.weight (diffusers), LoHa .hada_* or LoKr .lokr_*; "
        ".diff, .diff_b, .dora_scale and Tucker keys are not supported, and underscored names must be "
        f"{naming.description}. Remove those keys or convert the file with the tool that wrote it"
    )


def _group_keys(tensors: Mapping[str, Any], source: str, arch_naming):
    """Group the keys by official module: ({module: {role: (key, tensor)}}, prefixes, namings, written names)."""
    modules: dict[str, dict[str, tuple[str, Any]]] = defaultdict(dict)
    written: dict[str, str] = {}
    prefixes: set[str] = set()
    namings: set[str] = set()
    unknown: list[str] = []
    for key, value in tensors.items():
        parsed = _split_key(key)
        resolved = _official_path(parsed, arch_naming) if parsed else None
        if resolved is None:
            unknown.append(key)
            continue
        module, naming = resolved
        role = SUFFIX_ROLES[parsed.suffix][1]
        if role in modules[module]:
            raise UserError(f"{source}: keys {modules[module][role][0]} and {key} both give {role} of module "
                            f"{module}; keep one of them")
        modules[module][role] = (key, value)
        written[module] = parsed.written
        prefixes.add(parsed.prefix)
        namings.add(naming)
    if unknown:
        raise _unknown_keys_error(source, sorted(unknown), len(tensors), arch_naming)
    if not modules:
        raise UserError(f"{source}: no tensors; is this a LoRA file?")
    if len(prefixes) > 1:
        raise UserError(f"{source}: mixes key prefixes {sorted(prefixes)}; a LoRA file uses one layout. Split it "
                        "or convert each part separately")
    return modules, prefixes.pop(), namings, written


def _kind_of(module: str, roles: Mapping[str, Any], source: str) -> str:
    """The one adapter kind whose keys `roles` holds (alpha aside)."""
    kinds = {_ROLE_KINDS[role] for role in roles if role != "alpha"}
    if len(kinds) != 1:
        what = " and ".join(KIND_TITLES[k] for k in sorted(kinds)) if kinds else "only an alpha"
        raise UserError(f"{source}: module {module} has {what} keys; each module needs the keys of one adapter")
    return kinds.pop()


def _alpha(roles: Mapping[str, tuple[str, Any]], default: float, source: str) -> float:
    """The module's alpha; a missing or zero alpha is `default` (the rank: scale 1, as the trainer reads 0)."""
    if "alpha" not in roles:
        return default
    key, value = roles["alpha"]
    if value.numel() != 1:
        raise UserError(f"{source}: {key} must be a single number, got shape {list(value.shape)}")
    return float(value.float().reshape(-1)[0]) or default


def _lora_entry(module: str, roles: Mapping[str, tuple[str, Any]], source: str) -> dict[str, Any]:
    missing = [r for r in ("down", "up") if r not in roles]
    if missing:
        have = ", ".join(k for k, _ in roles.values())
        raise UserError(f"{source}: module {module} has no lora {' or '.join(missing)} weight (found {have}); "
                        "a LoRA module needs both down (lora_down/lora_A) and up (lora_up/lora_B)")
    down, up = roles["down"][1], roles["up"][1]
    if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
        raise UserError(f"{source}: module {module}: down {list(down.shape)} and up {list(up.shape)} are not "
                        "a [rank, in] / [out, rank] pair of a Linear LoRA")
    return {"kind": "lora", "down": down, "up": up, "alpha": _alpha(roles, float(down.shape[0]), source)}


def _lycoris_entry(module: str, kind: str, roles: Mapping[str, tuple[str, Any]], source: str) -> dict[str, Any]:
    tensors = {role: value for role, (_, value) in roles.items() if role != "alpha"}
    if kind == "loha":
        complete = all(k in tensors for k in LOHA_KEYS)
    else:
        complete = all(("lokr_" + w in tensors) != (f"lokr_{w}_a" in tensors and f"lokr_{w}_b" in tensors)
                       for w in ("w1", "w2"))
    if not complete:
        expected = ", ".join(LOHA_KEYS) if kind == "loha" else "lokr_w1 or lokr_w1_a+_b, lokr_w2 or lokr_w2_a+_b"
        raise UserError(f"{source}: {KIND_TITLES[kind]} module {module} has {', '.join(sorted(tensors))}; "
                        f"it needs {expected}")
    rank = _lycoris_rank(kind, tensors)
    return {"kind": kind, "tensors": tensors, "alpha": _alpha(roles, float(rank or 1), source)}


def _lycoris_rank(kind: str, tensors: Mapping[str, Any]) -> int | None:
    """The rank alpha is divided by (ComfyUI's rule); None for a LoKr of two full matrices (scale always 1)."""
    if kind == "loha":
        return int(tensors["hada_w1_b"].shape[0])
    for name in ("lokr_w2_b", "lokr_w1_b"):
        if name in tensors:
            return int(tensors[name].shape[0])
    return None


def read_lora(
    tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, source: str = "LoRA state dict"
) -> tuple[dict[str, dict[str, Any]], str]:
    """Read a LoRA in any layout this module knows: (canonical form, source format name).

    `metadata` (the file's header, optional) lets read_lora undo alpha baking recorded by convert_file and apply
    a diffusers `lora_adapter_metadata` lora_alpha. Raises UserError naming `source` for unknown keys, mixed
    prefixes, incomplete modules or shapes that are not a Linear adapter.
    """
    arch_naming = _naming(tensors, metadata)
    modules, prefix, namings, written = _group_keys(tensors, source, arch_naming)
    naming = "diffusers" if "diffusers" in namings else "official"
    if naming == "diffusers":
        strays = sorted(m for m in modules if arch_naming.diffusers_file_name(m) is None)
        if strays:
            raise UserError(f"{source}: modules {', '.join(strays[:_MAX_LISTED])} have no official {arch_naming.arch} "
                            "name (only block linears are mapped); remove them to convert this file")
    has_alpha = any("alpha" in roles for roles in modules.values())
    source_format = SOURCE_FORMATS[(prefix, naming)]
    if source_format == "diffusers" and has_alpha:
        source_format = "ai-toolkit"
    if source_format == "comfy" and any(k.endswith(".lora_down.weight") for k in tensors):
        source_format = "official"  # diffusion_model.<official> with lora_down/lora_up (+ alpha)
    canonical = {}
    for module, roles in modules.items():
        kind = _kind_of(module, roles, source)
        canonical[module] = (_lora_entry(module, roles, source) if kind == "lora"
                             else _lycoris_entry(module, kind, roles, source))
    metadata = metadata or {}
    if metadata.get("ss_lora_format") == source_format and BAKED_ALPHA_KEY in metadata:
        _unbake(canonical, _recorded_alphas(metadata[BAKED_ALPHA_KEY], canonical, source), modules)
    elif naming == "diffusers" and PEFT_METADATA_KEY in metadata:
        _apply_peft_alphas(canonical, metadata[PEFT_METADATA_KEY], modules, written, source)
    return canonical, source_format


def _recorded_alphas(text: str, canonical: Mapping[str, Any], source: str) -> dict[str, float]:
    try:
        value = json.loads(text)
        if isinstance(value, (int, float)):
            return {module: float(value) for module in canonical}
        return {str(m): float(a) for m, a in value.items()}
    except (ValueError, TypeError, AttributeError) as err:
        raise UserError(f"{source}: metadata {BAKED_ALPHA_KEY} is not a number or an object of numbers ({err}); "
                        "remove it from the file to read the alphas as baked in") from None


def _unbake(canonical: dict[str, dict[str, Any]], alphas: Mapping[str, float], modules: Mapping[str, Any]) -> None:
    """Divide A and B of each LoRA without an alpha key by sqrt(alpha/rank) and restore that alpha."""
    for module, alpha in alphas.items():
        entry = canonical.get(module)
        if entry is None or entry["kind"] != "lora" or "alpha" in modules[module]:
            continue
        factor = 1.0 / math.sqrt(alpha / entry["down"].shape[0])
        entry.update(down=_scaled(entry["down"], factor, None), up=_scaled(entry["up"], factor, None), alpha=alpha)


def _apply_peft_alphas(
    canonical: dict[str, dict[str, Any]], text: str, modules: Mapping[str, Any], written: Mapping[str, str], source: str
) -> None:
    """Set alpha from a diffusers/PEFT `lora_adapter_metadata` header (lora_alpha, alpha_pattern, use_rslora)."""
    try:
        config = json.loads(text)
        config = {k.removeprefix("transformer."): v for k, v in config.items()}
        lora_alpha, patterns = config.get("lora_alpha"), dict(config.get("alpha_pattern") or {})
        rslora = bool(config.get("use_rslora"))
    except (ValueError, TypeError, AttributeError) as err:
        raise UserError(f"{source}: metadata {PEFT_METADATA_KEY} is not PEFT LoraConfig JSON ({err})") from None
    for module, entry in canonical.items():
        if entry["kind"] != "lora" or "alpha" in modules[module]:
            continue
        name = written[module]
        # PEFT's alpha_pattern rule: the pattern matches the whole name or a dotted suffix of it.
        alpha = next((a for p, a in patterns.items() if re.match(rf"(.*\.)?({p})$", name)), lora_alpha)
        if alpha is not None:
            rank = entry["down"].shape[0]
            entry["alpha"] = float(alpha) * (math.sqrt(rank) if rslora else 1.0)


# -- writing ------------------------------------------------------------------------------------
def _stem(module: str, layout: Layout, naming) -> str:
    if layout.naming == "underscored":
        from musubi_pipe.network.lora import lora_name

        return lora_name(module, layout.prefix.removesuffix("_"))
    if layout.naming == "diffusers":
        return layout.prefix + naming.diffusers_file_name(module)
    return layout.prefix + module


def _check_writable(canonical: Mapping[str, Mapping[str, Any]], to: str, naming) -> Layout:
    if to not in FORMATS:
        raise UserError(f"unknown LoRA format {to!r}; choose one of {', '.join(FORMATS)}")
    layout = FORMATS[to]
    if not canonical:
        raise UserError("the LoRA has no modules; nothing to write")
    kinds = Counter(entry["kind"] for entry in canonical.values())
    if not layout.lycoris and set(kinds) - {"lora"}:
        titles = " and ".join(KIND_TITLES[k] for k in sorted(set(kinds) - {"lora"}))
        raise UserError(f"the LoRA holds {titles} modules: diffusers loads no LoHa or LoKr (its loaders read "
                        "LoRA lora_A/lora_B weights only). Convert to comfy (ComfyUI loads LoHa/LoKr) or keep musubi")
    if layout.naming == "diffusers":
        problems = naming.diffusers_problems(list(canonical))
        if problems:
            raise UserError("; ".join(problems))
    if layout.bake_alpha and any(e["kind"] == "lora" and float(e["alpha"]) < 0 for e in canonical.values()):
        raise UserError("the LoRA has a negative alpha, which cannot be baked into A and B as sqrt(alpha/rank); "
                        "convert to musubi, which keeps the alpha keys")
    if to == "comfy" and set(kinds) - {"lora"}:
        log.warning("the comfy file holds LoHa/LoKr modules: ComfyUI loads them, diffusers does not load LoHa or "
                    "LoKr at all")
    return layout


def musubi_tensors(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None,
                   source: str = "LoRA state dict") -> dict:
    """`tensors` in the musubi layout: as they are when they already are, else read and rewritten (same ΔW)."""
    canonical, source_format = read_lora(tensors, metadata, source)
    return dict(tensors) if source_format == "musubi" else write_lora(canonical, "musubi")


def in_format(tensors: Mapping[str, Any], to: str) -> tuple[dict, dict[str, str]]:
    """Musubi-layout `tensors` (a network's state dict) in format `to`, and the metadata that records it
    (`ss_lora_format`, the baked alphas); musubi stays as it is, with no extra metadata (musubi-tuner's files)."""
    if to == "musubi":
        return dict(tensors), {}
    canonical, _ = read_lora(tensors)
    metadata = {"ss_lora_format": to}
    baked = baked_alpha_metadata(canonical) if FORMATS[to].bake_alpha else None
    if baked is not None:
        metadata[BAKED_ALPHA_KEY] = baked
    return write_lora(canonical, to), metadata


def read_lora_file(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """(tensors in the musubi layout, metadata) of a LoRA file in any layout read_lora reads."""
    from musubi_pipe.network.lora_file import load_lora_file

    tensors, metadata = load_lora_file(path)
    return musubi_tensors(tensors, metadata, source=str(path)), metadata


def write_lora(canonical: Mapping[str, Mapping[str, Any]], to: str, dtype=None) -> dict:
    """The file tensors of `canonical` in format `to` (a FORMATS name), cast to `dtype` (None: as they are).

    Raises UserError for an unknown format, LoHa/LoKr to diffusers, or modules diffusers cannot take.
    """
    import torch

    naming = lora_naming_for(canonical)
    layout = _check_writable(canonical, to, naming)
    out = {}
    for module, entry in canonical.items():
        stem = _stem(module, layout, naming)
        if entry["kind"] == "lora":
            down, up, alpha = entry["down"], entry["up"], float(entry["alpha"])
            factor = math.sqrt(alpha / down.shape[0]) if layout.bake_alpha else 1.0
            out[f"{stem}.{layout.down}"] = _scaled(down, factor, dtype)
            out[f"{stem}.{layout.up}"] = _scaled(up, factor, dtype)
            if not layout.bake_alpha:
                out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype or down.dtype)
        else:
            tensors = entry["tensors"]
            for name, value in tensors.items():
                out[f"{stem}.{name}"] = _scaled(value, 1.0, dtype)
            alpha_dtype = dtype or next(iter(tensors.values())).dtype
            out[f"{stem}.alpha"] = torch.tensor(float(entry["alpha"]), dtype=alpha_dtype)
    return out


def _scaled(tensor, factor: float, dtype):
    """`tensor` × factor (computed in float32 unless factor is 1), cast to `dtype` or kept in its own, contiguous."""
    target = dtype or tensor.dtype
    if factor != 1.0:
        tensor = tensor.float() * factor
    return tensor.to(target).contiguous()


def baked_alpha_metadata(canonical: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The BAKED_ALPHA_KEY value recording the alphas a baked layout folds into A and B (None: all scales are 1)."""
    alphas = {m: float(e["alpha"]) for m, e in canonical.items() if e["kind"] == "lora"}
    if all(alpha == canonical[m]["down"].shape[0] for m, alpha in alphas.items()):
        return None
    values = set(alphas.values())
    return json.dumps(values.pop() if len(values) == 1 else alphas)


# -- weights and files --------------------------------------------------------------------------
def delta_weights(canonical: Mapping[str, Mapping[str, Any]]) -> dict:
    """{module: float32 ΔW} as ComfyUI and the trainer apply them at multiplier 1.

    LoRA up @ down · alpha/rank; LoHa (w1a·w1b) ⊙ (w2a·w2b) · alpha/rank; LoKr kron(w1, w2) · alpha/dim
    (scale 1 when both factors are full matrices).
    """
    import torch

    deltas = {}
    for module, entry in canonical.items():
        alpha, kind = float(entry["alpha"]), entry["kind"]
        if kind == "lora":
            down, up = entry["down"].float(), entry["up"].float()
            deltas[module] = up @ down * (alpha / down.shape[0])
            continue
        t = {name: value.float() for name, value in entry["tensors"].items()}
        rank = _lycoris_rank(kind, t)
        scale = alpha / rank if rank else 1.0
        if kind == "loha":
            deltas[module] = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * scale
        else:
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
            deltas[module] = torch.kron(w1, w2) * scale
    return deltas


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, to: str, dtype=None) -> dict[str, Any]:
    """Convert the LoRA file `src` to format `to` and write it to `dst` (atomically; may be `src` itself).

    `dtype` is None (keep), a DTYPES name or a torch.dtype. The metadata is copied, `ss_lora_format` = `to` added,
    baked alphas recorded and the sd-scripts hashes recomputed. Returns {"source_format", "to", "modules",
    "kinds", "output"}. Raises UserError for unreadable files and everything read_lora/write_lora reject.
    """
    from musubi_pipe.network.lora_file import load_lora_file, save_lora_file

    tensors, metadata = load_lora_file(src)
    canonical, source_format = read_lora(tensors, metadata, source=str(src))
    try:
        out = write_lora(canonical, to, _torch_dtype(dtype))
    except UserError as err:
        raise UserError(f"{src}: {err}") from None
    new_metadata = {k: v for k, v in metadata.items() if k not in _DROPPED_METADATA}
    new_metadata["ss_lora_format"] = to
    baked = baked_alpha_metadata(canonical) if FORMATS[to].bake_alpha else None
    if baked is not None:
        new_metadata[BAKED_ALPHA_KEY] = baked
    save_lora_file(dst, out, new_metadata)
    kinds = Counter(entry["kind"] for entry in canonical.values())
    return {"source_format": source_format, "to": to, "modules": len(canonical), "kinds": dict(kinds),
            "output": str(dst)}


def _torch_dtype(dtype):
    if dtype is None or not isinstance(dtype, str):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    import torch

    return getattr(torch, dtype)
