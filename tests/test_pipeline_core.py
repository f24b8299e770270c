"""Fingerprints, the store and the executor, with fake stages (no models)."""

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from musubi_pipe.errors import UserError
from musubi_pipe.pipeline.executor import execute, explain, format_plan, plan
from musubi_pipe.pipeline.fingerprint import DigestCache, canonical_json, diff_documents, fingerprint
from musubi_pipe.pipeline.stage import Job, Stage
from musubi_pipe.pipeline.store import Store

GOLDEN_DOC = {
    "stage": "train",
    "version": 1,
    "config": {"optimizer.lr": 0.0002, "network.network_dim": 32, "training.timestep_sampling": "shift"},
    "upstream": {"cache_latents": "a" * 64, "cache_text": "b" * 64},
    "dit": {"files": ["c" * 64], "dtype": "bfloat16"},
    "caption": "ein Bild ✓",
}


def test_golden_fingerprint():
    # Pinned: changing canonical JSON or hashing would silently invalidate every user's cache.
    assert canonical_json({"b": 1, "a": [1.5, None, True]}) == '{"a":[1.5,null,true],"b":1}'
    assert fingerprint(GOLDEN_DOC) == "3af6ba3d6cc19aebbb6ae6c3c66cd75d1dce36fd2f75218740dcf4020e4867aa"


def test_fingerprint_sensitivity():
    changed = json.loads(json.dumps(GOLDEN_DOC))
    changed["config"]["optimizer.lr"] = 0.0001
    assert fingerprint(changed) != fingerprint(GOLDEN_DOC)
    reordered = dict(reversed(list(GOLDEN_DOC.items())))
    assert fingerprint(reordered) == fingerprint(GOLDEN_DOC)


def test_diff_documents_names_keys():
    old = {"config": {"optimizer.lr": 0.0001, "network.network_dim": 4}}
    new = {"config": {"optimizer.lr": 0.0002, "network.network_dim": 4}}
    assert diff_documents(old, new) == ["config.optimizer.lr 0.0001 -> 0.0002"]


def test_explain_counts_items():
    last = {"items": ["a", "b"], "config": {"x": 1}}
    assert explain(last, {"items": ["a", "b", "c"], "config": {"x": 1}}) == "1 new item"
    assert explain(last, {"items": ["a"], "config": {"x": 2}}) == "1 item removed; x 1 -> 2"
    assert explain({"upstream": {"u": "1"}}, {"upstream": {"u": "2"}}) == "u output changed"
    assert explain(None, {"items": []}) == "no earlier artifact of this stage"


def test_digest_cache_hashes_once(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x" * 1000)
    cache = DigestCache(tmp_path / "digests.json")
    first = cache.digest(f)
    cache.save()
    again = DigestCache(tmp_path / "digests.json")
    assert again.digest(f) == first and again.hashed == 0
    f.write_bytes(b"y" * 1000)
    os.utime(f, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert again.digest(f) != first and again.hashed == 1


# -- fake stages -------------------------------------------------------------------------------
CALLS = []


def _make_stage(name, upstream=(), keys=("x",), payload="data"):
    def run(ctx):
        CALLS.append(name)
        (ctx.out_dir / "out.txt").write_text(f"{payload}:{ctx.cfg}")
        return {"items_total": 3, "items_computed": 3}

    return Stage(name=name, version=1, upstream=upstream, keys=keys, inputs=lambda job: {}, run=run)


def _job(tmp_path, x=1, y=1):
    return Job(cfg={"x": x, "y": y}, store=Store(tmp_path / "cache"), digests=None, run_dir=tmp_path)


STAGES = [_make_stage("first"), _make_stage("second", upstream=("first",), keys=("y",))]


def _run(job, mode="auto", verify="digest", selected=("first", "second")):
    planned = plan(job, STAGES, list(selected), mode=mode, verify=verify)
    return planned, execute(job, planned, mode=mode, verify=verify)


def test_skip_on_hit_and_runner_not_called(tmp_path):
    CALLS.clear()
    _, records = _run(_job(tmp_path))
    assert [r["status"] for r in records] == ["ran", "ran"] and CALLS == ["first", "second"]
    CALLS.clear()
    _, records = _run(_job(tmp_path))
    assert [r["status"] for r in records] == ["cached", "cached"] and CALLS == []
    assert records[0]["items_computed"] == 0 and records[0]["items_total"] == 3


def test_changed_key_reruns_downstream_only(tmp_path):
    _run(_job(tmp_path))
    CALLS.clear()
    planned, records = _run(_job(tmp_path, y=2))
    assert CALLS == ["second"]
    assert planned[1].reason == "y 1 -> 2"
    assert "second         will run" in format_plan(plan(_job(tmp_path, y=3), STAGES, ["first", "second"]))


def test_force_and_frozen(tmp_path):
    _run(_job(tmp_path))
    CALLS.clear()
    _run(_job(tmp_path), mode="force")
    assert CALLS == ["first", "second"]
    with pytest.raises(UserError, match="frozen"):
        _run(_job(tmp_path, x=5), mode="frozen")


def test_subset_needs_upstream(tmp_path):
    with pytest.raises(UserError, match="needs the output of first"):
        _run(_job(tmp_path), selected=("second",))


def test_truncated_and_corrupt_outputs_are_misses(tmp_path):
    planned, _ = _run(_job(tmp_path))
    out = planned[0].artifact / "out.txt"
    out.write_text("x")  # truncated: size differs from the manifest
    CALLS.clear()
    _run(_job(tmp_path))
    assert CALLS == ["first"]  # same fingerprint, so downstream stays valid
    trash = list((tmp_path / "cache" / "first" / ".trash").iterdir())
    assert len(trash) == 1
    # same size, different bytes, mtime set back: the default (digest) notices; only verify=size does not
    for verify, calls in (("size", []), ("digest", ["first"]), ("full", ["first"])):
        out = planned[0].artifact / "out.txt"
        text, st = out.read_text(), out.stat()
        out.write_text(text[:-1] + ("A" if text[-1] != "A" else "B"))
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        CALLS.clear()
        _run(_job(tmp_path), verify=verify)
        assert CALLS == calls, verify
    (planned[0].artifact / "manifest.json").write_text("{not json")
    CALLS.clear()
    _run(_job(tmp_path))
    assert CALLS == ["first"]


def test_failed_stage_leaves_nothing_published(tmp_path):
    def boom(ctx):
        (ctx.out_dir / "half.txt").write_text("half")
        raise RuntimeError("killed")

    stage = Stage("boom", 1, (), ("x",), lambda job: {}, boom)
    job = _job(tmp_path)
    planned = plan(job, [stage], ["boom"])
    with pytest.raises(RuntimeError):
        execute(job, planned)
    assert Store(tmp_path / "cache").lookup("boom", planned[0].fingerprint) is None
    assert not (tmp_path / "cache" / "boom" / planned[0].fingerprint).exists()


def _slow_stage():
    return Stage("slow", 1, (), ("x",), lambda job: {}, _count_run)


def _count_run(ctx):
    with open(Path(ctx.job.store.root) / "computed", "a") as f:
        f.write("x")
    (ctx.out_dir / "out.txt").write_text("slow")
    return {}


def _locked_worker(root, results):
    job = Job(cfg={"x": 1}, store=Store(root), digests=None, run_dir=Path(root))
    planned = plan(job, [_slow_stage()], ["slow"])
    (Path(root) / "planned").write_text(str(planned[0].cached))
    results.put(execute(job, planned)[0]["status"])


def test_waiting_job_reuses_the_winner(tmp_path):
    """A job that planned a miss but waited on the lock reuses what the lock holder published."""
    store = Store(tmp_path)
    job = Job(cfg={"x": 1}, store=store, digests=None, run_dir=tmp_path)
    fp = plan(job, [_slow_stage()], ["slow"])[0].fingerprint
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with store.lock("slow", fp):
        worker = ctx.Process(target=_locked_worker, args=(str(tmp_path), results))
        worker.start()
        deadline = time.monotonic() + 60
        while not (tmp_path / "planned").exists() and time.monotonic() < deadline:
            worker.join(0.05)
        assert (tmp_path / "planned").read_text() == "False"  # it saw a miss when planning
        tmp = store.new_tmp_dir("slow", fp)
        (tmp / "out.txt").write_text("winner")
        store.publish("slow", fp, tmp, {"inputs": {}, "stats": {}})
    worker.join(60)
    assert results.get(timeout=5) == "cached"
    assert not (tmp_path / "computed").exists()
