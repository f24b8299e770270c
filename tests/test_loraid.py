"""LORAID allocation (musubi_pipe.network.loraid) and the loraid-table tool: capacities, layouts, errors, CLI.

No torch, no models: units come from the Wan task table, candidates from the official module names.
"""

import argparse
import itertools
import json
import subprocess
import sys

import pytest

from musubi_pipe.errors import ConfigError
from musubi_pipe.network import loraid as lid
from musubi_pipe.network.loraid import LoraidError, Unit
from musubi_pipe.network.targets import filter_targets
from musubi_pipe.tools import loraid_table

HIGH, LOW = "high_noise", "low_noise"


def _all_ids(units, n, layout):
    return [lid.allocate(units, k, n, layout) for k in range(1, lid.capacity(units, n) + 1)]


# -- units and capacity ----------------------------------------------------------------------
@pytest.mark.parametrize("task, unit, total", [
    ("t2v-A14B", "block", 80), ("t2v-A14B", "submodule", 240), ("i2v-A14B", "block", 80),
    ("t2v-14B", "block", 40), ("t2v-14B", "submodule", 120), ("t2v-1.3B", "block", 30), ("ti2v-5B", "block", 30),
])
def test_unit_counts(task, unit, total):
    assert len(lid.task_units(task, unit)) == total


def test_canonical_order_and_capacity():
    units = lid.task_units("t2v-A14B", "submodule")
    assert units[:4] == [Unit(HIGH, 0, "self_attn"), Unit(HIGH, 0, "cross_attn"), Unit(HIGH, 0, "ffn"),
                         Unit(HIGH, 1, "self_attn")]
    assert units[120] == Unit(LOW, 0, "self_attn") and units[-1] == Unit(LOW, 39, "ffn")
    assert lid.task_experts("t2v-14B") == [""] and lid.task_experts("t2v-A14B") == [HIGH, LOW]
    blocks = lid.task_units("t2v-A14B")
    assert [lid.capacity(blocks, n) for n in (1, 3, 4, 12)] == [80, 26, 20, 6]
    assert lid.capacity(lid.task_units("t2v-14B"), 4) == 10
    assert lid.capacity(lid.task_units("t2v-1.3B"), 4) == 7
    assert lid.capacity(units, 4) == 60


# -- contiguous ------------------------------------------------------------------------------
def test_contiguous_ids_exact():
    units = lid.task_units("t2v-A14B")
    assert lid.allocate(units, 1, 4) == [Unit(HIGH, b) for b in range(4)]
    assert lid.allocate(units, 2, 4) == [Unit(HIGH, b) for b in range(4, 8)]
    assert lid.allocate(units, 11, 4) == [Unit(LOW, b) for b in range(4)]
    assert lid.allocate(units, 20, 4) == [Unit(LOW, b) for b in range(36, 40)]
    one = lid.task_units("t2v-14B")
    assert lid.allocate(one, 10, 4, "contiguous") == [Unit("", b) for b in range(36, 40)]
    small = lid.task_units("t2v-1.3B")
    assert lid.allocate(small, 7, 4) == [Unit("", b) for b in range(24, 28)]
    assert lid.leftover(small, 4, "contiguous") == [Unit("", 28), Unit("", 29)]
    sub = lid.task_units("t2v-A14B", "submodule")
    assert lid.allocate(sub, 2, 4) == [Unit(HIGH, 1, "cross_attn"), Unit(HIGH, 1, "ffn"), Unit(HIGH, 2, "self_attn"),
                                       Unit(HIGH, 2, "cross_attn")]


# -- interleaved -----------------------------------------------------------------------------
def test_interleaved_pinned():
    units = lid.task_units("t2v-A14B")
    assert lid.allocate(units, 1, 4, "interleaved") == [Unit(HIGH, 0), Unit(LOW, 10), Unit(HIGH, 20), Unit(LOW, 30)]
    assert lid.allocate(units, 2, 4, "interleaved") == [Unit(LOW, 0), Unit(HIGH, 10), Unit(LOW, 20), Unit(HIGH, 30)]
    assert lid.allocate(units, 20, 4, "interleaved") == [Unit(LOW, 9), Unit(HIGH, 19), Unit(LOW, 29), Unit(HIGH, 39)]
    # odd capacity (13): the plain depth-first list alternates, no rotation
    assert lid.allocate(units, 1, 6, "interleaved") == [
        Unit(HIGH, 0), Unit(LOW, 6), Unit(HIGH, 13), Unit(LOW, 19), Unit(HIGH, 26), Unit(LOW, 32)]
    assert lid.leftover(units, 6, "interleaved") == [Unit(HIGH, 39), Unit(LOW, 39)]
    assert lid.allocate(lid.task_units("t2v-14B"), 1, 4, "interleaved") == [Unit("", b) for b in (0, 10, 20, 30)]
    sub = lid.task_units("t2v-A14B", "submodule")
    assert lid.allocate(sub, 1, 4, "interleaved") == [
        Unit(HIGH, 0, "self_attn"), Unit(LOW, 10, "self_attn"), Unit(HIGH, 20, "self_attn"), Unit(LOW, 30, "self_attn")]


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 8, 12])
def test_interleaved_spreads_over_experts_and_depth(n):
    units = lid.task_units("t2v-A14B")
    for chosen in _all_ids(units, n, "interleaved"):
        assert {u.expert for u in chosen} == {HIGH, LOW}
        experts = [u.expert for u in chosen]
        assert all(a != b for a, b in zip(experts, experts[1:]))  # alternating
        blocks = [u.block for u in chosen]  # evenly over depth: C // 2 blocks or more apart (C = capacity)
        assert all(b - a >= lid.capacity(units, n) // 2 for a, b in zip(blocks, blocks[1:]))


# -- both layouts ----------------------------------------------------------------------------
@pytest.mark.parametrize("task, unit, n, layout", [
    (task, unit, n, layout)
    for task in ("t2v-A14B", "t2v-14B", "t2v-1.3B")
    for unit in ("block", "submodule")
    for n in (1, 3, 4, 7)
    for layout in ("contiguous", "interleaved")
])
def test_ids_disjoint_and_cover_first_units(task, unit, n, layout):
    units = lid.task_units(task, unit)
    allocations = _all_ids(units, n, layout)
    assert all(len(a) == n for a in allocations)
    for a, b in itertools.combinations(allocations, 2):
        assert not set(a) & set(b)
    c = lid.capacity(units, n)
    order = lid.layout_order(units, n, layout)
    assert sorted(order) == sorted(units)  # a permutation
    assert sorted(u for a in allocations for u in a) == sorted(order[: c * n])
    assert sorted(lid.leftover(units, n, layout)) == sorted(order[c * n:])


def test_deterministic():
    first = lid.allocation_for("t2v-A14B", 7, 4, "interleaved", "submodule")
    again = lid.allocation_for("t2v-A14B", 7, 4, "interleaved", "submodule")
    assert first == again and json.loads(json.dumps(first)) == first
    assert first == {
        "version": 1, "arch": "wan", "task": "t2v-A14B", "loraid": 7, "unit": "submodule", "units_per_id": 4,
        "layout": "interleaved", "capacity": 60,
        "units": [[HIGH, 1, "self_attn"], [LOW, 11, "self_attn"], [HIGH, 21, "self_attn"], [LOW, 31, "self_attn"]],
    }


# -- errors ----------------------------------------------------------------------------------
def test_capacity_error_text():
    units = lid.task_units("t2v-A14B")
    with pytest.raises(LoraidError) as err:
        lid.allocate(units, 21, 4)
    assert isinstance(err.value, ConfigError)
    key, msg = err.value.problems[0]
    assert key == "network.loraid"
    assert "80 units (2 experts × 40 blocks) → 80 IDs of 1 unit" in msg
    assert "capacity for loraid_units_per_id=4 is 20" in msg
    assert "smaller loraid_units_per_id" in msg and "loraid_unit=submodule (3 units per block)" in msg
    with pytest.raises(LoraidError, match="IDs start at 1"):
        lid.allocate(units, 0, 4)
    with pytest.raises(LoraidError, match="this is the most this model allows"):
        lid.allocate(lid.task_units("t2v-14B", "submodule"), 121, 1)
    with pytest.raises(LoraidError, match="only 30 units"):
        lid.allocate(lid.task_units("t2v-1.3B"), 1, 31)
    with pytest.raises(LoraidError, match="loraid_layout"):
        lid.allocate(units, 1, 4, "striped")


def test_check_loraid_settings():
    assert lid.check_loraid_settings({}, "t2v-A14B") == []
    assert lid.check_loraid_settings({"loraid": None, "loraid_units_per_id": None}, "t2v-A14B") == []
    assert lid.check_loraid_settings({"loraid": 20, "loraid_units_per_id": 4}, "t2v-A14B") == []
    problems = dict(lid.check_loraid_settings({"loraid": 21, "loraid_units_per_id": 4}, "t2v-A14B"))
    assert list(problems) == ["network.loraid"]
    assert "capacity for loraid_units_per_id=4 is 20" in problems["network.loraid"]
    problems = dict(lid.check_loraid_settings(
        {"loraid": "1", "loraid_units_per_id": 0, "loraid_layout": "striped", "loraid_unit": "layer"}, "t2v-A14B"))
    assert set(problems) == {"network.loraid", "network.loraid_units_per_id", "network.loraid_layout",
                             "network.loraid_unit"}
    assert "contiguous, interleaved" in problems["network.loraid_layout"]
    assert "block, submodule" in problems["network.loraid_unit"]
    assert dict(lid.check_loraid_settings({"loraid": True}, "t2v-A14B")).keys() == {"network.loraid"}
    too_many = dict(lid.check_loraid_settings({"loraid": 1, "loraid_units_per_id": 100}, "t2v-A14B"))
    assert "only 80 units" in too_many["network.loraid_units_per_id"]
    assert lid.check_loraid_settings({"loraid": 99}, "no-such-task") == []  # model.task is reported elsewhere
    assert lid.check_loraid_settings({"loraid": 121}, "t2v-14B", where="net")[0][0] == "net.loraid"
    assert lid.allocation_from_config({"loraid": None}, "t2v-A14B") is None
    allocation = lid.allocation_from_config({"loraid": 2, "loraid_units_per_id": 4}, "t2v-A14B")
    assert allocation["units"][0] == [HIGH, 4, "all"]
    with pytest.raises(ConfigError):
        lid.allocation_from_config({"loraid": 81}, "t2v-A14B")


# -- modules and patterns --------------------------------------------------------------------
def test_unit_modules_and_include_patterns():
    candidates = lid.task_candidates("i2v-14B")
    assert "blocks.3.cross_attn.k_img" in candidates
    assert "blocks.3.cross_attn.k_img" not in lid.task_candidates("t2v-14B")
    assert Unit("", 3, "cross_attn").modules(candidates) == [
        f"blocks.3.cross_attn.{m}" for m in ("q", "k", "v", "o", "k_img", "v_img")]
    assert Unit("", 3).modules(candidates) == [c for c in candidates if c.startswith("blocks.3.")]
    assert Unit("", 1).modules(candidates) == [c for c in candidates if c.startswith("blocks.1.")]  # not 10-19
    for unit in ("block", "submodule"):
        allocation = lid.allocation_for("i2v-14B", 5, 4, "interleaved", unit)
        expected = [m for u in allocation["units"] for m in lid.as_unit(u).modules(candidates)]
        patterns = lid.include_patterns(allocation, "")
        selected = filter_targets(dict.fromkeys(candidates), patterns, None, "network")
        assert sorted(selected) == sorted(expected) and len(set(expected)) == len(expected)


def test_modules_by_expert():
    candidates = lid.task_candidates("t2v-A14B")
    by_expert = {HIGH: candidates, LOW: candidates}
    contiguous = lid.allocation_for("t2v-A14B", 1, 4)
    modules = lid.modules_by_expert(contiguous, by_expert)
    assert modules[LOW] == [] and lid.include_patterns(contiguous, LOW) == []
    assert modules[HIGH] == [c for c in candidates if int(c.split(".")[1]) < 4]
    inter = lid.modules_by_expert(lid.allocation_for("t2v-A14B", 1, 4, "interleaved"), by_expert)
    assert {int(m.split(".")[1]) for m in inter[HIGH]} == {0, 20}
    assert {int(m.split(".")[1]) for m in inter[LOW]} == {10, 30}
    with pytest.raises(LoraidError, match="another model"):
        lid.modules_by_expert(contiguous, {"": candidates})
    with pytest.raises(LoraidError, match="another model"):
        lid.modules_by_expert([["", 35, "all"]], {"": lid.task_candidates("t2v-1.3B")})


def test_overlapping():
    a = lid.allocation_for("t2v-A14B", 1, 4)
    assert lid.overlapping(a, lid.allocation_for("t2v-A14B", 2, 4)) == []
    assert lid.overlapping(a, lid.allocation_for("t2v-A14B", 1, 4, "interleaved")) == [Unit(HIGH, 0)]
    sub = lid.allocation_for("t2v-A14B", 1, 4, unit="submodule")  # high block 0, high block 1 self_attn
    assert lid.overlapping(a, sub) == [Unit(HIGH, 0, "self_attn"), Unit(HIGH, 0, "cross_attn"),
                                       Unit(HIGH, 0, "ffn"), Unit(HIGH, 1, "self_attn")]
    assert lid.overlapping(sub["units"], [[LOW, 0, "all"]]) == []


def test_summarize():
    assert lid.summarize(lid.allocate(lid.task_units("t2v-A14B"), 1, 4)) == "high blocks 0-3"
    assert lid.summarize(lid.allocate(lid.task_units("t2v-A14B"), 1, 4, "interleaved")) == (
        "high block 0, low block 10, high block 20, low block 30")
    assert lid.summarize(lid.allocate(lid.task_units("t2v-14B", "submodule"), 2, 4)) == (
        "block 1 cross_attn+ffn, block 2 self_attn+cross_attn")
    assert lid.describe_model(lid.task_units("t2v-14B", "submodule")) == "120 units (40 blocks × 3 sub-module groups)"


# -- the tool --------------------------------------------------------------------------------
def _run_tool(capsys, *argv) -> str:
    parser = argparse.ArgumentParser()
    loraid_table.add_arguments(parser)
    assert loraid_table.main(parser.parse_args(list(argv))) == 0
    return capsys.readouterr().out


def test_tool_text(capsys):
    out = _run_tool(capsys, "--task", "t2v-A14B", "--units-per-id", "4", "--layout", "interleaved", "--ids", "1-2,20")
    lines = out.splitlines()
    assert "80 units (2 experts × 40 blocks) → capacity 20 IDs of 4 units" in lines[1]
    assert lines[-3:] == [
        " 1  high block 0, low block 10, high block 20, low block 30",
        " 2  low block 0, high block 10, low block 20, high block 30",
        "20  low block 9, high block 19, low block 29, high block 39",
    ]
    out = _run_tool(capsys, "--task", "t2v-1.3B", "--units-per-id", "4")
    assert "trained by no ID: blocks 28-29" in out and out.splitlines()[-1] == " 7  blocks 24-27"
    out = _run_tool(capsys, "--task", "t2v-14B", "--unit", "submodule", "--ids", "1", "--modules")
    assert out.splitlines()[-1].strip() == ", ".join(f"blocks.0.self_attn.{m}" for m in "qkvo")


def test_tool_json(capsys):
    table = json.loads(_run_tool(capsys, "--task", "t2v-A14B", "--units-per-id", "3", "--json", "--modules"))
    assert table["capacity"] == 26 and table["total_units"] == 80 and len(table["allocations"]) == 26
    assert table["leftover"] == [[LOW, 38, "all"], [LOW, 39, "all"]]
    first = table["allocations"][0]
    assert {k: v for k, v in first.items() if k != "modules"} == lid.allocation_for("t2v-A14B", 1, 3)
    assert first["modules"][LOW] == [] and len(first["modules"][HIGH]) == 30


def test_tool_errors(capsys):
    from musubi_pipe.errors import UserError

    parser = argparse.ArgumentParser()
    loraid_table.add_arguments(parser)
    with pytest.raises(UserError, match="beyond the capacity 20"):
        loraid_table.main(parser.parse_args(["--task", "t2v-A14B", "--units-per-id", "4", "--ids", "19-21"]))
    with pytest.raises(UserError, match="not an ID"):
        loraid_table.main(parser.parse_args(["--task", "t2v-A14B", "--ids", "x"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--task", "t2v-240B"])


def test_import_is_torch_free():
    code = ("import sys, musubi_pipe.network.loraid as l, musubi_pipe.tools.loraid_table as t; "
            "l.allocation_for('t2v-A14B', 1, 4, 'interleaved'); l.task_candidates('i2v-14B'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
