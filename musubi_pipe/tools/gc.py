"""gc: remove cache entries that no recent run references, and report the space freed.

    python -m musubi_pipe.tools gc [--cache DIR] [--runs DIR ...] [--keep-days N]
                                   [--grace-minutes M] [--dry-run]

For whoever's cache folder (paths.cache) has grown; `collect_garbage()` does the same from Python.
Run it with --dry-run first: it prints the same report, says "would free" and removes nothing.

Roots (what recent runs use):
  every stage artifact named ("artifact") in a run record <runs>/**/run.json modified within
  --keep-days days (multirun sweeps nest them: runs/<sweep>/<n>/run.json), plus the upstream
  artifacts each was built from (inputs.upstream of its manifest.json). Dry-run records list a plan
  without artifacts and add no roots. Repeat --runs for every runs folder sharing this cache.

Removed:
  - artifacts of item stages (cache_latents, cache_text: each holds only an index.json naming its
    items, cheap to rebuild) that are not roots;
  - item entries items/<kind>/<ab>/<key>.safetensors (cached latents, text embeddings) that no
    remaining index.json names, root or not, so no index ever names a missing item; <ab> folders
    left empty go too;
  - everything in <stage>/.trash/ and items/.trash/ (entries found corrupt and moved aside);
  - <stage>/.tmp/ folders of processes no longer running, and items/**/*.tmp files of killed writers.

Never removed:
  - artifacts of other stages (train LoRAs, sample videos), referenced or not: delete
    <cache>/<stage>/<fingerprint>/ by hand if you are sure;
  - anything modified within --grace-minutes: a run caching right now writes its items before it
    publishes its index, and is never robbed;
  - an artifact whose lock <stage>/.locks/<fingerprint>.lock another process holds (reported);
    while any lock of an item stage is held (that stage is computing), no item of its kind goes;
  - <stage>/.partial/ (resumable training state), .locks/, .last/, digests.json,
    device_probe.json.

Best run when no run is starting: a run that found an old unreferenced item in place while gc
was deciding may publish an index naming it after gc removed it (that run then fails to load the
item; rerunning it recomputes). Sizes are apparent file sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

from musubi_pipe.errors import UserError
from musubi_pipe.pipeline.store import MANIFEST, _pid_alive  # torch-free: stdlib + fingerprint

HELP = "remove cache entries no recent run references and report the space freed"

ITEMS = "items"
INDEX = "index.json"
ITEM_SUFFIX = ".safetensors"
CATEGORIES = ("items", "indexes", "trash", "tmp")
# mirrors conf/paths/default.yaml, used when that file cannot be read
_FALLBACK_PATHS = {"cache": "outputs/cache", "runs": "outputs/runs"}


@dataclass
class Tally:
    """How many things of one category were (or would be) removed, and their bytes."""

    count: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.count += 1
        self.bytes += size


# -- defaults and command line ---------------------------------------------------------------
def default_paths() -> dict[str, str]:
    """Return {"cache", "runs"} as conf/paths/default.yaml sets them (relative to the current folder)."""
    try:
        from omegaconf import OmegaConf

        from musubi_pipe.config.locate import conf_dir

        loaded = OmegaConf.load(conf_dir() / "paths" / "default.yaml")
        paths = OmegaConf.to_container(OmegaConf.create({"paths": loaded}), resolve=True)["paths"]
        return {key: str(paths[key]) for key in _FALLBACK_PATHS}
    except Exception:  # a moved or edited file must not break gc: fall back to its known values
        return dict(_FALLBACK_PATHS)


def _non_negative(text: str) -> float:
    """argparse type: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the gc options on `parser` (the `gc` subcommand of python -m musubi_pipe.tools)."""
    defaults = default_paths()
    parser.add_argument(
        "--cache", metavar="DIR", default=defaults["cache"],
        help=f"cache root, the paths.cache your runs used (default: {defaults['cache']}, relative to "
        "the current folder, as in conf/paths/default.yaml)",
    )
    parser.add_argument(
        "--runs", metavar="DIR", action="append",
        help=f"runs folder (paths.runs) searched for run.json at any depth; repeat it for every runs "
        f"folder that shares this cache (default: {defaults['runs']})",
    )
    parser.add_argument(
        "--keep-days", metavar="N", type=_non_negative, default=30.0,
        help="run records modified within N days are recent; their artifacts are roots (default: 30)",
    )
    parser.add_argument(
        "--grace-minutes", metavar="M", type=_non_negative, default=60.0,
        help="never remove item files, artifacts or tmp folders modified within M minutes (default: 60)",
    )
    parser.add_argument("--dry-run", action="store_true", help="report what would be freed; remove nothing")
    parser.set_defaults(_default_runs=defaults["runs"])


def main(args: argparse.Namespace) -> int:
    """Run gc with parsed options; the report is printed by collect_garbage. Return the exit status."""
    collect_garbage(args.cache, args.runs or [args._default_runs], args.keep_days, args.grace_minutes, args.dry_run)
    return 0


# -- the collection ---------------------------------------------------------------------------
def collect_garbage(
    cache: str | os.PathLike,
    runs: str | os.PathLike | Sequence[str | os.PathLike],
    keep_days: float = 30,
    grace_minutes: float = 60,
    dry_run: bool = False,
) -> dict:
    """Remove what no recent run needs from the cache `cache`; print and return the report.

    `runs` is one runs folder or several. The report holds counts and bytes per category under
    "removed" (items, indexes, trash, tmp), "freed_bytes", "recent_runs", "roots", "kept" and
    "notes" (skipped or suspicious things), and the printed text under "summary".
    """
    cache_root, runs_dirs = _check_arguments(cache, runs, keep_days, grace_minutes)
    now = time.time()
    grace_cutoff = now - grace_minutes * 60
    notes: list[str] = []
    removed = {name: Tally() for name in CATEGORIES}

    recent_runs, named = recent_roots(runs_dirs, keep_days, now)
    roots = with_upstream({p for p in named if p.parent.parent == cache_root}, cache_root)
    if recent_runs == 0:
        notes.append(f"no run.json under {', '.join(map(str, runs_dirs))} was modified within {keep_days:g} days: "
                     "no artifact is a root; pass --runs with the runs folder of your recent runs or a larger --keep-days")
    elif named and not roots:
        elsewhere = sorted({str(p.parent.parent) for p in named})
        notes.append(f"none of the {recent_runs} recent runs used {cache_root} (they used {', '.join(elsewhere[:3])}); "
                     "check --cache")

    registry = registered_item_stages()
    stages = stage_folders(cache_root)
    item_stages = [s for s in stages if is_item_stage(s, registry)]

    for stage_dir in stages:
        empty_trash(stage_dir, dry_run, removed["trash"], notes)
        remove_dead_tmp(stage_dir, grace_cutoff, dry_run, removed["tmp"], notes)

    kept = {"roots": 0, "fresh_indexes": 0, "locked_indexes": 0}
    remaining: list[Path] = []
    for stage_dir in item_stages:
        for artifact in artifact_dirs(stage_dir):
            verdict = _collect_artifact(artifact, roots, grace_cutoff, dry_run, removed["indexes"], notes)
            if verdict != "removed":
                kept[verdict] += 1
                remaining.append(artifact)
    others = [a for s in stages if s not in item_stages for a in artifact_dirs(s)]

    referenced, unreadable = referenced_keys(remaining + others, notes)
    blocked_kinds = busy_kinds(item_stages, registry, notes)
    if unreadable:
        blocked_kinds = {"*"}
    item_kept = collect_items(cache_root, referenced, blocked_kinds, grace_cutoff, dry_run, removed, notes)

    report = {
        "cache": str(cache_root),
        "runs": [str(d) for d in runs_dirs],
        "dry_run": dry_run,
        "keep_days": keep_days,
        "grace_minutes": grace_minutes,
        "recent_runs": recent_runs,
        "roots": len(roots),
        "removed": {name: asdict(tally) for name, tally in removed.items()},
        "freed_bytes": sum(t.bytes for t in removed.values()),
        "kept": {
            "indexes": len(remaining),
            **kept,
            **item_kept,
            "other_artifacts": len(others),
            "other_stages": sorted({a.parent.name for a in others}),
        },
        "notes": notes,
    }
    report["summary"] = format_report(report)
    print(report["summary"], flush=True)
    return report


def _check_arguments(cache, runs, keep_days: float, grace_minutes: float) -> tuple[Path, list[Path]]:
    """Validate gc's arguments; return the resolved cache root and runs folders, or raise UserError."""
    if keep_days < 0 or grace_minutes < 0:
        raise UserError(f"keep_days ({keep_days}) and grace_minutes ({grace_minutes}) must be 0 or more")
    cache_root = Path(cache).resolve()
    if not cache_root.is_dir():
        raise UserError(f"gc: cache folder {cache_root} does not exist; pass --cache with the paths.cache "
                        "your runs used (see conf/paths/default.yaml)")
    if isinstance(runs, (str, os.PathLike)):
        runs = [runs]
    runs_dirs = [Path(r).resolve() for r in runs]
    for runs_dir in runs_dirs:
        if not runs_dir.is_dir():
            raise UserError(f"gc: runs folder {runs_dir} does not exist; pass --runs with the paths.runs of "
                            "your runs (without the run.json files gc would treat every cached index as unused)")
    return cache_root, runs_dirs


# -- roots ------------------------------------------------------------------------------------
def find_run_records(runs_dir: Path) -> list[Path]:
    """Return every run.json under `runs_dir` at any depth (multirun sweeps nest them), symlinks not followed."""
    found = []
    for folder, dirs, files in os.walk(runs_dir):
        dirs.sort()
        if "run.json" in files:
            found.append(Path(folder) / "run.json")
    return found


def recent_roots(runs_dirs: Sequence[Path], keep_days: float, now: float) -> tuple[int, set[Path]]:
    """Return (number of recent run records, resolved artifact paths they name).

    A recent record that cannot be read raises UserError: gc cannot tell what it protects.
    """
    cutoff = now - keep_days * 86400
    count, artifacts = 0, set()
    for runs_dir in runs_dirs:
        for record_path in find_run_records(runs_dir):
            try:
                if record_path.stat().st_mtime < cutoff:
                    continue
                record = json.loads(record_path.read_text())
                stages = record.get("stages") or []
                named = [s["artifact"] for s in stages if s.get("artifact")]
            except (OSError, ValueError, AttributeError, TypeError, KeyError) as err:
                raise UserError(f"gc: cannot read run record {record_path} ({err}); it may protect cache "
                                "entries, so gc stops. Fix or delete that file and rerun gc") from None
            count += 1
            artifacts.update(Path(a).resolve() for a in named)
    return count, artifacts


def with_upstream(roots: set[Path], cache_root: Path) -> set[Path]:
    """Add, transitively, the artifacts each root was built from (its manifest's inputs.upstream)."""
    seen = set(roots)
    todo = list(roots)
    while todo:
        artifact = todo.pop()
        try:
            upstream = json.loads((artifact / MANIFEST).read_text())["inputs"]["upstream"]
            pairs = list(upstream.items())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        for name, fp in pairs:
            if not (_plain_name(name) and _plain_name(fp)):
                continue
            path = cache_root / name / fp
            if path not in seen:
                seen.add(path)
                todo.append(path)
    return seen


def _plain_name(value) -> bool:
    """True for a string usable as one path component (no separators, not hidden)."""
    return isinstance(value, str) and bool(value) and "/" not in value and not value.startswith(".")


# -- store layout -----------------------------------------------------------------------------
def registered_item_stages() -> dict[str, str] | None:
    """Return {stage name: item kind} from the stage registry, or None when it cannot be imported.

    The registry imports stage modules, which import torch only inside their run functions.
    """
    try:
        from musubi_pipe.stages import all_stages

        return {s.name: s.item_kind for s in all_stages() if getattr(s, "item_kind", None)}
    except Exception:
        return None


def stage_folders(cache_root: Path) -> list[Path]:
    """Return the stage folders of the cache: every subfolder except items/ and hidden ones."""
    return sorted(p for p in cache_root.iterdir()
                  if p.is_dir() and not p.is_symlink() and p.name != ITEMS and not p.name.startswith("."))


def artifact_dirs(stage_dir: Path) -> list[Path]:
    """Return the published artifact folders <stage>/<fingerprint>/ (not .tmp, .partial, ...)."""
    return sorted(p for p in stage_dir.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))


def is_item_stage(stage_dir: Path, registry: dict[str, str] | None) -> bool:
    """Whether a stage folder holds item indexes: by the registry, else by an artifact with index.json."""
    if registry is not None:
        return stage_dir.name in registry
    return any((a / INDEX).is_file() for a in artifact_dirs(stage_dir))


def tree_size(path: Path) -> int:
    """Bytes of the files under `path` (or of the file `path`); symlinks are counted, not followed."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def newest_mtime(path: Path) -> float:
    """The newest modification time of `path` and everything under it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
    return newest


@contextlib.contextmanager
def try_lock(lock_path: Path, create: bool) -> Iterator[bool]:
    """Try to take a store lock file (see Store.lock) without waiting; yield whether it is ours.

    create=False (dry runs, probes) opens an existing lock file read-only and creates nothing; a
    missing lock file counts as free.
    """
    if create:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    else:
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except FileNotFoundError:
            yield True
            return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            got = True
        except BlockingIOError:
            got = False
        try:
            yield got
        finally:
            if got:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _lock_path(artifact: Path) -> Path:
    """The lock file Store.lock(stage, fp) uses for an artifact <stage>/<fp>."""
    return artifact.parent / ".locks" / f"{artifact.name}.lock"


# -- the passes -------------------------------------------------------------------------------
def _delete(path: Path, notes: list[str]) -> bool:
    """Delete a file or folder; on failure add a note naming it and return False."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        return True
    except FileNotFoundError:
        return False  # another gc got there first
    except OSError as err:
        notes.append(f"could not remove {path}: {err}; check its permissions and rerun gc")
        return False


def empty_trash(stage_dir: Path, dry_run: bool, tally: Tally, notes: list[str]) -> None:
    """Remove every entry of <stage>/.trash/ or items/.trash/ (corrupt entries moved aside by the Store)."""
    trash = stage_dir / ".trash"
    if not trash.is_dir():
        return
    for entry in sorted(trash.iterdir()):
        size = tree_size(entry)
        if dry_run or _delete(entry, notes):
            tally.add(size)


def remove_dead_tmp(stage_dir: Path, grace_cutoff: float, dry_run: bool, tally: Tally, notes: list[str]) -> None:
    """Remove <stage>/.tmp/<fp>-<pid>-<n>/ folders whose process is gone and that are past the grace period.

    The pid is the second-to-last `-` field, as in Store._remove_stale_tmp; names that do not parse
    are left alone. The grace period also covers a writer on another machine sharing the cache.
    """
    tmp_root = stage_dir / ".tmp"
    if not tmp_root.is_dir():
        return
    for path in sorted(tmp_root.iterdir()):
        try:
            pid = int(path.name.split("-")[-2])
        except (ValueError, IndexError):
            continue
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            if newest_mtime(path) > grace_cutoff:
                continue
        except FileNotFoundError:
            continue
        size = tree_size(path)
        if dry_run or _delete(path, notes):
            tally.add(size)


def _collect_artifact(artifact: Path, roots: set[Path], grace_cutoff: float, dry_run: bool,
                      tally: Tally, notes: list[str]) -> str:
    """Remove an item-stage artifact unless it is a root, fresh or locked.

    Return "removed", or why it stays: "roots", "fresh_indexes" or "locked_indexes".
    """
    if artifact in roots:
        return "roots"
    try:
        if newest_mtime(artifact) > grace_cutoff:
            return "fresh_indexes"
    except FileNotFoundError:
        return "removed"  # gone meanwhile (another gc)
    size = tree_size(artifact)
    with try_lock(_lock_path(artifact), create=not dry_run) as ours:
        if not ours:
            notes.append(f"skipped {artifact}: another process holds {_lock_path(artifact)}; rerun gc when it is done")
            return "locked_indexes"
        if dry_run:
            tally.add(size)
            return "removed"
        # move aside first so a reader sees a clean miss, never half a folder
        aside = artifact.parent / ".trash" / f"{artifact.name}-gc-{int(time.time())}-{os.getpid()}"
        try:
            aside.parent.mkdir(exist_ok=True)
            os.rename(artifact, aside)
        except FileNotFoundError:
            return "removed"
        except OSError as err:
            notes.append(f"could not remove {artifact}: {err}; check its permissions and rerun gc")
            return "locked_indexes"
    _delete(aside, notes)  # it is out of the store already: a failure leaves it in .trash for next time
    tally.add(size)
    return "removed"


def index_keys(artifact: Path) -> set[str]:
    """Return the item keys named by an artifact's index.json (empty when it has none).

    cache_latents writes [{..., "entry": key}, ...], cache_text {text: key}. Raise ValueError for an
    index that cannot be read or has another shape.
    """
    try:
        doc = json.loads((artifact / INDEX).read_text())
    except FileNotFoundError:
        return set()
    except OSError as err:
        raise ValueError(str(err)) from None
    if isinstance(doc, list):
        keys = [rec.get("entry") if isinstance(rec, dict) else None for rec in doc]
    elif isinstance(doc, dict):
        keys = list(doc.values())
    else:
        raise ValueError(f"expected a list or an object, found {type(doc).__name__}")
    if not all(isinstance(k, str) for k in keys):
        raise ValueError("an index record has no string item key")
    return set(keys)


def referenced_keys(artifacts: Sequence[Path], notes: list[str]) -> tuple[set[str], bool]:
    """Return (item keys named by the index.json of any of `artifacts`, whether one was unreadable)."""
    keys: set[str] = set()
    unreadable = False
    for artifact in artifacts:
        try:
            keys |= index_keys(artifact)
        except ValueError as err:
            unreadable = True
            notes.append(f"cannot read {artifact / INDEX} ({err}); no item was removed. Delete {artifact} "
                         "(it is rebuilt by the next run that needs it) and rerun gc")
    return keys, unreadable


def busy_kinds(item_stages: Sequence[Path], registry: dict[str, str] | None, notes: list[str]) -> set[str]:
    """Return the item kinds a running stage may be writing ("*": unknown, all kinds).

    A stage is computing while another process holds one of its .locks/*.lock files.
    """
    busy: set[str] = set()
    for stage_dir in item_stages:
        lock_dir = stage_dir / ".locks"
        held = [p for p in sorted(lock_dir.glob("*.lock")) if not _free(p)] if lock_dir.is_dir() else []
        if held:
            kind = registry.get(stage_dir.name, "*") if registry else "*"
            busy.add(kind)
            notes.append(f"{stage_dir.name} is being computed ({held[0]} is held): kept every unreferenced "
                         f"{'item' if kind == '*' else kind + ' item'}; rerun gc when that run is done")
    return busy


def _free(lock_path: Path) -> bool:
    """Whether no process holds the lock file `lock_path` (probed without creating or keeping it)."""
    with try_lock(lock_path, create=False) as ours:
        return ours


def collect_items(cache_root: Path, referenced: set[str], blocked_kinds: set[str], grace_cutoff: float,
                  dry_run: bool, removed: dict[str, Tally], notes: list[str]) -> dict:
    """Remove unreferenced item entries and stale writer *.tmp files past the grace period.

    Return what stayed: {"items", "items_bytes", "fresh_items", "blocked_items"}.
    """
    kept = {"items": 0, "items_bytes": 0, "fresh_items": 0, "blocked_items": 0}
    items_root = cache_root / ITEMS
    if not items_root.is_dir():
        return kept
    empty_trash(items_root, dry_run, removed["trash"], notes)  # items found corrupt and moved aside
    for kind_dir in sorted(p for p in items_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        blocked = "*" in blocked_kinds or kind_dir.name in blocked_kinds
        for ab_dir in sorted(p for p in kind_dir.iterdir() if p.is_dir() and not p.is_symlink()):
            for path in sorted(ab_dir.iterdir()):
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                fresh = st.st_mtime > grace_cutoff
                if path.name.endswith(".tmp"):
                    if not fresh and (dry_run or _delete(path, notes)):
                        removed["tmp"].add(st.st_size)
                    continue
                if not path.name.endswith(ITEM_SUFFIX):
                    continue  # not ours: leave it
                key = path.name[: -len(ITEM_SUFFIX)]
                stays = key in referenced or fresh or blocked
                if not stays and (dry_run or _delete(path, notes)):
                    removed["items"].add(st.st_size)
                    continue
                kept["items"] += 1
                kept["items_bytes"] += st.st_size
                if key not in referenced:
                    kept["fresh_items" if fresh else "blocked_items"] += 1
            if not dry_run:
                with contextlib.suppress(OSError):
                    ab_dir.rmdir()  # only succeeds when empty
    return kept


# -- the report -------------------------------------------------------------------------------
def human_bytes(n: int) -> str:
    """Return a byte count in binary units: 0 B, 999 B, 1.3 KiB, 4.0 GiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _nonzero(parts: list[tuple[int, str]]) -> str:
    """Return " (3 roots, 1 locked)" from the non-zero (count, reason) pairs, or "" when all are zero."""
    shown = [f"{n} {why}" for n, why in parts if n]
    return f" ({', '.join(shown)})" if shown else ""


_NOUNS = {"items": ("item", "items"), "indexes": ("index", "indexes"),
          "trash": ("trash entry", "trash entries"), "tmp": ("tmp leftover", "tmp leftovers")}


def format_report(report: dict) -> str:
    """Return the printed report: the freed line, a line per category, what stayed, and notes."""
    removed, kept = report["removed"], report["kept"]
    verb = "would free" if report["dry_run"] else "freed"
    counts = ", ".join(_plural(removed[c]["count"], *_NOUNS[c]) for c in CATEGORIES)
    lines = [
        f"gc {report['cache']}: {_plural(report['recent_runs'], 'recent run', 'recent runs')} "
        f"(run.json within {report['keep_days']:g} days under {', '.join(report['runs'])}) -> "
        f"{_plural(report['roots'], 'root artifact', 'root artifacts')} in this cache",
        f"{verb} {human_bytes(report['freed_bytes'])} ({counts})",
    ]
    for c in CATEGORIES:
        lines.append(f"  {_NOUNS[c][1]:<13} {removed[c]['count']:>7}  {human_bytes(removed[c]['bytes'])}")
    grace = f"newer than {report['grace_minutes']:g} min"
    why_indexes = _nonzero([(kept["roots"], "roots"), (kept["fresh_indexes"], grace), (kept["locked_indexes"], "locked")])
    why_items = _nonzero([(kept["fresh_items"], f"unreferenced but {grace}"),
                          (kept["blocked_items"], "unreferenced but kept while a stage computes")])
    lines.append(
        f"kept: {_plural(kept['indexes'], 'index', 'indexes')}{why_indexes}, "
        f"{_plural(kept['items'], 'item', 'items')} of {human_bytes(kept['items_bytes'])}{why_items}"
    )
    if kept["other_artifacts"]:
        lines.append(f"kept: {_plural(kept['other_artifacts'], 'artifact', 'artifacts')} of "
                     f"{', '.join(kept['other_stages'])} (gc never removes those; delete by hand if unwanted)")
    lines.extend(f"note: {note}" for note in report["notes"])
    return "\n".join(lines)
