"""loraid-table: print which units of a model each LORAID trains, for a task and LORAID settings.

    python -m musubi_pipe.tools loraid-table --task t2v-A14B [--units-per-id N] [--layout contiguous|interleaved]
                                             [--unit block|submodule] [--ids 1-5,8] [--modules] [--json]

The options mirror the config keys network.loraid_units_per_id, network.loraid_layout and
network.loraid_unit; the table is what training with network.loraid=K and the same settings trains
(musubi_pipe.network.loraid computes both, from the task's real block and expert count).

Prints the model's unit count and capacity (how many IDs fit), one line per ID with its units
("high blocks 0-3"; interleaved: "high block 0, low block 10, high block 20, low block 30"; "high"/"low"
are the Wan2.2 high_noise/low_noise experts; a group name such as "self_attn" follows a block when the ID
has only that part of it), and the units no ID trains.

Options:
  --ids SPEC   only these IDs: "3", "1-5", "1,4,9-12" (default: every ID up to the capacity)
  --modules    also list each ID's official module paths per expert (blocks.3.self_attn.q, ...)
  --json       print one JSON document: the settings, capacity, leftover units and, per ID, the allocation
               as written into LoRA metadata (plus "modules" with --modules)

Exit status 0; 2 for an unknown task, bad settings or an ID beyond the capacity (the message says how to get more).
"""

from __future__ import annotations

import argparse
import json

from musubi_pipe.errors import UserError

HELP = "print the LORAID allocation table (which blocks / sub-modules each ID trains) for a model and settings"


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the loraid-table options on `parser`."""
    from musubi_pipe.models.wan.tasks import TASKS

    parser.add_argument("--task", required=True, choices=sorted(TASKS), metavar="TASK",
                        help=f"the Wan task (model.task): {', '.join(sorted(TASKS))}")
    parser.add_argument("--units-per-id", type=_positive, default=1, metavar="N",
                        help="units each ID trains (network.loraid_units_per_id, default 1)")
    parser.add_argument("--layout", choices=("contiguous", "interleaved"), default="contiguous",
                        help="network.loraid_layout (default contiguous)")
    parser.add_argument("--unit", choices=("block", "submodule"), default="block",
                        help="network.loraid_unit: a whole block, or self_attn / cross_attn / ffn (default block)")
    parser.add_argument("--ids", metavar="SPEC", default=None, help='only these IDs, e.g. "1-5" or "1,4,9-12"')
    parser.add_argument("--modules", action="store_true", help="list each ID's module paths per expert")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")


def parse_ids(spec: str | None, capacity: int, more: str = "") -> list[int]:
    """The IDs of "3", "1-5", "1,4,9-12" (all of 1..capacity for None), in order, without repeats.

    `more` names the options that give more IDs, for the error about an ID beyond the capacity.
    """
    if spec is None:
        return list(range(1, capacity + 1))
    ids: list[int] = []
    for part in spec.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            lo, hi = int(first), int(last if sep else first)
        except ValueError:
            raise UserError(f"--ids {spec!r}: {part!r} is not an ID or a range like 1-5") from None
        if lo < 1 or hi < lo:
            raise UserError(f"--ids {spec!r}: {part!r} is not a valid range (IDs start at 1, write low-high)")
        if hi > capacity:
            fix = f"use {more} for more IDs" if more else "the most this model allows"
            raise UserError(f"--ids {spec!r}: ID {hi} is beyond the capacity {capacity} of these settings "
                            f"(IDs 1-{capacity}; {fix})")
        ids += [i for i in range(lo, hi + 1) if i not in ids]
    return ids


def build_table(task: str, units_per_id: int = 1, layout: str = "contiguous", unit: str = "block",
                ids: list[int] | None = None, modules: bool = False) -> dict:
    """The table as a JSON-ready dict: settings, model, capacity, leftover and one allocation per ID."""
    from musubi_pipe.network import loraid as lid

    units = lid.task_units(task, unit)
    capacity = lid.capacity(units, units_per_id)
    ids = list(range(1, capacity + 1)) if ids is None else ids
    allocations = [lid.allocation_for(task, k, units_per_id, layout, unit) for k in ids]
    if modules:
        candidates = {expert: lid.task_candidates(task) for expert in lid.task_experts(task)}
        for allocation in allocations:
            allocation["modules"] = lid.modules_by_expert(allocation, candidates)
    return {
        "arch": lid.ARCH,
        "task": task,
        "unit": unit,
        "units_per_id": units_per_id,
        "layout": layout,
        "version": lid.LORAID_VERSION,
        "model": lid.describe_model(units),
        "experts": lid.task_experts(task),
        "total_units": len(units),
        "capacity": capacity,
        "leftover": [u.as_list() for u in lid.leftover(units, units_per_id, layout)],
        "allocations": allocations,
    }


def format_table(table: dict) -> str:
    """The printed table: a header with the capacity, one line per ID, the units no ID trains."""
    from musubi_pipe.network.loraid import summarize

    n, c = table["units_per_id"], table["capacity"]
    lines = [
        f"LORAID allocation for {table['arch']} {table['task']} (loraid_unit={table['unit']}, "
        f"loraid_units_per_id={n}, loraid_layout={table['layout']})",
        f"this model has {table['model']} → capacity {c} IDs of {n} unit{'s' if n != 1 else ''}",
    ]
    if table["leftover"]:
        lines.append(f"trained by no ID: {summarize(table['leftover'])}")
    width = max(2, len(str(c)))
    lines.append(f"{'ID':>{width}}  units")
    for allocation in table["allocations"]:
        lines.append(f"{allocation['loraid']:>{width}}  {summarize(allocation['units'])}")
        for expert, names in allocation.get("modules", {}).items():
            if names:
                label = f"{expert}: " if expert else ""
                lines.append(f"{'':>{width}}    {label}{', '.join(names)}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Print the table (or its JSON) for the parsed options; return the exit status."""
    from musubi_pipe.network import loraid as lid

    capacity = lid.capacity(lid.task_units(args.task, args.unit), args.units_per_id)
    more = [hint for hint, useful in (("a smaller --units-per-id", args.units_per_id > 1),
                                      ("--unit submodule", args.unit == "block")) if useful]
    ids = parse_ids(args.ids, capacity, " or ".join(more))
    table = build_table(args.task, args.units_per_id, args.layout, args.unit, ids, args.modules)
    print(json.dumps(table, indent=1) if args.json else format_table(table), flush=True)
    return 0
