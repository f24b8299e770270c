"""Merge LoRA/LoHa/LoKr files into a DiT, streaming tensor by tensor, into one official-format .safetensors.

The DiT's tensors come from its family (Family.dit_tensors: Wan, HunyuanVideo, Z-Image), officially named; a
tensor may hold several LoRA modules as row slices (DitTensor.parts). What follows describes Wan's inputs.

    report = merge_loras("wan2.1_t2v_1.3B_bf16.safetensors", [("style.safetensors", 0.8), ("face.safetensors", 1.0)],
                         "wan_merged.safetensors", dtype="bfloat16", device="cuda")

What it writes: W' = W + Σ_k multiplier_k · ΔW_k for every module a LoRA targets (ΔW computed in float32 on `device`,
then cast to the tensor's output dtype); every other tensor is copied unchanged (bitwise, when its dtype is kept). The
output has the official Wan key names (`blocks.0.self_attn.q.weight`, ...), loadable by musubi_pipe's loader, ComfyUI
and musubi-tuner, and a `__metadata__` with `ss_merged_loras` (JSON list of {file, multiplier, sshs_model_hash}).

Inputs (resolved by models/wan/locate.py, as the training config's model.dit is):
- an official single file or shard set (`--dit` on any shard, or every shard), ComfyUI files (the
  `model.diffusion_model.` / `diffusion_model.` prefix is stripped), fp16/bf16/fp32 or plain fp8_e4m3fn
  (fp8 tensors are upcast: to `dtype`, else to the file's most common other float dtype, else bfloat16);
- an official Wan-AI folder, e.g. Wan2.2-T2V-A14B/high_noise_model (config.json of class WanModel + shards);
- a diffusers transformer folder or pipeline root (keys renamed to official names with keymap's rule table).
ComfyUI fp8_scaled files and .pth files are refused. Wan2.2 A14B has two experts, i.e. two DiTs: merge each with its
own LoRA in its own call (`expert` picks one inside a repo root or a diffusers pipeline root).

LoRA files: the musubi/sd-scripts layout (`lora_unet_<official name, dots as underscores>` + lora_down/lora_up/alpha,
or LoHa hada_*, or LoKr lokr_*) is mapped back to official module names through the DiT's own module list (every 2-D
`<module>.weight`, so LoRAs on head.head or text_embedding work too); every other layout network/formats.py reads
(ComfyUI/diffusion-pipe `diffusion_model.`, diffusers/PEFT `transformer.`, ai-toolkit, Wan-Fun) goes through its
`read_lora`. Scales follow ComfyUI: LoRA alpha/rank(down), LoHa alpha/rank(w1_b), LoKr alpha/rank of a decomposed
factor (1 when both factors are full); a missing or zero alpha means alpha = rank, as the trainer reads it. Per-LoRA
`include`/`exclude` patterns select modules with the rule of network/targets.py (re.fullmatch on the official module
path; include is a whitelist, exclude wins).

Memory: the output header (names, dtypes, shapes, offsets) is computed up front from the input headers, then each
tensor is read, merged and written before the next one is read, so the peak is about the largest tensor three times
over (as read, its float32 copy, the cast result; a LoRA is added with one addmm, LoHa/LoKr add a ΔW-sized float32
temporary) plus the LoRAs, never a whole model: merging a rank-32 LoRA into a 2 GiB bf16 file of Wan-14B-sized
tensors (13824×5120 FFN weights) peaked at +440 MiB resident, where load-merge-save_file took +4 GiB. Each tensor is
read through its own short-lived `safe_open`: one long-lived handle keeps every page it touched mapped, and resident
memory then grows to the size of the input. The file is written by network.safetensors_stream: to a temporary file
in the output folder, fsynced, re-opened with safetensors to check its header, and moved into place with os.replace,
so a reader never sees a partial file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from musubi_pipe.errors import UserError
from musubi_pipe.models.base import DitTensor, NotADit
from musubi_pipe.network.factory import network_kind_of
from musubi_pipe.network.formats import read_lora
from musubi_pipe.network.lora import KIND_TITLES, lora_name
from musubi_pipe.network.loraid import check_lora_overlaps
from musubi_pipe.network.lora_file import load_lora_file, model_hashes
from musubi_pipe.network.safetensors_stream import DTYPE_CODES, plan_layout, write_streaming

log = logging.getLogger("musubi_pipe")

DIT_KEY = "--dit"
CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_FP8 = ("F8_E4M3", "F8_E5M2")
_FLOATS = ("F64", "F32", "F16", "BF16", *_FP8)
# the key suffixes each adapter type may hold per module
ADAPTER_SUFFIXES = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
}
_WRONG_MODEL = "a LoRA trained for another model or variant (a 14B LoRA on the 1.3B model?)"


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to merge: its file, multiplier and (optional) module patterns."""

    path: Path
    multiplier: float = 1.0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


InputTensor = DitTensor  # one tensor of the DiT (models/base.py)


class Adapter(NamedTuple):
    """One module of a LoRA file: its type ("lora", "loha", "lokr") and tensors by musubi key suffix."""

    kind: str
    parts: dict[str, torch.Tensor]


@dataclass
class LoadedLora:
    """A LoRA file's adapters by official module name (tensors on the merge device), after include/exclude."""

    spec: LoraSpec
    modules: dict[str, Adapter]
    model_hash: str
    available: frozenset[str]  # every module of the file, before include/exclude
    loraid: bool = False  # a LORAID file (ss_loraid metadata): it must not overlap another LORAID file


# -- the DiT side --------------------------------------------------------------------------------------------------
def dit_inputs(dit, expert: str = "", family=None) -> tuple[list[InputTensor], list[Path], object]:
    """(every tensor of the DiT `dit`, officially named; the files read; the family it belongs to).

    `family` None: the first registered family whose reader recognizes the DiT (Family.dit_tensors); UserError
    lists what each said when none does."""
    from musubi_pipe.models import family_names, get_family

    families = [family] if family is not None else [get_family(name) for name in family_names()]
    said = []
    for candidate in families:
        try:
            inputs, files = candidate.dit_tensors(dit, expert)
        except NotADit as e:
            said.append(str(e))
            continue
        return inputs, files, candidate
    raise UserError("; ".join(said) or f"{DIT_KEY}: no architecture reads {dit}")


def output_dtypes(inputs: Sequence[InputTensor], dtype: torch.dtype | None) -> dict[str, str]:
    """{official name: output dtype code}: floats become `dtype` when given; fp8 is always upcast (see module doc)."""
    if dtype is not None:
        code = CODE_OF[dtype]
        return {t.name: code if t.dtype in _FLOATS else t.dtype for t in inputs}
    others = Counter(t.dtype for t in inputs if t.dtype in _FLOATS and t.dtype not in _FP8)
    upcast = others.most_common(1)[0][0] if others else "BF16"
    return {t.name: upcast if t.dtype in _FP8 else t.dtype for t in inputs}


def module_shapes(inputs: Iterable[InputTensor]) -> dict[str, tuple[int, ...]]:
    """{official module name: weight shape} of every 2-D `<module>.weight`, and of each part of a fused weight
    (DitTensor.parts: its rows): what a LoRA module can target."""
    shapes = {}
    for t in inputs:
        if t.name.endswith(".weight") and len(t.shape) == 2:
            shapes[t.name[: -len(".weight")]] = t.shape
            shapes.update({module: (rows, t.shape[1]) for module, _, rows in t.parts})
    return shapes


def tensor_modules(item: InputTensor) -> list[tuple[str, slice]]:
    """The LoRA modules merged into one DiT tensor, each with the rows it covers: the tensor's own module (all
    rows) and its parts."""
    if not (item.name.endswith(".weight") and len(item.shape) == 2):
        return []
    whole = [(item.name[: -len(".weight")], slice(None))]
    return whole + [(module, slice(first, first + rows)) for module, first, rows in item.parts]


# -- the LoRA side -------------------------------------------------------------------------------------------------
def load_lora(spec: LoraSpec, modules: Mapping[str, tuple[int, ...]], device) -> LoadedLora:
    """Read `spec`'s file, map its modules to the DiT's (`modules`: official name -> weight shape), apply the
    patterns and check every ΔW shape; UserError names the file, the module and the shapes."""
    tensors, metadata = load_lora_file(spec.path)
    if all(k.startswith("lora_unet_") and not k.startswith("lora_unet__") for k in tensors):
        named = musubi_adapters(spec.path, tensors, modules)
    else:
        named = other_layout_adapters(spec.path, tensors, metadata)
    unknown = sorted(set(named) - set(modules))
    if unknown:
        raise UserError(f"{spec.path}: {len(unknown)} module(s) match no 2-D weight of the DiT, e.g. {unknown[0]!r} "
                        f"(DiT modules look like {next(iter(modules), '<none>')!r}); {_WRONG_MODEL}")
    selected = select_modules(named, spec)
    _check_shapes(spec.path, selected, modules)
    on_device = {m: Adapter(a.kind, {s: v.to(device) for s, v in a.parts.items()}) for m, a in selected.items()}
    model_hash = metadata.get("sshs_model_hash") or model_hashes(tensors, metadata)[0]
    return LoadedLora(spec, on_device, model_hash, frozenset(named), "ss_loraid" in metadata)


def musubi_adapters(path: Path, tensors: Mapping[str, torch.Tensor],
                    modules: Mapping[str, tuple[int, ...]]) -> dict[str, Adapter]:
    """{official module: Adapter} of a musubi-layout file; `lora_unet_<underscored>` stems are looked up among the
    DiT's `modules` (as lora.official_name does: '_' -> '.' cannot be undone by rules). Unknown stems are kept."""
    kind = network_kind_of(tensors, str(path))
    by_lora_name = {lora_name(m): m for m in modules}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        stem, _, suffix = key.partition(".")
        if suffix not in ADAPTER_SUFFIXES[kind]:
            raise UserError(f"{path}: key {key} is not part of a {KIND_TITLES[kind]} module (expected "
                            f"{', '.join(sorted(ADAPTER_SUFFIXES[kind]))}); DoRA, Tucker and bias patches cannot be merged")
        grouped.setdefault(by_lora_name.get(stem, stem), {})[suffix] = value
    return {module: Adapter(kind, parts) for module, parts in grouped.items()}


def other_layout_adapters(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, Adapter]:
    """{official module: Adapter} of a ComfyUI, diffusers/PEFT, ai-toolkit or Wan-Fun file, read by network.formats."""
    canonical, _ = read_lora(tensors, metadata, source=str(path))
    adapters = {}
    for module, entry in canonical.items():
        alpha = torch.tensor(float(entry["alpha"]))
        if entry["kind"] == "lora":
            parts = {"lora_down.weight": entry["down"], "lora_up.weight": entry["up"], "alpha": alpha}
        else:
            parts = {**entry["tensors"], "alpha": alpha}
        adapters[module] = Adapter(entry["kind"], parts)
    return adapters


def select_modules(named: dict[str, Adapter], spec: LoraSpec) -> dict[str, Adapter]:
    """The modules of `named` kept by spec.include (whitelist, re.fullmatch) and then spec.exclude."""
    def compiled(patterns: Sequence[str], what: str) -> list[re.Pattern]:
        out = []
        for pattern in patterns:
            try:
                out.append(re.compile(pattern))
            except re.error as e:
                raise UserError(f"--{what} {pattern!r} is not a valid regular expression ({e})") from None
        return out

    include, exclude = compiled(spec.include, "include"), compiled(spec.exclude, "exclude")
    kept = {m: p for m, p in named.items() if not include or any(r.fullmatch(m) for r in include)}
    kept = {m: p for m, p in kept.items() if not any(r.fullmatch(m) for r in exclude)}
    if not kept:
        raise UserError(f"{spec.path}: --include/--exclude leave none of its {len(named)} modules (they look like "
                        f"{next(iter(named), '<none>')!r}; patterns must match the whole official path, e.g. "
                        r"'blocks\.[0-9]\..*'); fix the patterns or drop this LoRA")
    return kept


def check_patterns_match(loaded: Sequence[LoadedLora]) -> None:
    """UserError for an include/exclude pattern that matches no module of any LoRA it applies to (a typo?)."""
    users: dict[tuple[str, str], list[LoadedLora]] = {}
    for lora in loaded:
        for what, patterns in (("include", lora.spec.include), ("exclude", lora.spec.exclude)):
            for pattern in patterns:
                users.setdefault((what, pattern), []).append(lora)
    for (what, pattern), loras in users.items():
        regex = re.compile(pattern)
        if not any(regex.fullmatch(m) for lora in loras for m in lora.available):
            example = min(loras[0].available)
            raise UserError(f"--{what} {pattern!r} matches no module of {', '.join(str(l.spec.path) for l in loras)} "
                            f"(a typo?); patterns must match the whole official module path, e.g. {example!r}; add "
                            "'.*' to match a prefix")


def delta_shape(kind: str, parts: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """The (out, in) shape of the ΔW a module's tensors make; ValueError when they do not fit together."""
    if kind == "lora":
        up, down = parts["lora_up.weight"].shape, parts["lora_down.weight"].shape
        if len(up) != 2 or len(down) != 2 or up[1] != down[0]:
            raise ValueError(f"lora_up {list(up)} and lora_down {list(down)} are not a Linear LoRA pair")
        return up[0], down[1]
    if kind == "loha":
        a1, b1, a2, b2 = (parts[f"hada_w{i}_{x}"].shape for i, x in ((1, "a"), (1, "b"), (2, "a"), (2, "b")))
        if not (a1[1] == b1[0] and a2[1] == b2[0] and (a1[0], b1[1]) == (a2[0], b2[1])):
            raise ValueError(f"hada_w1_a {list(a1)}, hada_w1_b {list(b1)}, hada_w2_a {list(a2)}, hada_w2_b {list(b2)} "
                             "do not fit together")
        return a1[0], b1[1]
    w1, w2 = _lokr_factor_shape(parts, "lokr_w1"), _lokr_factor_shape(parts, "lokr_w2")
    return w1[0] * w2[0], w1[1] * w2[1]


def _lokr_factor_shape(parts: Mapping[str, torch.Tensor], name: str) -> tuple[int, int]:
    if name in parts:
        return tuple(parts[name].shape)
    a, b = parts[f"{name}_a"].shape, parts[f"{name}_b"].shape
    if a[1] != b[0]:
        raise ValueError(f"{name}_a {list(a)} and {name}_b {list(b)} do not fit together")
    return a[0], b[1]


def _check_shapes(path: Path, selected: Mapping[str, Adapter], modules: Mapping[str, tuple[int, ...]]) -> None:
    """UserError naming the file, modules and shapes when a module's ΔW does not fit its DiT weight."""
    problems = []
    for module, (kind, parts) in selected.items():
        try:
            shape = delta_shape(kind, parts)
        except (KeyError, ValueError) as e:
            what = f"misses {e}" if isinstance(e, KeyError) else str(e)
            raise UserError(f"{path}: {KIND_TITLES[kind]} module {module} {what}; the file is damaged") from None
        if tuple(shape) != tuple(modules[module]):
            problems.append(f"{module}: ΔW {list(shape)} vs DiT weight {list(modules[module])}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{path}: {len(problems)} module(s) do not fit the DiT: {'; '.join(problems[:3])}{more}; "
                        f"{_WRONG_MODEL}")


def _scale(parts: Mapping[str, torch.Tensor], rank: int | None) -> float:
    """alpha / rank; 1 without a rank (LoKr of two full factors), and alpha = rank when it is missing or 0 (as the
    trainer reads it)."""
    alpha = float(parts["alpha"]) if "alpha" in parts else 0.0
    return alpha / rank if alpha and rank else 1.0


def delta_weight(kind: str, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The float32 ΔW (scale applied, multiplier not) of one module's tensors, on their device (see module doc)."""
    f = {name: value.float() for name, value in parts.items()}
    if kind == "lora":
        return (f["lora_up.weight"] @ f["lora_down.weight"]).mul_(_scale(f, f["lora_down.weight"].shape[0]))
    if kind == "loha":
        delta = (f["hada_w1_a"] @ f["hada_w1_b"]).mul_(f["hada_w2_a"] @ f["hada_w2_b"])
        return delta.mul_(_scale(f, f["hada_w1_b"].shape[0]))
    rank, factors = None, []
    for name in ("lokr_w1", "lokr_w2"):
        if name in f:
            factors.append(f[name])
        else:
            rank = f[f"{name}_b"].shape[0]
            factors.append(f[f"{name}_a"] @ f[f"{name}_b"])
    return torch.kron(factors[0], factors[1]).mul_(_scale(f, rank))


def add_delta(weight: torch.Tensor, adapter: Adapter, multiplier: float) -> None:
    """weight += multiplier·ΔW in place (float32); a LoRA as one addmm, without a ΔW-sized temporary."""
    if adapter.kind != "lora":
        weight.add_(delta_weight(*adapter), alpha=multiplier)
        return
    up, down = adapter.parts["lora_up.weight"].float(), adapter.parts["lora_down.weight"].float()
    weight.addmm_(up, down, alpha=multiplier * _scale(adapter.parts, down.shape[0]))


# -- merging -------------------------------------------------------------------------------------------------------
def as_spec(lora, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> LoraSpec:
    """A LoraSpec from a LoraSpec, a path, or a (path, multiplier) pair (`include`/`exclude` for the latter two)."""
    if isinstance(lora, LoraSpec):
        return lora
    path, multiplier = (lora, 1.0) if isinstance(lora, (str, os.PathLike)) else lora
    return LoraSpec(Path(path), float(multiplier), tuple(include), tuple(exclude))


def parse_dtype(dtype) -> torch.dtype | None:
    """None, a torch dtype, or a name (bfloat16/bf16, float16/fp16, float32/fp32) -> torch dtype or None."""
    if dtype is None:
        return None
    value = DTYPE_NAMES.get(dtype) if isinstance(dtype, str) else dtype
    if value not in DTYPE_NAMES.values():
        raise UserError(f"--dtype {dtype!r} is not supported; use bfloat16, float16 or float32")
    return value


def merge_loras(dit_files, loras: Sequence, output, *, dtype=None, device="cpu", expert: str = "",
                include: Sequence[str] = (), exclude: Sequence[str] = (), family=None) -> dict:
    """Merge `loras` ((path, multiplier) pairs or LoraSpecs) into the DiT `dit_files` and write `output`.

    `dtype` (None: keep each tensor's, upcasting fp8) sets the output float dtype, `device` where ΔW is computed,
    `expert` ("high_noise"/"low_noise") the Wan2.2 expert inside a repo or pipeline root, `include`/`exclude` module
    patterns for LoRAs given as pairs, `family` the architecture (None: recognized from the DiT). Returns {"output", "bytes", "tensors", "changed", "loras": [{"file",
    "multiplier", "kind", "modules"}], "seconds"}. Raises UserError naming the file at fault and the fix.
    """
    start = time.perf_counter()
    output, out_dtype = Path(output), parse_dtype(dtype)
    specs = [as_spec(lora, include, exclude) for lora in loras]
    if not specs:
        raise UserError("--lora: no LoRA given; pass at least one --lora FILE[:MULTIPLIER]")
    if output.suffix != ".safetensors":
        raise UserError(f"--output {output} must end in .safetensors")
    if output.exists() and any(output.resolve() == Path(f).resolve() for f in _paths(dit_files)):
        raise UserError(f"--output {output} is one of the DiT files being read; write to a new file")
    inputs, files, _ = dit_inputs(dit_files, expert, family)
    modules = module_shapes(inputs)
    loaded = [load_lora(spec, modules, device) for spec in specs]
    check_patterns_match(loaded)
    for text in check_lora_overlaps([(str(lo.spec.path), set(lo.modules), lo.loraid) for lo in loaded]):
        log.warning("merge: LoRAs %s", text)

    by_module: dict[str, list[LoadedLora]] = {}
    for lora in loaded:
        for module in lora.modules:
            by_module.setdefault(module, []).append(lora)
    items = {t.name: t for t in inputs}
    dtypes = output_dtypes(inputs, out_dtype)
    metadata = {"format": "pt", "ss_merged_loras": json.dumps(
        [{"file": lora.spec.path.name, "multiplier": lora.spec.multiplier, "sshs_model_hash": lora.model_hash}
         for lora in loaded]), "ss_merged_base": json.dumps([f.name for f in files])}
    order, header, data_bytes = plan_layout(items, dtypes, {n: t.shape for n, t in items.items()}, metadata)

    def produce(name: str) -> torch.Tensor:
        updates = [(lora, module, rows) for module, rows in tensor_modules(items[name])
                   for lora in by_module.get(module, [])]
        return merged_tensor(items[name], DTYPE_CODES[dtypes[name]], updates, device)

    write_streaming(output, header, data_bytes, order, produce)
    return {
        "output": str(output),
        "bytes": output.stat().st_size,
        "tensors": len(order),
        "changed": len(by_module),
        "loras": [{"file": str(lora.spec.path), "multiplier": lora.spec.multiplier,
                   "kind": "+".join(sorted({a.kind for a in lora.modules.values()})), "modules": len(lora.modules)}
                  for lora in loaded],
        "seconds": time.perf_counter() - start,
    }


def _paths(dit_files) -> list:
    return [dit_files] if isinstance(dit_files, (str, os.PathLike)) else list(dit_files)


def merged_tensor(item: InputTensor, out_dtype: torch.dtype, updates: Sequence[tuple[LoadedLora, str, slice]],
                  device) -> torch.Tensor:
    """Read one DiT tensor (through its own safe_open, see the module doc, or from the state dict a .pt was read
    into), add Σ multiplier·ΔW of each (LoRA, module, rows) of `updates` to those rows in float32 on `device`, and
    return it on the CPU in `out_dtype`."""
    if item.loaded is not None:
        tensor = item.loaded
    else:
        with safe_open(str(item.file), framework="pt", device="cpu") as f:
            tensor = f.get_tensor(item.key)
    if not updates:
        return tensor.to(out_dtype)
    weight = tensor.to(device=device, dtype=torch.float32)
    del tensor
    for lora, module, rows in updates:
        add_delta(weight[rows], lora.modules[module], lora.spec.multiplier)
    return weight.to(out_dtype).cpu()
