"""inspect: show what a LoRA / LoHa / LoKr .safetensors file holds; optionally check it against a DiT and its hashes.

    python -m musubi_pipe.tools inspect LORA [--model DIT_FILE_OR_FOLDER] [--verify] [--json]

Prints:
  - the key format: musubi / sd-scripts (`lora_unet_<module>` keys with lora_down/lora_up/alpha), ComfyUI
    (`diffusion_model.<official module>` keys, usually lora_A/lora_B), diffusers (`transformer.<module>`), with
    LoHa (hada_*) and LoKr (lokr_*) keys named as such;
  - the metadata (ss_*, modelspec.*, sshs_* hashes, ..., sorted; values over 120 characters cut unless --json);
  - the network type and per module: rank, alpha, scale (alpha / rank; 1 when there is no alpha key, as ComfyUI
    applies it, or when alpha is 0, as musubi reads it; a diffusers `lora_adapter_metadata` header's lora_alpha
    counts as the alpha), the weight shape out x in, and the Frobenius norm of the module's weight update
    (LoRA up @ down * scale; LoHa (w1a @ w1b) * (w2a @ w2b) * scale; LoKr kron(w1, w2) * scale, w2 = w2a @ w2b when
    low-rank; a LoKr with full w1 and w2 has no rank and scale 1);
  - the targeted blocks, e.g. "blocks 0-39 (40 blocks), per block: self_attn q,k,v,o; cross_attn q,k,v,o; ffn 0,2",
    and the modules outside blocks.

Options:
  --model PATH   also check that every module adapts a Linear of that DiT, with the LoRA's out x in shape. Reads
                 the safetensors headers only (no weights, no torch): an official single file or shard set, a
                 ComfyUI file (`model.diffusion_model.` keys), an official Wan-AI folder, or a diffusers
                 transformer / pipeline folder. Unmatched modules and shape mismatches are listed, with the
                 likely cause (a 14B LoRA on the 1.3B model, an I2V-only k_img module on a T2V model, ...).
  --verify       recompute sd-scripts' sshs_model_hash / sshs_legacy_hash (over the tensors and the ss_*
                 metadata) and compare them with the stored ones ("no stored hash" when the file has none).
  --json         print one JSON document (what `inspect_lora()` returns) instead of the text report.

Exit status: 0 normally; 1 when --verify finds a hash that differs from the stored one or --model finds an
unmatched module or a shape mismatch; 2 when the LoRA file or the model cannot be read (the message names the
file and the fix).

From Python: `inspect_lora(path, model=None, verify=False) -> dict` and `format_report(report) -> str`.
The key-format detector is this module's own (`detect_format`: it also describes files with keys the converter
refuses, such as .diff or a missing lora_down); the report adds network.formats' name of the layout
(`source_format`, what the convert tool calls it) when `formats.read_lora` can read the file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

from musubi_pipe.errors import ConfigError, UserError
from musubi_pipe.models.files import safetensors_shapes
from musubi_pipe.models.wan.locate import (
    OFFICIAL_PREFIXES,
    describe_dit,
    dit_signature_from_config,
    dit_signature_from_shapes,
    dit_variants,
    locate_dit,
    read_config,
    strip_dit_prefix,
)
from musubi_pipe.models.wan.names import BLOCK_LINEARS, official_module_name
from musubi_pipe.models.wan.tasks import TASKS

HELP = "show a LoRA file's format, metadata, ranks, ΔW norms and targets; check it against a DiT and its hashes"

MUSUBI_PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "transformer."
MAX_VALUE_CHARS = 120
MAX_LISTED = 10  # unmatched modules / shape mismatches listed in the text report (--json lists all)
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")
KIND_TITLES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}

# Key suffix -> adapter type it belongs to (None: shared or not an adapter weight). Longest match wins.
SUFFIX_KINDS: dict[str, str | None] = {
    "lora_down.weight": "lora", "lora_up.weight": "lora", "lora_A.weight": "lora", "lora_B.weight": "lora",
    "lora_mid.weight": "lora",
    "hada_w1_a": "loha", "hada_w1_b": "loha", "hada_w2_a": "loha", "hada_w2_b": "loha",
    "hada_t1": "loha", "hada_t2": "loha",
    "lokr_w1": "lokr", "lokr_w1_a": "lokr", "lokr_w1_b": "lokr",
    "lokr_w2": "lokr", "lokr_w2_a": "lokr", "lokr_w2_b": "lokr", "lokr_t2": "lokr",
    "alpha": None, "dora_scale": None, "diff": None, "diff_b": None, "lora_B.bias": None,
}
_SUFFIXES_LONGEST_FIRST = sorted(SUFFIX_KINDS, key=len, reverse=True)

# Official Wan sub-paths of the Linear layers inside a block, in the order reports list them.
BLOCK_SUBMODULES = [official.split(".", 2)[2] for _, official in BLOCK_LINEARS]
_BLOCK_SUB_BY_UNDERSCORED = {sub.replace(".", "_"): sub for sub in BLOCK_SUBMODULES}
# Official Wan Linear layers outside the blocks -> their diffusers names.
OUTSIDE_LINEARS = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "head.head": "proj_out",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
}
_OUTSIDE_BY_DIFFUSERS = {d: o for o, d in OUTSIDE_LINEARS.items()}
_OUTSIDE_BY_UNDERSCORED = {o.replace(".", "_"): o for o in OUTSIDE_LINEARS}
_BLOCK = re.compile(r"^blocks[._](\d+)[._](.+)$")


# -- command line ----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the inspect options on `parser` (the `inspect` subcommand of python -m musubi_pipe.tools)."""
    parser.add_argument("lora", metavar="LORA", help="the LoRA / LoHa / LoKr .safetensors file")
    parser.add_argument(
        "--model", metavar="DIT", default=None,
        help="a Wan DiT file (official or ComfyUI), shard, Wan-AI folder or diffusers folder: check that every "
        "module matches one of its Linear layers with the right shape (reads headers only)",
    )
    parser.add_argument("--verify", action="store_true",
                        help="recompute sshs_model_hash / sshs_legacy_hash and compare them with the stored ones")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the text report")


def main(args: argparse.Namespace) -> int:
    """Inspect `args.lora`, print the report (text or JSON) and return the exit status (0, or 1 on a mismatch)."""
    report = inspect_lora(args.lora, model=args.model, verify=args.verify)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return report["exit_status"]


# -- the inspection --------------------------------------------------------------------------
def inspect_lora(path: str | os.PathLike, model: str | os.PathLike | None = None, verify: bool = False) -> dict:
    """Return the report of one LoRA file (the document `--json` prints); see the module doc for its content.

    Keys: file, size_bytes, format, network, metadata, modules (one dict per module: name, module, type, rank,
    alpha, scale, shape, delta_norm, dtype), targets, unrecognised_keys, problems (of the weights), notes
    (informational), model (None without `model`), verify (None without `verify`), exit_status.
    Raises UserError when the file (or the model) cannot be read.
    """
    from musubi_pipe.network.lora_file import load_lora_file

    path = Path(path)
    tensors, metadata = load_lora_file(path)
    groups, unrecognised = group_keys(tensors)
    if not groups:
        sample = ", ".join(list(tensors)[:3]) or "<no tensors>"
        raise UserError(
            f"{path}: no LoRA/LoHa/LoKr keys found (keys like {sample}); expected keys such as "
            "lora_unet_<module>.lora_down.weight, diffusion_model.<module>.lora_A.weight, .hada_w1_a or .lokr_w1 "
            "(is this a model checkpoint rather than a LoRA?)"
        )
    model_info = read_model(model) if model is not None else None
    known = set(model_info["linears"]) if model_info else set()
    names = {stem: resolve_name(stem, known) for stem in groups}
    source_format, peft_alphas = _read_with_formats(tensors, metadata, path)
    problems: list[str] = []
    modules = [analyse_module(stem, groups[stem], names[stem][1], problems, peft_alphas.get(names[stem][1]))
               for stem in groups]
    modules.sort(key=lambda m: _module_order(m["module"]))
    report: dict[str, Any] = {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "format": {**detect_format(names, groups), "source_format": source_format},
        "network": summarise_network(modules, tensors),
        "metadata": dict(sorted(metadata.items())),
        "modules": modules,
        "targets": summarise_targets([m["module"] for m in modules], _block_lists(list(names), metadata)),
        "unrecognised_keys": unrecognised,
        "problems": problems,
        "notes": metadata_notes(modules, metadata, bool(peft_alphas)),
        "model": check_against_model(modules, model_info) if model_info else None,
        "verify": verify_hashes(tensors, metadata) if verify else None,
    }
    failed = any(report[part] is not None and not report[part]["ok"] for part in ("model", "verify"))
    report["exit_status"] = 1 if failed else 0
    return report


def _read_with_formats(tensors: Mapping[str, Any], metadata: Mapping[str, str], path: Path
                       ) -> tuple[str | None, dict[str, float]]:
    """(network.formats' name of the file's layout, {module: alpha} set by a diffusers lora_adapter_metadata header).

    The name is what `python -m musubi_pipe.tools convert` calls the layout (musubi, comfy, ai-toolkit, diffusers,
    musubi-other, wan-fun); None when formats.read_lora cannot read the file (keys it does not convert).
    """
    from musubi_pipe.network import formats

    try:
        canonical, source_format = formats.read_lora(tensors, metadata, source=str(path))
    except (UserError, ValueError, KeyError, IndexError, RuntimeError):  # odd files: this report still describes them
        return None, {}
    if formats.PEFT_METADATA_KEY not in metadata:
        return source_format, {}
    return source_format, {module: float(entry["alpha"]) for module, entry in canonical.items()
                           if entry["kind"] == "lora"}


# -- keys, names, format ---------------------------------------------------------------------
def split_key(key: str) -> tuple[str, str] | None:
    """(module stem, suffix) of an adapter key (`x.lora_down.weight` -> (`x`, `lora_down.weight`)), else None."""
    for suffix in _SUFFIXES_LONGEST_FIRST:
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            return key[: -len(suffix) - 1], suffix
    return None


def group_keys(tensors: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Group the tensors by module stem ({stem: {suffix: tensor}}); also return the keys no rule recognises.

    A stem with no adapter weight (only alpha, diff, ...) is not a module; its keys count as unrecognised.
    """
    groups: dict[str, dict[str, Any]] = defaultdict(dict)
    unrecognised = []
    for key, value in tensors.items():
        parts = split_key(key)
        if parts is None:
            unrecognised.append(key)
        else:
            groups[parts[0]][parts[1]] = value
    for stem in [s for s, g in groups.items() if not any(SUFFIX_KINDS[k] for k in g)]:
        unrecognised.extend(f"{stem}.{suffix}" for suffix in groups.pop(stem))
    return dict(groups), sorted(unrecognised)


def resolve_name(stem: str, known: Iterable[str] = ()) -> tuple[str, str | None]:
    """(naming, official module name or None) of a module stem.

    naming is "musubi" (`lora_unet_<official with _>`), "comfy" (`[model.]diffusion_model.<official>`),
    "comfy-diffusers" (`diffusion_model.<diffusers name>`, ai-toolkit), "diffusers" (`transformer.<diffusers
    name>`), "transformer-official" (`transformer.<official>`, musubi's convert_lora
    --diffusers_prefix transformer) or "unprefixed". `known` (official names, e.g. a model's Linear layers) resolves
    musubi names beyond the Wan table.
    """
    if stem.startswith(MUSUBI_PREFIX):
        return "musubi", _official_from_musubi(stem, known)
    for prefix in OFFICIAL_PREFIXES:
        if stem.startswith(prefix):
            rest = stem[len(prefix):]
            official = official_module_name(rest) or _OUTSIDE_BY_DIFFUSERS.get(rest)
            return ("comfy-diffusers", official) if official else ("comfy", rest)
    if stem.startswith(DIFFUSERS_PREFIX):
        rest = stem[len(DIFFUSERS_PREFIX):]
        official = official_module_name(rest) or _OUTSIDE_BY_DIFFUSERS.get(rest)
        return ("diffusers", official) if official else ("transformer-official", rest)
    return "unprefixed", stem


def _official_from_musubi(stem: str, known: Iterable[str]) -> str | None:
    """The official name behind `lora_unet_<name>` ('_' -> '.' is ambiguous, so it is looked up)."""
    rest = stem[len(MUSUBI_PREFIX):].lstrip("_")  # Wan-Fun files write lora_unet__blocks_...
    by_underscored = {o.replace(".", "_"): o for o in known}
    if rest in by_underscored:
        return by_underscored[rest]
    m = re.fullmatch(r"blocks_(\d+)_(\w+)", rest)
    if m and m[2] in _BLOCK_SUB_BY_UNDERSCORED:
        return f"blocks.{m[1]}.{_BLOCK_SUB_BY_UNDERSCORED[m[2]]}"
    return _OUTSIDE_BY_UNDERSCORED.get(rest)


_NAMING_TEXT = {
    "musubi": ("musubi", "musubi-tuner / sd-scripts: lora_unet_<module> keys"),
    "comfy": ("comfy", "ComfyUI / diffusion-pipe: diffusion_model.<official module> keys"),
    "comfy-diffusers": ("diffusers", "ai-toolkit: diffusion_model.<diffusers module> keys (diffusers loads them; "
                        "ComfyUI matches no diffusers names for Wan)"),
    "diffusers": ("diffusers", "diffusers / PEFT: transformer.<diffusers module> keys"),
    "transformer-official": ("diffusers", "transformer.<official module> keys (musubi convert_lora "
                             "--diffusers_prefix transformer)"),
    "unprefixed": ("unprefixed", "<module> keys without a prefix"),
}


def detect_format(names: Mapping[str, tuple[str, str | None]], groups: Mapping[str, Mapping[str, Any]]) -> dict:
    """{"name", "namings", "suffixes", "description"} of a file from its module stems and key suffixes.

    name is "musubi", "comfy", "diffusers", "unprefixed" or "mixed" (stems of several namings in one file).
    """
    namings = sorted({naming for naming, _ in names.values()})
    kinds = sorted({_NAMING_TEXT[n][0] for n in namings})
    suffixes = suffix_style({s for g in groups.values() for s in g})
    text = "; ".join(_NAMING_TEXT[n][1] for n in namings)
    return {
        "name": kinds[0] if len(kinds) == 1 else "mixed",
        "namings": namings,
        "suffixes": suffixes,
        "description": f"{text}, with {suffixes}",
    }


def suffix_style(suffixes: set[str]) -> str:
    """How the weights are named: "lora_down/lora_up/alpha", "lora_A/lora_B", "hada_w1_a/.../alpha", ... joined by +."""
    alpha = "/alpha" if "alpha" in suffixes else ""
    styles = []
    if suffixes & {"lora_down.weight", "lora_up.weight"}:
        styles.append("lora_down/lora_up" + alpha)
    if suffixes & {"lora_A.weight", "lora_B.weight"}:
        styles.append("lora_A/lora_B" + alpha)
    if any(s.startswith("hada_") for s in suffixes):
        styles.append("LoHa hada_w1_a/w1_b/w2_a/w2_b" + alpha)
    if any(s.startswith("lokr_") for s in suffixes):
        w2 = "/".join(s[5:] for s in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
                      if s in suffixes)
        styles.append(f"LoKr lokr_{w2}" + alpha)
    extras = sorted(suffixes & {"dora_scale", "diff", "diff_b", "lora_B.bias", "lora_mid.weight"})
    return " + ".join(styles + extras) or "no adapter weights"


# -- one module --------------------------------------------------------------------------------
def analyse_module(stem: str, parts: Mapping[str, Any], official: str | None, problems: list[str],
                   header_alpha: float | None = None) -> dict:
    """The facts of one module ({suffix: tensor}): type, rank, alpha, scale, shape, ΔW norm; problems are appended.

    `header_alpha` is the alpha a diffusers lora_adapter_metadata header gives a module without an alpha key.
    """
    name = official or stem
    kinds = sorted({SUFFIX_KINDS[s] for s in parts if SUFFIX_KINDS[s]})
    alpha = float(parts["alpha"].float().reshape(-1)[0]) if "alpha" in parts else header_alpha
    if alpha == 0:
        problems.append(f"{name}: alpha is 0; musubi-tuner and this project read it as alpha = rank (scale 1), "
                        "ComfyUI applies scale 0 (no effect); write alpha = rank instead")
    info: dict[str, Any] = {"name": stem, "module": name, "type": "+".join(kinds), "rank": None, "alpha": alpha,
                            "scale": None, "shape": None, "delta_norm": None, "dtype": _dtype_of(parts)}
    if len(kinds) != 1:
        problems.append(f"{name}: mixes {' and '.join(KIND_TITLES[k] for k in kinds)} keys; skipped")
        return info
    bad = [s for s, t in parts.items() if not bool(t.float().isfinite().all())]
    if bad:
        problems.append(f"{name}: NaN or Inf values in {', '.join(sorted(bad))} (a diverged or damaged file)")
    try:
        rank, shape, norm, scale = _ANALYSERS[kinds[0]](parts, alpha)
    except _Incomplete as e:
        problems.append(f"{name}: {e}")
        return info
    info.update(rank=rank, shape=list(shape), scale=scale, delta_norm=None if bad else norm)
    return info


class _Incomplete(Exception):
    """A module whose keys do not make a complete adapter (the message says what is missing)."""


def _need(parts: Mapping[str, Any], *suffixes: str) -> list:
    missing = [s for s in suffixes if s not in parts]
    if missing:
        raise _Incomplete(f"has {', '.join(sorted(parts))} but no {', '.join(missing)} (ComfyUI fails to load it)")
    return [parts[s].float() for s in suffixes]


def _scale(alpha: float | None, rank: int | None) -> float:
    """alpha / rank: 1 without an alpha key (as ComfyUI), an alpha of 0 (as musubi) or a rank (full LoKr)."""
    return 1.0 if not alpha or not rank else alpha / rank


def _analyse_lora(parts: Mapping[str, Any], alpha: float | None):
    if "lora_mid.weight" in parts:
        raise _Incomplete("is a Tucker (conv) LoRA (lora_mid), which this tool does not evaluate")
    down_key = "lora_down.weight" if "lora_down.weight" in parts or "lora_up.weight" in parts else "lora_A.weight"
    up_key = "lora_up.weight" if down_key == "lora_down.weight" else "lora_B.weight"
    down, up = _need(parts, down_key, up_key)
    down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
    rank = int(down.shape[0])
    if up.shape[1] != rank:
        raise _Incomplete(f"{up_key} has rank {up.shape[1]} but {down_key} has rank {rank}")
    scale = _scale(alpha, rank)
    # ||U D||_F^2 = sum((U^T U) * (D D^T)): exact, and cheap (rank x rank) however large the layer
    u, d = up.double(), down.double()
    norm = math.sqrt(max(0.0, float(((u.T @ u) * (d @ d.T)).sum()))) * abs(scale)
    return rank, (int(up.shape[0]), int(down.shape[1])), norm, scale


def _analyse_loha(parts: Mapping[str, Any], alpha: float | None, rows: int = 1024):
    if "hada_t1" in parts or "hada_t2" in parts:
        raise _Incomplete("is a Tucker (conv) LoHa (hada_t1/hada_t2), which this tool does not evaluate")
    w1a, w1b, w2a, w2b = _need(parts, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    rank = int(w1b.shape[0])
    scale = _scale(alpha, rank)
    total = 0.0
    for i in range(0, w1a.shape[0], rows):  # row blocks bound the memory of a 14B ffn layer
        block = (w1a[i:i + rows] @ w1b) * (w2a[i:i + rows] @ w2b)
        total += float(block.double().square().sum())
    return rank, (int(w1a.shape[0]), int(w1b.shape[1])), math.sqrt(total) * abs(scale), scale


def _analyse_lokr(parts: Mapping[str, Any], alpha: float | None):
    if "lokr_t2" in parts:
        raise _Incomplete("is a Tucker (conv) LoKr (lokr_t2), which this tool does not evaluate")
    w1 = _need(parts, "lokr_w1")[0] if "lokr_w1" in parts else _product(parts, "lokr_w1_a", "lokr_w1_b")
    w2 = _need(parts, "lokr_w2")[0] if "lokr_w2" in parts else _product(parts, "lokr_w2_a", "lokr_w2_b")
    # ComfyUI: the rank is that of the decomposed factor (w2 first); with both full, alpha is ignored
    rank = next((int(parts[k].shape[0]) for k in ("lokr_w2_b", "lokr_w1_b") if k in parts), None)
    scale = _scale(alpha, rank)
    shape = (int(w1.shape[0] * w2.shape[0]), int(w1.shape[1] * w2.shape[1]))
    norm = float(w1.double().norm()) * float(w2.double().norm()) * abs(scale)  # ||A ⊗ B|| = ||A|| ||B||
    return rank, shape, norm, scale


def _product(parts: Mapping[str, Any], a_key: str, b_key: str):
    a, b = _need(parts, a_key, b_key)
    return a @ b


_ANALYSERS = {"lora": _analyse_lora, "loha": _analyse_loha, "lokr": _analyse_lokr}


def _dtype_of(parts: Mapping[str, Any]) -> str:
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for s, t in parts.items() if s != "alpha"})
    return "+".join(dtypes)


# -- summaries -------------------------------------------------------------------------------
def summarise_network(modules: list[dict], tensors: Mapping[str, Any]) -> dict:
    """{"type", "title", "modules", "ranks", "alphas", "scales", "dtypes", "parameters", "delta_norm_total",
    "delta_norm_max"}: counts per distinct value (keys are strings, for JSON)."""
    kinds = sorted({m["type"] for m in modules if m["type"]})
    norms = [(m["delta_norm"], m["module"]) for m in modules if m["delta_norm"] is not None]
    return {
        "type": kinds[0] if len(kinds) == 1 else "mixed",
        "title": " + ".join(KIND_TITLES.get(k, k) for k in kinds),
        "modules": len(modules),
        "ranks": _counts(m["rank"] if m["rank"] is not None else "full" for m in modules if m["shape"]),
        "alphas": _counts(_num(m["alpha"]) if m["alpha"] is not None else "none" for m in modules),
        "scales": _counts(_num(m["scale"]) for m in modules if m["scale"] is not None),
        "dtypes": _counts(m["dtype"] for m in modules),
        "parameters": int(sum(t.numel() for t in tensors.values())),
        "delta_norm_total": math.sqrt(sum(n * n for n, _ in norms)) if norms else None,
        "delta_norm_max": {"module": max(norms)[1], "norm": max(norms)[0]} if norms else None,
    }


def _counts(values: Iterable) -> dict[str, int]:
    counter = Counter(str(v) for v in values)
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], _natural(kv[0]))))


def _block_lists(stems: list[str], metadata: dict) -> tuple[str, ...]:
    """The block lists of the family the file is for (Family.block_lists; Wan's `blocks` when none claims it)."""
    from musubi_pipe.models import family_names, get_family, lora_naming_for

    arch = lora_naming_for([s.removeprefix(MUSUBI_PREFIX).lstrip("_") for s in stems], metadata).arch
    return get_family(arch).block_lists if arch in family_names() else ("blocks",)


def summarise_targets(module_names: list[str], block_lists: tuple[str, ...] = ("blocks",)) -> dict:
    """Which blocks and sub-modules the modules adapt, by the family's block lists (Wan `blocks`, HunyuanVideo
    `double_blocks` and `single_blocks`): {"blocks", "block_count", "per_block": [{"blocks", "modules", "text"}],
    "outside_blocks", "text", "lists": {list: that summary}}. For one list, text is e.g. "blocks 0-39 (40 blocks),
    per block: self_attn q,k,v,o; cross_attn q,k,v,o; ffn 0,2"; several are joined with " | "."""
    per_list: dict[str, dict[int, set[str]]] = {name: defaultdict(set) for name in block_lists}
    pattern = re.compile(rf"^({'|'.join(map(re.escape, block_lists))})[._](\d+)[._](.+)$")
    outside = []
    for name in module_names:
        m = pattern.match(name.removeprefix(MUSUBI_PREFIX))
        if m:
            per_list[m[1]][int(m[2])].add(m[3])
        else:
            outside.append(name)
    lists = {name: _summarise_list(name, blocks) for name, blocks in per_list.items() if blocks}
    if len(block_lists) == 1:
        summary = lists.get(block_lists[0]) or _summarise_list(block_lists[0], {})
    else:
        summary = {"blocks": [f"{name}.{b}" for name, s in lists.items() for b in s["blocks"]],
                   "block_count": sum(s["block_count"] for s in lists.values()),
                   "per_block": [dict(g, list=name) for name, s in lists.items() for g in s["per_block"]],
                   "text": " | ".join(s["text"] for s in lists.values()) or "no blocks"}
    return {**summary, "outside_blocks": outside, "lists": lists}


def _summarise_list(list_name: str, per_block: dict[int, set[str]]) -> dict:
    by_set: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for block in sorted(per_block):
        by_set[tuple(sorted(per_block[block], key=_sub_order))].append(block)
    groups = [{"blocks": blocks, "modules": list(subs), "text": describe_submodules(subs)}
              for subs, blocks in by_set.items()]
    blocks = sorted(per_block)
    text = f"{list_name} {ranges(blocks)} ({_plural(len(blocks), 'block')})" if blocks else "no blocks"
    if len(groups) == 1:
        text += f", per block: {groups[0]['text']}"
    else:
        text += "".join(f"; {list_name} {ranges(g['blocks'])}: {g['text']}" for g in groups)
    return {"blocks": blocks, "block_count": len(blocks), "per_block": groups, "text": text}


def describe_submodules(subs: Iterable[str]) -> str:
    """"self_attn q,k,v,o; cross_attn q,k,v,o; ffn 0,2" for sub-module paths in report order."""
    by_parent: dict[str, list[str]] = {}
    for sub in subs:
        parent, _, leaf = sub.rpartition(".")
        by_parent.setdefault(parent, []).append(leaf)
    return "; ".join(f"{parent} {','.join(leaves)}" if parent else ",".join(leaves)
                     for parent, leaves in by_parent.items())


def ranges(numbers: list[int]) -> str:
    """"0-2, 5, 7-9" for sorted integers."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _sub_order(sub: str) -> tuple:
    return (BLOCK_SUBMODULES.index(sub), "") if sub in BLOCK_SUBMODULES else (len(BLOCK_SUBMODULES), sub)


def _module_order(name: str) -> tuple:
    m = _BLOCK.match(name.removeprefix(MUSUBI_PREFIX))
    if m:
        return (0, int(m[1]), _sub_order(m[2]))
    return (1, 0, (0, _natural(name)))


def _natural(text: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def metadata_notes(modules: list[dict], metadata: Mapping[str, str], peft_alphas: bool = False) -> list[str]:
    """What the metadata says about the weights: baked or PEFT alphas, and disagreements between the ss_network_*
    keys and the weights (the weights are what loaders use)."""
    notes = []
    if "ss_lora_baked_alpha" in metadata:
        notes.append(f"alpha is baked into the weights (scale 1 here, same ΔW); ss_lora_baked_alpha records the "
                     f"original alpha: {_cut(metadata['ss_lora_baked_alpha'])}")
    if peft_alphas:
        notes.append("alphas come from the lora_adapter_metadata header (PEFT lora_alpha), as diffusers applies them")
    kinds = {m["type"] for m in modules if m["type"]}
    declared = metadata.get("ss_network_module", "")
    declared_kind = next((k for k in ("loha", "lokr") if k in declared), "lora" if "lora" in declared else None)
    if declared_kind and len(kinds) == 1 and kinds != {declared_kind}:
        notes.append(f"ss_network_module is {declared!r} but the weights are {KIND_TITLES[next(iter(kinds))]}")
    ranks = {m["rank"] for m in modules if m["rank"] is not None}
    dim = metadata.get("ss_network_dim")
    if dim and len(ranks) == 1 and kinds != {"lokr"} and _float(dim) not in (None, float(next(iter(ranks)))):
        notes.append(f"ss_network_dim is {dim} but every module has rank {next(iter(ranks))}")
    return notes


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# -- the model check -------------------------------------------------------------------------
def read_model(path: str | os.PathLike) -> dict:
    """Read a DiT's Linear layers from safetensors headers: {"path", "layout", "linears": {official: (out, in)},
    "signature"}. UserError (ConfigError) when it cannot be located or read."""
    try:
        source = locate_dit(str(path), key="--model")
    except ConfigError as e:  # one "--model: ..." line reads better than a config problem list here
        raise UserError("; ".join(f"{key}: {message}" for key, message in e.problems)) from None
    if source.kind == "pretrained":
        files = [f for f in source.files if f.suffix == ".safetensors"]
        config = read_config(source.path, "--model")
        signature = dit_signature_from_config(config)
        layout = "diffusers folder"
    else:
        files, signature, layout = list(source.files), None, "official file" if len(source.files) == 1 else "shards"
    try:
        header = safetensors_shapes(files) if files else None
    except ValueError as e:
        raise UserError(f"--model: {e}; point --model at a complete .safetensors DiT") from e
    if header is None:
        raise UserError(
            f"--model: {source.path} is not in .safetensors format (a .pth cannot be read without loading it); "
            "point --model at the .safetensors DiT or a diffusers folder"
        )
    shapes = {name: shape for name, (_, shape) in header.items()}
    if source.kind == "pretrained":
        linears = _official_linears({_to_official(n): s for n, s in shapes.items()})
    else:
        shapes = strip_dit_prefix(shapes)
        if any(name.startswith(OFFICIAL_PREFIXES) for name in header):
            layout = "ComfyUI file" if len(files) == 1 else "ComfyUI shards"
        signature = dit_signature_from_shapes(shapes)
        linears = _official_linears(shapes)
    return {"path": str(source.path), "layout": layout, "linears": linears, "signature": signature}


def _to_official(diffusers_key: str) -> str:
    """The official key of a diffusers DiT key (`blocks.0.attn1.to_q.weight` -> `blocks.0.self_attn.q.weight`)."""
    module, dot, param = diffusers_key.rpartition(".")
    official = official_module_name(module) or _OUTSIDE_BY_DIFFUSERS.get(module)
    return f"{official}{dot}{param}" if official else diffusers_key


def _official_linears(shapes: Mapping[str, tuple]) -> dict[str, tuple[int, int]]:
    return {name[: -len(".weight")]: tuple(shape) for name, shape in shapes.items()
            if name.endswith(".weight") and len(shape) == 2}


def check_against_model(modules: list[dict], model: dict) -> dict:
    """Match each module to a Linear of `model` (read_model) by official name and compare out x in shapes."""
    linears = model["linears"]
    unmatched, mismatches, matched = [], [], 0
    layers = model["signature"]["layers"] if model["signature"] else None
    for m in modules:
        target = linears.get(m["module"])
        if target is None:
            unmatched.append({"module": m["module"], "reason": _unmatched_reason(m["module"], layers)})
        elif m["shape"] is not None and tuple(m["shape"]) != target:
            mismatches.append({"module": m["module"], "lora_shape": m["shape"], "model_shape": list(target),
                               "text": _shape_text(m, target)})
        else:
            matched += 1
    block_targets = [n for n in linears if (b := _BLOCK.match(n)) and b[2] in BLOCK_SUBMODULES]
    return {
        "path": model["path"],
        "layout": model["layout"],
        "signature": model["signature"],
        "variants": dit_variants(model["signature"]) if model["signature"] else [],
        "matched": matched,
        "model_block_linears": len(block_targets),
        "unmatched": unmatched,
        "shape_mismatches": mismatches,
        "hint": _width_hint(modules, model),
        "ok": not unmatched and not mismatches,
    }


def _unmatched_reason(module: str, layers: int | None) -> str:
    m = _BLOCK.match(module)
    if m and layers is not None and int(m[1]) >= layers:
        return f"the model has {_plural(layers, 'block')} ({ranges(list(range(layers)))})"
    if module.endswith(("cross_attn.k_img", "cross_attn.v_img")):
        return "k_img/v_img exist only in Wan2.1 I2V/FLF2V DiTs (a Wan2.1 I2V LoRA on another model?)"
    return "no Linear layer of that name in the model"


def _shape_text(module: dict, target: tuple[int, int]) -> str:
    (out, inp), (model_out, model_in) = module["shape"], target
    diffs = [f"{label} {a} vs the model's {b}" for label, a, b in
             (("out_features", out, model_out), ("in_features", inp, model_in)) if a != b]
    return f"ΔW is {out}x{inp}, the model's weight {model_out}x{model_in}: " + ", ".join(diffs)


def _width_hint(modules: list[dict], model: dict) -> str | None:
    """"a LoRA for dim 5120 (t2v-14B, ...) on a model of dim 1536 (t2v-1.3B)?" when the widths differ."""
    lora_dim = next((m["shape"][1] for m in modules if m["shape"] and m["module"].endswith(".self_attn.q")), None)
    model_dim = model["signature"]["dim"] if model["signature"] else None
    if lora_dim is None or model_dim is None or lora_dim == model_dim:
        return None
    return (f"a LoRA for a DiT of dim {lora_dim}{_dim_tasks(lora_dim)} on a model of dim {model_dim}"
            f"{_dim_tasks(model_dim)}? Use a LoRA trained for this model, or point --model at the DiT it was "
            "trained for")


def _dim_tasks(dim: int) -> str:
    names = [n for n, t in TASKS.items() if t.dit_signature()["dim"] == dim and not n.startswith("tiny-")]
    names = names or [n for n, t in TASKS.items() if t.dit_signature()["dim"] == dim]
    return f" ({', '.join(names)})" if names else ""


# -- hashes ----------------------------------------------------------------------------------
def verify_hashes(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> dict:
    """Recompute sshs_model_hash / sshs_legacy_hash; {key: {"stored", "computed", "status"}, "ok"}.

    status is "ok", "mismatch" or "no stored hash" (not a failure).
    """
    from musubi_pipe.network.lora_file import model_hashes

    computed = dict(zip(HASH_KEYS, model_hashes(dict(tensors), dict(metadata))))
    result: dict[str, Any] = {}
    for key in HASH_KEYS:
        stored = metadata.get(key)
        status = "no stored hash" if not stored else "ok" if stored == computed[key] else "mismatch"
        result[key] = {"stored": stored, "computed": computed[key], "status": status}
    result["ok"] = all(result[key]["status"] != "mismatch" for key in HASH_KEYS)
    return result


# -- text ------------------------------------------------------------------------------------
def format_report(report: dict) -> str:
    """The human-readable report of `inspect_lora(...)`."""
    lines = [f"file:      {report['file']} ({_size(report['size_bytes'])})",
             f"format:    {_format_line(report['format'])}",
             f"network:   {_network_line(report['network'])}",
             f"targets:   {report['targets']['text']}"]
    if report["targets"]["outside_blocks"]:
        lines.append(f"           outside blocks: {', '.join(report['targets']['outside_blocks'])}")
    lines += _metadata_lines(report["metadata"])
    lines += _module_lines(report["modules"])
    if report["unrecognised_keys"]:
        keys = report["unrecognised_keys"]
        lines.append(f"unrecognised keys ({len(keys)}): {', '.join(keys[:10])}" + (" ..." if len(keys) > 10 else ""))
    lines += [f"problem:   {p}" for p in report["problems"]]
    lines += [f"note:      {n}" for n in report["notes"]]
    if report["model"] is not None:
        lines += _model_lines(report["model"])
    if report["verify"] is not None:
        lines += _verify_lines(report["verify"])
    return "\n".join(lines)


def _format_line(fmt: dict) -> str:
    text = fmt["description"]
    if fmt["source_format"] is None:
        return text + " (the convert tool cannot read this file)"
    return text + f" (convert reads it as {fmt['source_format']!r})"


def _network_line(net: dict) -> str:
    parts = [net["title"] or "?", _plural(net["modules"], "module")]
    parts.append("rank " + _count_text(net["ranks"]))
    parts.append("alpha " + _count_text(net["alphas"]))
    parts.append("scale " + _count_text(net["scales"]))
    parts.append(_count_text(net["dtypes"]))
    parts.append(f"{net['parameters']:,} parameters")
    if net["delta_norm_total"] is not None:
        top = net["delta_norm_max"]
        parts.append(f"|ΔW| total {net['delta_norm_total']:.4g} (largest {top['norm']:.4g} in {top['module']})")
    return ", ".join(parts)


def _count_text(counts: dict[str, int]) -> str:
    if len(counts) == 1:
        return next(iter(counts))
    return " / ".join(f"{value} ({n})" for value, n in counts.items()) or "-"


def _metadata_lines(metadata: dict[str, str]) -> list[str]:
    if not metadata:
        return ["metadata:  none"]
    width = max(len(k) for k in metadata)
    lines = [f"metadata ({_plural(len(metadata), 'key')}):"]
    for key, value in metadata.items():
        lines.append(f"  {key:<{width}}  {_cut(value)}")
    return lines


def _cut(value: str) -> str:
    """`value` on one line, cut to MAX_VALUE_CHARS characters."""
    value = value.replace("\n", "\\n")
    if len(value) > MAX_VALUE_CHARS:
        value = f"{value[:MAX_VALUE_CHARS - 1]}… ({len(value)} chars; --json shows all)"
    return value


def _module_lines(modules: list[dict]) -> list[str]:
    show_type = len({m["type"] for m in modules}) > 1
    header = ["module", "rank", "alpha", "scale", "out x in", "|ΔW|"] + (["type"] if show_type else [])
    rows = []
    for m in modules:
        shape = f"{m['shape'][0]}x{m['shape'][1]}" if m["shape"] else "-"
        rank = "-" if m["shape"] is None else "full" if m["rank"] is None else str(m["rank"])
        row = [m["module"], rank, _num(m["alpha"]) if m["alpha"] is not None else "none",
               _num(m["scale"]) if m["scale"] is not None else "-", shape,
               f"{m['delta_norm']:.4g}" if m["delta_norm"] is not None else "-"]
        rows.append(row + ([KIND_TITLES.get(m["type"], m["type"])] if show_type else []))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:  # names left-aligned, numbers right-aligned
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return ("  " + "  ".join(cells)).rstrip()

    return [f"modules ({len(modules)}):", fmt(header)] + [fmt(r) for r in rows]


def _model_lines(model: dict) -> list[str]:
    what = model["layout"]
    if model["signature"]:
        variants = f": {', '.join(model['variants'])}" if model["variants"] else ""
        what += f", Wan DiT {describe_dit(model['signature'])}{variants}"
    lines = [f"model:     {model['path']} ({what})"]
    n = model["matched"] + len(model["unmatched"]) + len(model["shape_mismatches"])
    if model["ok"]:
        lines.append(f"  OK: all {_plural(n, 'module')} match a Linear of the model with the right shape "
                     f"({model['matched']} of the model's {model['model_block_linears']} block Linears adapted)")
        return lines
    lines.append(f"  MISMATCH: {model['matched']} of {n} modules match")
    if model["hint"]:
        lines.append(f"  hint: {model['hint']}")
    lines += _listed("unmatched", "unmatched modules", [f"{u['module']}: {u['reason']}" for u in model["unmatched"]])
    lines += _listed("shape    ", "shape mismatches",
                     [f"{s['module']}: {s['text']}" for s in model["shape_mismatches"]])
    return lines


def _listed(label: str, what: str, items: list[str]) -> list[str]:
    """The first MAX_LISTED items, each after `label`, then how many more there are."""
    lines = [f"  {label} {item}" for item in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        lines.append(f"  ... and {len(items) - MAX_LISTED} more {what} (--json lists all)")
    return lines


def _verify_lines(verify: dict) -> list[str]:
    lines = [f"verify:    {'OK' if verify['ok'] else 'MISMATCH'}"]
    for key in HASH_KEYS:
        h = verify[key]
        if h["status"] == "no stored hash":
            lines.append(f"  {key}: no stored hash (computed {h['computed']})")
        elif h["status"] == "ok":
            lines.append(f"  {key}: ok ({h['computed']})")
        else:
            lines.append(f"  {key}: MISMATCH, stored {h['stored']}, computed {h['computed']} (the tensors or ss_* "
                         "metadata changed after the hash was written)")
    return lines


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.4g}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
