"""Command-line overrides checked before Hydra composes anything, all at once, with "did you mean".

Hydra stops at the first bad override with its own words ("Key 'max_train_step' is not in struct",
or the list of a group's options). Here every override is checked against the schema
(config/schema.py, with every family's model keys) and against each group's options (conf/<group>/,
the recipes, and `--config-dir` folders), and every problem is named with the closest known key or
option. Anything this cannot judge (hydra.* keys, packages, sweeps over group options, unknown flags)
is left to Hydra.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from musubi_pipe.config.locate import conf_dir, recipes_dir
from musubi_pipe.config.schema import SCHEMA

_VALUE_FLAGS = {"--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "--cfg", "-c", "--package", "-p"}
_PLAIN_FLAGS = {"-m", "--multirun", "--resolve", "-r", "--run"}
SCHEMA_KEYS = set(SCHEMA) - {"model", "dataset", "memory", "optimizer", "network", "training", "sampling",
                             "pipeline", "paths"}  # top-level keys that are not config groups


def check_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """(key, message) for each override that names no known key or group option; [] when all are known."""
    return _diagnose(argv)[0]


def _diagnose(argv: list[str]) -> tuple[list[tuple[str, str]], dict[str, str | None]]:
    """(problems, {bad override key: the option it most likely meant, or None})."""
    split = _split(argv)
    if split is None:
        return [], {}
    overrides, config_dirs = split
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - a syntax error: Hydra's own message says where
        return [], {}
    searchpath = any(o.key_or_group.startswith("hydra.searchpath") for o in parsed)
    groups = {} if searchpath else _group_options(config_dirs)  # options elsewhere: Hydra judges them
    schema = _schema()
    problems, meant = [], {}
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra") or override.package is not None:
            continue
        if key in groups or (searchpath and "." not in key and key in schema):
            found, close = _check_option(key, override, groups.get(key)) if groups else ([], None)
        elif not (override.is_add() or override.is_force_add()):  # `+new.key=...` adds on purpose
            found, close = _check_key(key, schema, plus_hint=not override.is_delete()), None
        else:
            continue
        if found:
            problems += found
            meant[key] = close
    return problems, meant


def _split(argv: list[str]) -> tuple[list[str], list[Path]] | None:
    """(overrides, --config-dir folders), or None when a flag this does not know is present."""
    overrides, config_dirs, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        if arg in _PLAIN_FLAGS:
            i += 1
        elif name in _VALUE_FLAGS:
            value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if name in ("--config-dir", "-cd"):
                config_dirs.append(Path(value))
            i += 1 if eq else 2
        elif arg.startswith("-"):
            return None
        else:
            overrides.append(arg)
            i += 1
    return overrides, config_dirs


def _group_options(config_dirs: list[Path]) -> dict[str, set[str]]:
    """Every config group and its options: conf/<group>/**/*.yaml (`model=wan/t2v_14b`), recipes/*.yaml and the
    --config-dir folders."""
    from musubi_pipe.config.recipes import EXTRA_RECIPES

    groups: dict[str, set[str]] = {"recipe": {p.stem for p in recipes_dir().glob("*.yaml")} | EXTRA_RECIPES}
    for root in [conf_dir(), *config_dirs]:
        if not root.is_dir():
            continue
        for folder in root.iterdir():
            if folder.is_dir() and not folder.name.startswith((".", "_")):
                groups.setdefault(folder.name, set()).update(
                    p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))
    return groups


def model_aliases() -> dict[str, str]:
    """{old model group option: its name now} of every family (Family.config_aliases)."""
    from musubi_pipe.models import family_names, get_family

    aliases: dict[str, str] = {}
    for name in family_names():
        aliases.update(get_family(name).config_aliases)
    return aliases


def rewrite_aliases(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv with old model group options replaced by their names now, one note per replacement).

    `model=wan21_t2v_14b` becomes `model=wan/t2v_14b`; sweeps over several (`model=wan_tiny,wan_tiny_i2v`) too."""
    aliases = model_aliases()
    out, notes = [], []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+") == "model" and not value.startswith(("glob(", "choice(", "range(")):
            parts = value.split(",")
            renamed = [aliases.get(part, part) for part in parts]
            if renamed != parts:
                notes.append(f"model={value} is now model={','.join(renamed)} (conf/model/<arch>/<variant>.yaml)")
                arg = f"{key}={','.join(renamed)}"
        out.append(arg)
    return out, notes


def _schema() -> dict:
    """SCHEMA with the model group holding every family's model keys."""
    from musubi_pipe.models import family_names, get_family

    model = dict(SCHEMA["model"])
    for name in family_names():
        model.update(get_family(name).model_keys)
    return dict(SCHEMA, model=model)


def _check_option(group: str, override, options: set[str]) -> tuple[list[tuple[str, str]], str | None]:
    if override.is_sweep_override() or override.is_delete():
        return [], None
    value = override.value()
    if not isinstance(value, str) or value in options:
        return [], None
    aliases = model_aliases() if group == "model" else {}
    close = difflib.get_close_matches(value, sorted(options | set(aliases)), n=1, cutoff=0.6)
    close = [aliases.get(close[0], close[0])] if close else []
    hint = f"did you mean {close[0]!r}?" if close else "choose one of"
    shown = ", ".join(sorted(options))
    return [(group, f"has no option {value!r}; {hint} (options: {shown})")], (close[0] if close else None)


def _check_key(key: str, schema: dict, plus_hint: bool) -> list[tuple[str, str]]:
    node: object = schema
    walked = []
    for part in key.split("."):
        if not isinstance(node, dict):  # inside a value (e.g. dataset.general.resolution): not the schema's
            return []
        if part not in node:
            prefix = ".".join(walked)
            close = difflib.get_close_matches(part, [str(k) for k in node], n=1, cutoff=0.6)
            full = f"{prefix}.{close[0]}" if prefix and close else (close[0] if close else None)
            message = f"is not a config key; did you mean {full}?" if full else \
                f"is not a config key; the keys of {prefix or 'the config'} are {sorted(map(str, node))}"
            if plus_hint:
                message += " (a key of your own is added with +key=value)"
            return [(key, message)]
        walked.append(part)
        node = node[part]
    return []


def report_all(argv: list[str]) -> list[tuple[str, str]]:
    """The problems of the overrides plus what validation finds in the config composed without the bad keys
    and with each misspelt group option read as the one it most likely meant, so one pass names every
    problem. Best effort: when that config cannot be composed (a sweep, a group option with no close
    match, another error Hydra would report), only the overrides' problems are returned."""
    from musubi_pipe.config.recipes import compose
    from musubi_pipe.config.validate import validate
    from musubi_pipe.errors import ConfigError

    problems, meant = _diagnose(argv)
    split = _split(argv)
    unsure = any(close is None for key, close in meant.items() if "." not in key and key not in SCHEMA_KEYS)
    if split is None or unsure or any(a in ("-m", "--multirun") for a in argv):
        return problems
    bad = set(meant)
    overrides, config_dirs = split
    kept = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key not in bad:
            kept.append(override)
        elif meant[key] is not None:
            kept.append(override.split("=", 1)[0] + "=" + meant[key])
    if config_dirs:
        kept.append("hydra.searchpath=[" + ",".join(f"file://{d.resolve()}" for d in config_dirs) + "]")
    try:
        from musubi_pipe.runner import resolve

        container = resolve(compose(kept))
        validate(container, kept)
    except ConfigError as err:
        return problems + [p for p in err.problems if p[0] not in bad]
    except Exception:  # noqa: BLE001 - Hydra will say what else is wrong once the overrides are fixed
        return problems
    return problems
