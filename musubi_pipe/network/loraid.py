"""LORAID: LoRA number K trains only its own slice of the transformer, so many LoRAs merge without overwriting.

    network.loraid: K                  # 1, 2, ...; null = off (the whole selection trains)
    network.loraid_units_per_id: N     # units per ID (default 1)
    network.loraid_unit: block         # block | submodule
    network.loraid_layout: contiguous  # contiguous | interleaved

Units. The allocation is made from the loaded architecture, not from a fixed count: a unit is one
transformer block of one expert (`loraid_unit=block`), or one sub-module group of one block of one expert
(`loraid_unit=submodule`: self_attn = q,k,v,o; cross_attn = q,k,v,o (+k_img,v_img on Wan2.1 I2V);
ffn = ffn.0, ffn.2). Wan2.2 A14B has two experts (high_noise, low_noise) of 40 blocks: 80 block units or
240 submodule units. Wan2.1 14B has one DiT of 40 blocks (40 / 120), Wan2.1 1.3B and TI2V-5B have 30 (30 / 90).

Canonical order: expert (high_noise before low_noise), then block, then group (self_attn, cross_attn, ffn).

Capacity. C = (number of units) // N, IDs are 1 ... C. The (number of units) − C·N units left over are
trained by no ID. An ID outside 1 ... C is an error (key network.loraid) that states the capacity; for more
IDs use a smaller loraid_units_per_id or loraid_unit=submodule (3 units per block).

Layouts (ID K gets N units; the IDs' units are pairwise disjoint and together they are the first C·N units of
the layout's list):

  contiguous   ID K takes units (K−1)·N ... K·N − 1 of the canonical order: on Wan2.2 A14B with N=4, ID 1 is
               high_noise blocks 0-3 and ID 11 is low_noise blocks 0-3. (The original LORAID scheme, with
               the real block count instead of a hard-coded 240.)
  interleaved  The units are listed depth-first: for each block, for each group of that block, one unit per
               expert. ID K takes positions K−1, K−1+C, K−1+2C, ... (N positions) of this list, so its units
               are spread evenly over depth. Stretch j = positions j·C ... j·C+C−1 holds the j-th unit of
               every ID. When C is a multiple of the number of experts E, each (block, group) lies inside one
               stretch and its experts are listed rotated left by (j mod E), where j is that stretch: stretch 0
               lists high_noise, low_noise; stretch 1 low_noise, high_noise; and so on. Without the rotation
               every ID would stay on one expert; with it an ID's units alternate experts. When C is not a
               multiple of E (with Wan's two experts: C odd) the plain list already alternates, and nothing is
               rotated. Example, Wan2.2 A14B, block units, N=4 (C=20): ID 1 = high 0, low 10, high 20, low 30;
               ID 2 = low 0, high 10, low 20, high 30; ID 20 = low 9, high 19, low 29, high 39.

Same settings, same allocation, always: everything here is a pure function of (task, unit, N, layout, K);
`LORAID_VERSION` is written into the allocation metadata and changes if the rule ever does.

    python -m musubi_pipe.tools loraid-table --task t2v-A14B --units-per-id 4 --layout interleaved

prints the table. No torch: config validation uses this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from musubi_pipe.errors import ConfigError

LORAID_VERSION = 1
GROUPS = ("self_attn", "cross_attn", "ffn")  # Wan's groups: the default where no layout is given
UNIT_KINDS = ("block", "submodule")
LAYOUTS = ("contiguous", "interleaved")
LORAID_DEFAULTS: dict[str, Any] = {
    "loraid": None,
    "loraid_units_per_id": 1,
    "loraid_layout": "contiguous",
    "loraid_unit": "block",
}
ARCH = "wan"  # the architecture of task-only calls (the loraid-table tool's --task is a Wan task)


class LoraidError(ConfigError):
    """A LORAID setting that cannot be honoured; `problems` holds one (key, message) pair."""

    def __init__(self, key: str, message: str):
        super().__init__([(key, message)])


@dataclass(frozen=True, order=True)
class Unit:
    """One allocatable slice: a block of an expert ("" = the only DiT), whole ("all") or one sub-module group."""

    expert: str
    block: int
    group: str = "all"

    def pattern(self, layout=None) -> str:
        """A regex that fully matches (re.fullmatch) the official module paths of this unit; `layout` (the family's
        LoraidLayout) names the block list and groups, Wan's by default."""
        block_list, all_groups = (layout.block_list, layout.groups) if layout is not None else ("blocks", GROUPS)
        groups = "(" + "|".join(all_groups) + ")" if self.group == "all" else self.group
        return rf"{re.escape(block_list)}\.{self.block}\.{groups}\..*"

    def modules(self, candidates: Iterable[str], layout=None) -> list[str]:
        """The official module paths of this unit among the model's LoRA candidates, in their order."""
        regex = re.compile(self.pattern(layout))
        return [name for name in candidates if regex.fullmatch(name)]

    def as_list(self) -> list:
        """[expert, block, group]: the JSON form used in allocation metadata."""
        return [self.expert, self.block, self.group]

    def __str__(self) -> str:
        where = f"{_short(self.expert)} block {self.block}".strip()
        return where if self.group == "all" else f"{where} {self.group}"


UnitLike = Union[Unit, Sequence]


def as_unit(value: UnitLike) -> Unit:
    """A Unit from a Unit or its JSON form [expert, block, group]."""
    if isinstance(value, Unit):
        return value
    expert, block, group = value
    return Unit(str(expert), int(block), str(group))


# -- units of a model ------------------------------------------------------------------------
def model_units(experts: Sequence[str], num_blocks: int, unit: str = "block",
                groups: Sequence[str] = GROUPS) -> list[Unit]:
    """Every unit of a model in canonical order: expert (as given), then block, then group."""
    _check_choice(unit, UNIT_KINDS, "network.loraid_unit")
    unit_groups = ("all",) if unit == "block" else tuple(groups)
    return [Unit(e, b, g) for e in experts for b in range(num_blocks) for g in unit_groups]


def layout_for(task: str, arch: str = ARCH):
    """The family's LoraidLayout of `task` (Family.loraid_layout); LoraidError when the family has none;
    ConfigError on model.task for an unknown task."""
    from musubi_pipe.models import get_family

    layout = get_family(arch).loraid_layout({"task": task})
    if layout is None:
        raise LoraidError("network.loraid", f"LORAID allocation is not built for model.arch={arch}; remove "
                                            "network.loraid")
    return layout


def task_experts(task: str, arch: str = ARCH) -> list[str]:
    """The expert names of a task ([""] for one DiT; high_noise, low_noise for Wan2.2 A14B); no torch."""
    return list(layout_for(task, arch).experts)


def task_units(task: str, unit: str = "block", arch: str = ARCH) -> list[Unit]:
    """The units of a task's model (see model_units); ConfigError on model.task for an unknown task."""
    layout = layout_for(task, arch)
    return model_units(layout.experts, layout.num_blocks, unit, layout.groups)


def task_candidates(task: str, arch: str = ARCH) -> list[str]:
    """The official LoRA target paths of one expert of a task, as family.lora_targets names them (no torch)."""
    return list(layout_for(task, arch).candidates)


# -- allocation ------------------------------------------------------------------------------
def capacity(units: Sequence[Unit], units_per_id: int) -> int:
    """How many IDs these units give at `units_per_id` units each."""
    _check_units_per_id(units_per_id, len(units))
    return len(units) // units_per_id


def layout_order(units: Sequence[Unit], units_per_id: int, layout: str) -> list[Unit]:
    """The list the IDs are cut from: the canonical order (contiguous) or the depth-first order (interleaved).

    For interleaved, `units` must be in canonical order; see the module docstring for the rotation rule.
    """
    _check_choice(layout, LAYOUTS, "network.loraid_layout")
    if layout == "contiguous":
        return list(units)
    c = capacity(units, units_per_id)
    experts = list(dict.fromkeys(u.expert for u in units))
    rotate = len(experts) > 1 and c % len(experts) == 0
    slots: dict[tuple[int, str], dict[str, Unit]] = {}
    for u in units:
        slots.setdefault((u.block, u.group), {})[u.expert] = u
    order: list[Unit] = []
    for (block, group) in sorted(slots, key=lambda key: (key[0], _group_rank(key[1]))):
        shift = (len(order) // c) % len(experts) if rotate else 0
        for expert in experts[shift:] + experts[:shift]:
            if expert in slots[(block, group)]:
                order.append(slots[(block, group)][expert])
    return order


def allocate(units: Sequence[Unit], loraid: int, units_per_id: int = 1, layout: str = "contiguous") -> list[Unit]:
    """The N units of ID `loraid` (1-based) among `units` (canonical order); LoraidError outside 1 ... capacity."""
    c = capacity(units, units_per_id)
    _check_id(loraid, units, units_per_id, c)
    order = layout_order(units, units_per_id, layout)
    if layout == "contiguous":
        return order[(loraid - 1) * units_per_id: loraid * units_per_id]
    return [order[loraid - 1 + j * c] for j in range(units_per_id)]


def leftover(units: Sequence[Unit], units_per_id: int, layout: str) -> list[Unit]:
    """The units no ID trains at these settings (the tail of the layout's list beyond capacity · N)."""
    return layout_order(units, units_per_id, layout)[capacity(units, units_per_id) * units_per_id:]


def allocation_for(task: str, loraid: int, units_per_id: int = 1, layout: str = "contiguous",
                   unit: str = "block", arch: str = ARCH) -> dict:
    """The JSON-ready allocation of ID `loraid` on a task's model (for LoRA metadata and the table)."""
    units = task_units(task, unit, arch)
    chosen = allocate(units, loraid, units_per_id, layout)
    return {
        "version": LORAID_VERSION,
        "arch": arch,
        "task": task,
        "loraid": loraid,
        "unit": unit,
        "units_per_id": units_per_id,
        "layout": layout,
        "capacity": capacity(units, units_per_id),
        "units": [u.as_list() for u in chosen],
    }


def allocation_from_config(net_cfg: Mapping[str, Any], task: str, arch: str = ARCH) -> dict | None:
    """The allocation the `network` settings ask for, or None when network.loraid is null; ConfigError if invalid."""
    problems = check_loraid_settings(net_cfg, task, arch=arch)
    if problems:
        raise ConfigError(problems)
    cfg = loraid_settings(net_cfg)
    if cfg["loraid"] is None:
        return None
    return allocation_for(task, cfg["loraid"], cfg["loraid_units_per_id"], cfg["loraid_layout"], cfg["loraid_unit"],
                          arch)


def _units_of(allocation: Mapping | Iterable[UnitLike]) -> list[Unit]:
    """The units of an allocation dict, or of a list of units / [expert, block, group] lists."""
    items = allocation["units"] if isinstance(allocation, Mapping) else allocation
    return [as_unit(u) for u in items]


def include_patterns(allocation_units: Mapping | Iterable[UnitLike], expert: str, layout=None) -> list[str]:
    """Full-match regexes selecting the allocated modules of `expert` (a whitelist, as network.targets.filter_targets reads one).

    An empty list means this ID trains nothing on that expert: build no network for it (an empty include
    list given to filter_targets would select every module).
    """
    return [u.pattern(layout) for u in _units_of(allocation_units) if u.expert == expert]


def modules_by_expert(allocation: Mapping | Iterable[UnitLike],
                      candidates_by_expert: Mapping[str, Iterable[str]], layout=None) -> dict[str, list[str]]:
    """{expert: the official module paths the allocation trains on it} ([] = nothing), in candidate order.

    LoraidError when the allocation names an expert or a block the model does not have (made for another model).
    """
    units = _units_of(allocation)
    candidates = {expert: list(names) for expert, names in candidates_by_expert.items()}
    for u in units:
        if u.expert not in candidates:
            raise LoraidError("network.loraid", (
                f"the allocation names expert {u.expert!r} but the model has experts {sorted(candidates)}; "
                "the allocation was made for another model (check model.task)"))
        if not u.modules(candidates[u.expert], layout):
            raise LoraidError("network.loraid", (
                f"no LoRA target of the model belongs to unit {u} (pattern {u.pattern(layout)}); the allocation was made "
                "for another model (check model.task)"))
    result = {}
    for expert, names in candidates.items():
        patterns = [re.compile(p) for p in include_patterns(units, expert, layout)]
        result[expert] = [n for n in names if any(p.fullmatch(n) for p in patterns)]
    return result


def overlapping(alloc_a: Mapping | Iterable[UnitLike], alloc_b: Mapping | Iterable[UnitLike]) -> list[Unit]:
    """Units shared by two allocations (same expert and block, and same group or one of them whole-block).

    For a whole block against one of its groups the group unit is reported. Order: that of `alloc_a`.
    """
    found: list[Unit] = []
    units_b = _units_of(alloc_b)
    for a in _units_of(alloc_a):
        for b in units_b:
            same_block = a.expert == b.expert and a.block == b.block
            if same_block and (a.group == b.group or "all" in (a.group, b.group)):
                shared = b if a.group == "all" else a
                if shared not in found:
                    found.append(shared)
    return found


# -- settings --------------------------------------------------------------------------------
def loraid_settings(net_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The four LORAID keys of `network`, with LORAID_DEFAULTS for missing or null ones (loraid stays null)."""
    return {k: net_cfg.get(k) if net_cfg.get(k) is not None else default for k, default in LORAID_DEFAULTS.items()}


def check_loraid_settings(net_cfg: Mapping[str, Any], task: str, where: str = "network",
                          arch: str = ARCH) -> list[tuple[str, str]]:
    """(key, message) for every bad LORAID setting, including an ID beyond the model's capacity.

    The capacity is checked only when the other settings and model.task are valid (an unknown task is
    reported by the model family's own check).
    """
    cfg = loraid_settings(net_cfg)
    problems: list[tuple[str, str]] = []
    loraid, n = cfg["loraid"], cfg["loraid_units_per_id"]
    if loraid is not None and not _is_int(loraid):
        problems.append((f"{where}.loraid", f"must be an integer ID (1, 2, ...) or null (LORAID off), got {loraid!r}"))
    if not _is_int(n) or n < 1:
        problems.append((f"{where}.loraid_units_per_id", f"must be an integer >= 1 (units each ID trains), got {n!r}"))
    for key, choices in (("loraid_layout", LAYOUTS), ("loraid_unit", UNIT_KINDS)):
        if cfg[key] not in choices:
            problems.append((f"{where}.{key}", f"must be one of {', '.join(choices)}, got {cfg[key]!r}"))
    if problems or loraid is None:
        return problems
    try:
        units = task_units(task, cfg["loraid_unit"], arch)
    except LoraidError as e:
        return problems + e.problems
    except ConfigError:
        return problems
    try:
        allocate(units, loraid, n, cfg["loraid_layout"])
    except ConfigError as e:
        problems += [(f"{where}.{key.removeprefix('network.')}", msg) for key, msg in e.problems]
    return problems


# -- descriptions ----------------------------------------------------------------------------
def describe_model(units: Sequence[Unit]) -> str:
    """E.g. "80 units (2 experts × 40 blocks)" or "120 units (40 blocks × 3 sub-module groups)"."""
    experts = len({u.expert for u in units})
    blocks = len({u.block for u in units})
    groups = len({u.group for u in units})
    parts = [f"{experts} experts"] if experts > 1 else []
    parts.append(f"{blocks} blocks")
    if groups > 1:
        parts.append(f"{groups} sub-module groups")
    return f"{len(units)} units ({' × '.join(parts)})"


def summarize(units: Iterable[UnitLike]) -> str:
    """A compact description: "high blocks 0-3", "high block 0, low block 10", "block 5 self_attn+ffn"."""
    per_block: dict[tuple[str, int], list[str]] = {}
    for u in map(as_unit, units):
        per_block.setdefault((u.expert, u.block), []).append(u.group)
    runs: list[list] = []  # [expert, first block, last block, groups label]
    for (expert, block), groups in per_block.items():
        label = "" if "all" in groups or set(groups) == set(GROUPS) else "+".join(sorted(set(groups), key=_group_rank))
        last = runs[-1] if runs else None
        if last and last[0] == expert and last[2] == block - 1 and last[3] == label:
            last[2] = block
        else:
            runs.append([expert, block, block, label])
    texts = []
    for expert, first, last, label in runs:
        blocks = f"block {first}" if first == last else f"blocks {first}-{last}"
        texts.append(" ".join(part for part in (_short(expert), blocks, label) if part))
    return ", ".join(texts)


# -- helpers ---------------------------------------------------------------------------------
def _short(expert: str) -> str:
    return expert.removesuffix("_noise")


def _group_rank(group: str) -> int:
    return GROUPS.index(group) if group in GROUPS else -1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_choice(value: Any, choices: Sequence[str], key: str) -> None:
    if value not in choices:
        raise LoraidError(key, f"must be one of {', '.join(choices)}, got {value!r}")


def _check_units_per_id(units_per_id: Any, total: int) -> None:
    if not _is_int(units_per_id) or units_per_id < 1:
        raise LoraidError("network.loraid_units_per_id", f"must be an integer >= 1, got {units_per_id!r}")
    if units_per_id > total:
        raise LoraidError("network.loraid_units_per_id", (
            f"is {units_per_id} but this model has only {total} units, so not even one ID fits; "
            f"use at most {total}"))


def _check_id(loraid: Any, units: Sequence[Unit], units_per_id: int, c: int) -> None:
    if not _is_int(loraid):
        raise LoraidError("network.loraid", f"must be an integer ID (1, 2, ...) or null (LORAID off), got {loraid!r}")
    if 1 <= loraid <= c:
        return
    if loraid < 1:
        raise LoraidError("network.loraid", (
            f"is {loraid}; IDs start at 1 (IDs 1-{c} for these settings); set it to null to turn LORAID off"))
    more = ["a smaller loraid_units_per_id"] if units_per_id > 1 else []
    if len({u.group for u in units}) == 1:
        more.append(f"loraid_unit=submodule ({len(GROUPS)} units per block)")
    hint = f"use {' or '.join(more)} for more" if more else "this is the most this model allows"
    raise LoraidError("network.loraid", (
        f"is {loraid}, beyond the capacity: this model has {describe_model(units)} → {len(units)} IDs of 1 unit; "
        f"capacity for loraid_units_per_id={units_per_id} is {c} (IDs 1-{c}); {hint}"))


def check_lora_overlaps(files: list[tuple[str, set[str], bool]], where: str = "") -> list[str]:
    """Compare the modules several LoRA files change: [(path, official module names, is a LORAID file)].

    Two LORAID files that share modules are an error (UserError listing the shared modules): their IDs
    were meant to be disjoint, so one was trained with other settings or for another model. For ordinary
    LoRAs an overlap is expected and only described: returns one warning text per overlapping pair.
    """
    from musubi_pipe.errors import UserError

    warnings, errors = [], []
    for i, (path_a, modules_a, loraid_a) in enumerate(files):
        for path_b, modules_b, loraid_b in files[i + 1 :]:
            shared = sorted(modules_a & modules_b)
            if not shared:
                continue
            shown = ", ".join(shared[:10]) + (f" and {len(shared) - 10} more" if len(shared) > 10 else "")
            text = f"{path_a} and {path_b} both change {len(shared)} module(s){where}: {shown}"
            (errors if loraid_a and loraid_b else warnings).append(text)
    if errors:
        raise UserError("LORAID files must not overlap (check their loraid settings and model): " + "; ".join(errors))
    return warnings
