"""Turn musubi-tuner command lines into one run spec.

    python -m musubi_pipe.tools from-musubi "accelerate launch ... wan_train_network.py --task t2v-1.3B ..." -o my_run.toml
    python -m musubi_pipe.tools from-musubi --file train.sh -o my_run.yaml
    python -m musubi_pipe my_run.toml

The input is one command or a whole script: the caching commands (`*_cache_latents.py`,
`*_cache_text_encoder_outputs.py`) and the training one (`*_train_network.py`), with `accelerate launch`,
`python -m`, `uv run` prefixes, line continuations (`\\`, `^`, backtick) and `--config_file` (its TOML is
read; the command line wins, as in musubi-tuner). Every flag becomes its config key
(config/musubi_flags.py; docs/training.md has the table); a flag with no key is listed with the reason,
in the report and at the top of the spec, never dropped silently. Where musubi-tuner's default differs
from ours (learning rate, timestep sampling, rank, ...), the spec sets musubi-tuner's, so it trains what
that command would have. Keys still to set (a tokenizer folder musubi-tuner downloads itself, a file only
the caching commands name) are listed. Paths are kept as written: run from the same folder.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from musubi_pipe.errors import ConfigError, UserError

HELP = "write a run spec from musubi-tuner command lines (and their --config_file / --dataset_config)"


@dataclass
class Translation:
    """What the commands become: the family, its model group option, the keys, and a line per flag."""

    arch: str
    model: str
    keys: dict = field(default_factory=dict)
    report: list[tuple[str, str, str]] = field(default_factory=list)  # (flag, status, what/why)
    scripts: list[str] = field(default_factory=list)

    def flags(self, status: str) -> list[tuple[str, str]]:
        return [(flag, why) for flag, s, why in self.report if s == status]


def add_arguments(parser) -> None:
    parser.add_argument("command", nargs="?", help="the musubi-tuner command line(s), quoted; or use --file")
    parser.add_argument("--file", help="a shell script or text file holding the command line(s)")
    parser.add_argument("-o", "--output", help="the run spec to write (.toml, .yaml); default: print YAML")
    parser.add_argument("--table", action="store_true", help="print the flag table (docs/training.md) and exit")


def main(args) -> int:
    import sys

    if args.table:
        print(flag_table(), end="")
        return 0
    if bool(args.command) == bool(args.file):
        raise UserError("give the musubi-tuner command line either as an argument (quoted) or with --file")
    text = Path(args.file).read_text(encoding="utf-8") if args.file else args.command
    translation = translate(text)
    spec = build_spec(translation)
    translation.report += [("--dataset_config", "note", problem) for problem in dataset_problems(spec)]
    header = report_text(translation, still_to_set(spec))
    from musubi_pipe.config.spec import dumps, write_spec

    if args.output:
        write_spec(spec, args.output, header=header)
        print(header, file=sys.stderr)
        print(f"wrote {args.output}; run it with: python -m musubi_pipe {args.output}", file=sys.stderr)
    else:
        print(dumps(spec, "yaml", header=header), end="")
    return 0


# ------------------------------------------------------------------ reading command lines


def split_commands(text: str) -> list[list[str]]:
    """The commands of a script, each as its tokens: continuations joined, comments and blank lines skipped,
    a line starting with `-` read as the previous command's continuation (musubi-tuner's docs wrap that way)."""
    text = re.sub(r"[\\^`][ \t]*\r?\n", " ", text)
    commands: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "REM ", "::")):
            continue
        if stripped.startswith("-") and commands:
            commands[-1] += " " + stripped
        else:
            commands.append(stripped)
    out = []
    for command in commands:
        for part in re.split(r"\s(?:&&|;)\s", command):
            try:
                tokens = shlex.split(part, posix=True)
            except ValueError as err:
                raise UserError(f"cannot read the command line {part[:80]!r}...: {err}") from None
            if tokens:
                out.append(tokens)
    return out


def _script(tokens: list[str]) -> tuple[str | None, list[str], list[str]]:
    """(script file name, accelerate's arguments, the script's arguments) of one command."""
    accelerate: list[str] = []
    for i, token in enumerate(tokens):
        name = None
        if token.endswith(".py"):
            name = Path(token).name
        elif token == "-m" and i + 1 < len(tokens) and "musubi_tuner" in tokens[i + 1]:
            name = tokens[i + 1].rsplit(".", 1)[-1] + ".py"
            i += 1
        if name:
            if "launch" in tokens[:i]:
                accelerate = tokens[tokens.index("launch") + 1: i]
            return name, accelerate, tokens[i + 1:]
    return None, [], []


def _parse_flags(args: list[str], table: dict) -> list[tuple[str, list[str]]]:
    """[(flag, values)] in order: `--flag=value` and `--flag v1 v2` alike; a flag takes the values its table
    entry says (unknown flags take what follows up to the next flag)."""
    out, i = [], 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            out.append((token, []))  # a stray word: reported as unknown
            i += 1
            continue
        flag, eq, inline = token.partition("=")
        entry = table.get(flag)
        if eq:
            out.append((flag, [inline]))
            i += 1
            continue
        takes = entry.takes if entry is not None else "*"
        values, i = [], i + 1
        while i < len(args) and not args[i].startswith("--") and (takes == "*" or len(values) < takes):
            values.append(args[i])
            i += 1
        out.append((flag, values))
    return out


def _config_file_flags(path: str) -> list[tuple[str, list]]:
    """musubi-tuner's --config_file: a TOML of flag names (sections flattened), as (flag, values)."""
    import tomllib

    file = Path(path if path.endswith(".toml") else path + ".toml")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--config_file {file}: not found; run from the folder musubi-tuner ran in, or fix the "
                        "path") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"--config_file {file}: not valid TOML: {err}") from None
    flat: dict = {}
    for name, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[name] = value
    out = []
    for name, value in flat.items():
        if value is False or value is None:
            continue
        values = [] if value is True else [str(v) for v in value] if isinstance(value, list) else [str(value)]
        out.append((f"--{name}", values))
    return out


def _kind(script: str) -> str:
    return "latents" if "cache_latents" in script else "text" if "cache_text" in script else "train"


def _family_of(script: str):
    from musubi_pipe.config.musubi_flags import NOT_YET
    from musubi_pipe.models import family_names, get_family

    for name in family_names():
        family = get_family(name)
        if script in family.musubi_scripts:
            return family
    for prefix, model in sorted(NOT_YET.items(), key=lambda kv: -len(kv[0])):
        if script.startswith(prefix):
            raise UserError(f"{script}: {model} is not supported here yet (docs/architectures.md lists what is)")
    if "generate" in script:
        raise UserError(f"{script}: an inference script; sampling with a trained LoRA is the generate stage "
                        "(pipeline.stages=[generate], docs/training.md), not converted by this tool")
    raise UserError(f"{script}: not a musubi-tuner training or caching script this tool knows "
                    "(wan_*, hv_train_network.py, cache_latents.py, cache_text_encoder_outputs.py)")


# ------------------------------------------------------------------ translating


def translate(text: str) -> Translation:
    """Read the command(s) and map every flag; a UserError when no command is a musubi-tuner script."""
    from musubi_pipe.config.musubi_flags import ACCELERATE, COMMON, MUSUBI_DEFAULTS, NETWORK_ARGS

    commands = [c for c in split_commands(text)]
    parsed = []
    for tokens in commands:
        script, accelerate, args = _script(tokens)
        if script is None:
            continue
        parsed.append((script, accelerate, args))
    if not parsed:
        raise UserError("no musubi-tuner script found: the command must run one of its *_train_network.py or "
                        "caching scripts (e.g. accelerate launch ... src/musubi_tuner/wan_train_network.py ...)")
    families = {_family_of(script).name: _family_of(script) for script, _, _ in parsed}
    if len(families) > 1:
        raise UserError(f"the commands are for different models ({', '.join(families)}); convert one model's "
                        "commands at a time")
    family = next(iter(families.values()))
    table = {**COMMON, **family.musubi_flags}
    out = Translation(arch=family.name, model="", scripts=[s for s, _, _ in parsed])
    given: dict[str, list] = {}  # flag -> values, over every command (later commands win)
    seen_kinds = {_kind(s) for s, _, _ in parsed}
    accelerate_flags: list[tuple[str, list]] = []
    for script, accelerate, args in parsed:
        accelerate_flags += _parse_flags(accelerate, ACCELERATE)
        flags = _parse_flags(args, table)
        config_file = next((v[0] for f, v in flags if f == "--config_file" and v), None)
        if config_file:
            named = {f for f, _ in flags}
            flags = [(f, v) for f, v in _config_file_flags(config_file) if f not in named] + flags
        for flag, values in flags:
            if flag in given and given[flag] != values and table.get(flag) is not None:
                out.report.append((flag, "note", f"given twice ({' '.join(given[flag])} and {' '.join(values)}); "
                                                 "the later command's value is used"))
            given[flag] = values
    for flag, values in accelerate_flags:
        entry = ACCELERATE.get(flag)
        if entry is None:
            out.report.append((f"accelerate {flag}", "not_needed", "a launcher setting: keep it on the "
                                                                   "accelerate launch line"))
        elif entry.status != "mapped":
            out.report.append((f"accelerate {flag}", entry.status, entry.reason))
        elif flag in given:
            out.report.append((f"accelerate {flag}", "note", f"the script's own {flag} is used, as there"))
        elif values:
            out.keys[entry.key] = values[0]
            out.report.append((f"accelerate {flag}", "mapped", f"{entry.key}={values[0]!r} ({entry.reason})"))
    for flag, values in given.items():
        entry = table.get(flag)
        if entry is None:
            out.report.append((flag, "unknown", "not a musubi-tuner flag this tool knows; check its spelling, or "
                                                "set the key it means by hand"))
        elif entry.status == "model":
            out.report.append((flag, "mapped", f"chooses model={family.musubi_model(dict(given))}"))
        elif entry.status != "mapped":
            out.report.append((flag, entry.status, entry.reason))
        elif entry.key == "network_args":
            _network_args(values, out, NETWORK_ARGS)
        else:
            _map(flag, entry, values, out)
    out.model = family.musubi_model(dict(given))
    if "train" in seen_kinds:
        defaults = {**MUSUBI_DEFAULTS, **{f: (k, v) for f, (k, v, kind) in family.musubi_defaults.items()
                                          if kind == "train"}}
    else:
        defaults = {}
    for kind in seen_kinds - {"train"}:
        defaults.update({f: (k, v) for f, (k, v, s) in family.musubi_defaults.items() if s == kind})
    for flag, (key, value) in defaults.items():
        if flag not in given and key not in out.keys:
            if flag == "--mixed_precision" and any(f == "--mixed_precision" for f, _ in accelerate_flags):
                continue
            out.keys[key] = value
            out.report.append((flag, "default", f"{key}={value!r}: musubi-tuner's default without this flag"))
    if "train" in seen_kinds:
        out.keys.setdefault("pipeline.stages", ["cache_latents", "cache_text", "train"])
        name = out.keys.get("training.output_name")
        out.keys.setdefault("name", re.sub(r"[^A-Za-z0-9_.-]", "_", str(name)) if name else "from_musubi")
    else:
        out.keys.setdefault("pipeline.stages", [{"latents": "cache_latents", "text": "cache_text"}[k]
                                                for k in ("latents", "text") if k in seen_kinds])
        out.keys.setdefault("name", "from_musubi")
    return out


def _map(flag: str, entry, values: list, out: Translation) -> None:
    if entry.takes == 0:
        value = entry.value
    elif entry.takes == "*":
        value = entry.convert(values) if entry.convert else list(values)
    elif not values:
        out.report.append((flag, "unsupported", "given without a value"))
        return
    else:
        try:
            value = entry.convert(values[0]) if entry.convert else values[0]
        except ValueError as err:
            out.report.append((flag, "unsupported", str(err)))
            return
    out.keys[entry.key] = value
    extra = f" ({entry.reason})" if entry.reason else ""
    out.report.append((flag, "mapped", f"{entry.key}={value!r}{extra}"))


def _network_args(values: list[str], out: Translation, table: dict) -> None:
    from musubi_pipe.config.musubi_flags import literal

    for item in values:
        name, eq, text = item.partition("=")
        name = name.strip()
        if name == "verbose":
            out.report.append((f"--network_args {item}", "not_needed", "musubi-tuner's printout of the modules; "
                                                                        "python -m musubi_pipe.tools inspect lists them"))
            continue
        if not eq or name not in table:
            out.report.append((f"--network_args {item}", "unsupported",
                               f"network argument {name!r} is not built here (built: {', '.join(table)})"))
            continue
        key, convert = table[name]
        value = literal(text.strip())
        try:
            value = convert(value) if not isinstance(value, list) or convert is list else value
        except (TypeError, ValueError) as err:
            out.report.append((f"--network_args {item}", "unsupported", str(err)))
            continue
        out.keys[key] = value
        out.report.append((f"--network_args {item}", "mapped", f"{key}={value!r}"))


# ------------------------------------------------------------------ the spec


def build_spec(translation: Translation) -> dict:
    """The run spec: the model group choice, then each key (dotted keys nested)."""
    spec: dict = {"defaults": {"model": translation.model}}
    for dotted, value in translation.keys.items():
        node = spec
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return spec


def still_to_set(spec: dict) -> list[str]:
    """The keys the spec leaves unset that a run needs: `???` in its model group, and a tokenizer folder the group
    leaves null (needed with a single-file text encoder, which musubi-tuner users have: it downloads tokenizers)."""
    from omegaconf import OmegaConf

    from musubi_pipe.config import compose

    group = OmegaConf.to_container(compose([f"model={spec['defaults']['model']}"]).model, resolve=False)
    given = spec.get("model", {})
    return [f"model.{k}" for k, v in group.items() if k not in given
            and (v == "???" or (v is None and k.endswith("_tokenizer")))]


def report_text(translation: Translation, missing: list[str]) -> str:
    """The report: what was mapped, each flag with no key and why, and the keys still to set."""
    from musubi_pipe.models import get_family

    hints = get_family(translation.arch).musubi_hints
    lines = [f"From musubi-tuner ({', '.join(translation.scripts)}) by python -m musubi_pipe.tools from-musubi.",
             f"model={translation.model}; {len(translation.flags('mapped'))} flag(s) mapped to keys."]
    titles = {"mapped": "Mapped:", "default": "musubi-tuner's defaults, set because they differ from ours:",
              "unsupported": "NOT SUPPORTED (the run differs from musubi-tuner's here):",
              "unknown": "UNKNOWN flags (not converted):",
              "not_needed": "Not needed here:",
              "note": "Notes:"}
    for status, title in titles.items():
        rows = translation.flags(status)
        if rows:
            lines.append(title)
            lines += [f"  {flag}: {why}" for flag, why in rows]
    if missing:
        lines.append("STILL TO SET (add to the spec or the command line):")
        lines += [f"  {key}: {hints.get(key, 'required by the model group')}" for key in missing]
    return "\n".join(lines)


def dataset_problems(spec: dict) -> list[str]:
    """What reading the spec's musubi-tuner dataset file finds wrong (nothing when it is not on this machine)."""
    path = spec.get("dataset", {}).get("musubi_config")
    if not path:
        return []
    if not Path(path).is_file():
        return [f"{path} is not on this machine (relative to here): not checked"]
    from musubi_pipe.data.dataset_config import load_musubi_config

    try:
        load_musubi_config(path)
    except ConfigError as err:
        return [f"{key}: {message}" for key, message in err.problems]
    return [f"{path} read: its datasets are valid here"]


# ------------------------------------------------------------------ the table in docs/training.md


def flag_table() -> str:
    """The markdown tables of every flag this tool reads (docs/training.md holds this text; a test compares)."""
    from musubi_pipe.config.musubi_flags import ACCELERATE, COMMON, MUSUBI_DEFAULTS
    from musubi_pipe.models import family_names, get_family

    def show(value) -> str:
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    def rows(flags: dict, defaults: dict) -> list[str]:
        out = []
        for flag, entry in flags.items():
            if entry.status == "model":
                what = entry.reason
            elif entry.status != "mapped":
                what = {"unsupported": "**not supported**: ", "not_needed": "not needed: "}[entry.status] + entry.reason
            elif entry.key == "network_args":
                from musubi_pipe.config.musubi_flags import NETWORK_ARGS

                what = ("split: " + ", ".join(f"`{n}` → `{k}`" for n, (k, _) in NETWORK_ARGS.items())
                        + "; `verbose` not needed; others: not supported")
            else:
                what = f"`{entry.key}={show(entry.value)}`" if entry.takes == 0 else f"`{entry.key}`"
                what += f" ({entry.reason})" if entry.reason else ""
            if flag in defaults:
                key, value, *kind = defaults[flag]
                when = f" (`{kind[0]}` command given)" if kind else ""
                what += f"; absent{when}: `{key}={show(value)}` (musubi-tuner's default)"
            out.append(f"| `{flag}` | {what} |")
        return out

    head = ["| musubi-tuner flag | here |", "|---|---|"]
    lines = head + rows(COMMON, MUSUBI_DEFAULTS)
    for name in family_names():
        family = get_family(name)
        if family.musubi_scripts:
            lines += ["", f"{name} ({', '.join(f'`{s}`' for s in family.musubi_scripts)}):", ""]
            lines += head + rows(family.musubi_flags, family.musubi_defaults)
    lines += ["", "`accelerate launch` flags:", "", "| accelerate flag | here |", "|---|---|"]
    lines += rows(ACCELERATE, {})
    return "\n".join(lines) + "\n"
