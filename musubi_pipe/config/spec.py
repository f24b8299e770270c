"""Run specs: one YAML or TOML file that is a whole run, started with `python -m musubi_pipe my_run.toml`.

A spec holds what a recipe holds: group choices and any keys. It is composed exactly as a recipe is
(it is stored in the ConfigStore as recipe `_spec_<stem>`, the group choices as its `override /group:`
defaults), so command-line overrides and `-m` sweeps apply on top of it as they do on a recipe.

    # my_run.toml                                  # my_run.yaml
    recipe = "wan21_t2v_1_3b"   # optional base    recipe: wan21_t2v_1_3b
    [defaults]                                     defaults:
    memory = "24gb"                                  memory: 24gb
    [model]                                        model:
    dit = "/models/wan2.1_t2v_1.3B.safetensors"      dit: /models/wan2.1_t2v_1.3B.safetensors

Group choices: `defaults` as a mapping (`model: wan/t2v_14b`), as a list of one-key mappings, or in
Hydra's spelling (`override /model: wan/t2v_14b`); a string at the top level of a group key
(`memory: 24gb`) is a choice too. `recipe` names a bundled recipe the spec builds on (its choices and
keys come first; the spec's win). TOML has no null: `set_null = ["sampling.negative_prompt"]` sets keys
to null (YAML writes `null`).

`write_spec` turns a composed config back into such a file: the group choices plus every key that
differs from what those groups give, so composing it again gives the same config and fingerprints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from musubi_pipe.errors import ConfigError

SUFFIXES = (".yaml", ".yml", ".toml")
GROUPS = ("paths", "model", "dataset", "memory", "optimizer", "network", "training", "sampling", "pipeline")
NULL_KEY = "set_null"
SPEC_PREFIX = "_spec_"


@dataclass
class Spec:
    """A run spec read from `path`: group choices, an optional base recipe, the keys, and where each key is."""

    path: Path
    choices: dict[str, str] = field(default_factory=dict)
    recipe: str | None = None
    body: dict = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)

    @property
    def recipe_name(self) -> str:
        """The name it is stored under in the ConfigStore's `recipe` group."""
        return SPEC_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", self.path.stem)

    def where(self, key: str) -> str | None:
        """`my_run.toml line 7` for a dotted key (or the nearest enclosing key the file sets), else None."""
        parts = re.sub(r"\[\d+\]", "", key).split(".")
        for n in range(len(parts), 0, -1):
            line = self.lines.get(".".join(parts[:n]))
            if line is not None:
                return f"{self.path.name} line {line}"
        return None


def is_spec_argument(arg: str) -> bool:
    """True for a command-line argument naming a spec file (not an override, not a flag)."""
    return "=" not in arg and not arg.startswith("-") and arg.lower().endswith(SUFFIXES)


def read_spec(path: str | Path) -> Spec:
    """Read and check a spec file; a ConfigError names the file and line of every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([(str(path), "run spec file not found; give the path of a .yaml or .toml file")])
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        data, lines = _load_toml(path, text), toml_lines(text)
    else:
        data, lines = _load_yaml(path, text)
    if not isinstance(data, dict):
        raise ConfigError([(path.name, "a run spec is a mapping of keys (group choices and settings)")])
    spec = Spec(path=path, lines=lines)
    problems = []
    data = dict(data)
    nulls = data.pop(NULL_KEY, [])
    if not isinstance(nulls, list) or not all(isinstance(k, str) for k in nulls):
        problems.append((NULL_KEY, f"{_at(spec, NULL_KEY)}must be a list of dotted keys"))
        nulls = []
    recipe = data.pop("recipe", None)
    if recipe is not None:
        from musubi_pipe.config.locate import recipes_dir

        known = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
        if recipe not in known:
            problems.append(("recipe", f"{_at(spec, 'recipe')}{recipe!r} is not a bundled recipe (recipes: "
                                       f"{', '.join(known)})"))
        else:
            spec.recipe = recipe
    problems += _read_choices(spec, data.pop("defaults", None))
    for group in GROUPS:
        if isinstance(data.get(group), str):
            spec.choices[group] = data.pop(group)
    problems += _check_choices(spec)
    for key in nulls:
        _set(data, key.split("."), None)
    spec.body = data
    if problems:
        raise ConfigError(problems)
    return spec


def _at(spec: Spec, key: str) -> str:
    where = spec.where(key)
    return f"({where}) " if where else ""


def _read_choices(spec: Spec, defaults) -> list[tuple[str, str]]:
    if defaults is None:
        return []
    entries = list(defaults.items()) if isinstance(defaults, dict) else None
    if entries is None and isinstance(defaults, list):
        entries = []
        for item in defaults:
            if not (isinstance(item, dict) and len(item) == 1):
                return [("defaults", f"{_at(spec, 'defaults')}each entry is one `group: option` pair, got {item!r}")]
            entries += list(item.items())
    if entries is None:
        return [("defaults", f"{_at(spec, 'defaults')}must map config groups to options, e.g. "
                             "{model: wan/t2v_14b, memory: 24gb}")]
    problems = []
    for group, option in entries:
        group = re.sub(r"^override\s+", "", str(group)).strip().lstrip("/")
        if group not in GROUPS:
            problems.append((f"defaults.{group}", f"{_at(spec, 'defaults')}is not a config group; the groups are "
                                                  f"{', '.join(GROUPS)}"))
        elif not isinstance(option, str):
            problems.append((f"defaults.{group}", f"{_at(spec, 'defaults')}must name an option, got {option!r}"))
        else:
            spec.choices[group] = option
    return problems


def _check_choices(spec: Spec) -> list[tuple[str, str]]:
    """Each group choice names an option of its group (old model names are rewritten, as on the command line)."""
    import difflib

    from musubi_pipe.config.overrides import _group_options, model_aliases

    options = _group_options([])
    aliases = model_aliases()
    problems = []
    for group, option in list(spec.choices.items()):
        if group == "model" and option in aliases:
            spec.choices[group] = option = aliases[option]
        if option not in options.get(group, ()):
            close = difflib.get_close_matches(option, sorted(options.get(group, ())), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            where = spec.where(f"defaults.{group}") or spec.where(group)
            problems.append((group, f"has no option {option!r}; {hint}(options: {', '.join(sorted(options[group]))})"
                                    + (f" ({where})" if where else "")))
    return problems


def _set(node: dict, parts: list[str], value) -> None:
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _load_toml(path: Path, text: str) -> dict:
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:  # its message ends "(at line N, column M)"
        raise ConfigError([(path.name, f"is not valid TOML: {err}")]) from None


def _load_yaml(path: Path, text: str) -> tuple[dict, dict[str, int]]:
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise ConfigError([(path.name, f"is not valid YAML: {err}")]) from None
    from omegaconf import OmegaConf

    lines: dict[str, int] = {}
    _yaml_lines(node, "", lines)
    data = OmegaConf.to_container(OmegaConf.create(text), resolve=False) if node is not None else {}
    return data, lines


def _yaml_lines(node, prefix: str, lines: dict[str, int]) -> None:
    import yaml

    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        dotted = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
        lines.setdefault(dotted, key_node.start_mark.line + 1)
        _yaml_lines(value_node, dotted, lines)


_TOML_TABLE = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_TOML_KEY = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")


def toml_lines(text: str) -> dict[str, int]:
    """{dotted key: line} of a TOML text's tables and keys (values spanning lines are skipped over)."""
    lines: dict[str, int] = {}
    table: list[str] = []
    depth = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if depth == 0:
            header = _TOML_TABLE.match(line)
            key = _TOML_KEY.match(line)
            if header and not key:
                table = _toml_parts(header.group(1))
                lines.setdefault(".".join(table), number)
            elif key:
                dotted = ".".join(table + _toml_parts(key.group(1)))
                lines.setdefault(dotted, number)
                line = line[key.end():]
        depth += _bracket_balance(line)
        depth = max(depth, 0)
    return lines


def _toml_parts(dotted: str) -> list[str]:
    return [p.strip().strip("\"'") for p in re.findall(r"""\s*("[^"]*"|'[^']*'|[^.]+)\s*\.?""", dotted)]


def _bracket_balance(text: str) -> int:
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'[^\']*\'', "", text).split("#", 1)[0]
    return text.count("[") + text.count("{") - text.count("]") - text.count("}")


def register_spec(spec: Spec) -> str:
    """Store the spec as a recipe (its base recipe's choices and keys first); return its recipe name."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from musubi_pipe.config.locate import recipes_dir

    choices, body = {}, OmegaConf.create({})
    if spec.recipe:
        base = OmegaConf.to_container(OmegaConf.load(recipes_dir() / f"{spec.recipe}.yaml"), resolve=False)
        for entry in base.pop("defaults", []):
            for group, option in (entry.items() if isinstance(entry, dict) else []):
                choices[re.sub(r"^override\s+", "", group).strip().lstrip("/")] = option
        body = OmegaConf.create(base)
    choices.update(spec.choices)
    body = OmegaConf.merge(body, OmegaConf.create(spec.body))
    node = OmegaConf.to_container(body, resolve=False)
    node["defaults"] = [{f"override /{group}": option} for group, option in choices.items()] + ["_self_"]
    ConfigStore.instance().store(group="recipe", name=spec.recipe_name, node=node, package="_global_")
    from musubi_pipe.config.recipes import EXTRA_RECIPES

    EXTRA_RECIPES.add(spec.recipe_name)
    return spec.recipe_name


def spec_arguments(argv: list[str]) -> tuple[list[str], Spec | None]:
    """(argv with a spec file replaced by `+recipe=<its name>`, the spec read) — unchanged when none is named.

    A ConfigError names two spec files, or a spec given with +recipe= as well."""
    flag_values = {"--save", "--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "--cfg", "-c",
                   "--package", "-p", "--info", "-i"}
    named = [a for i, a in enumerate(argv) if is_spec_argument(a) and (i == 0 or argv[i - 1] not in flag_values)]
    if not named:
        return argv, None
    if len(named) > 1:
        raise ConfigError([(" ".join(named), "give one run spec file; put what the others set into it, or "
                                             "pass keys as key=value")])
    if any(a.lstrip("+").startswith("recipe=") for a in argv):
        raise ConfigError([("recipe", f"{named[0]} is the run; name a base recipe inside it (recipe: NAME) "
                                      "instead of +recipe= on the command line")])
    spec = read_spec(named[0])
    name = register_spec(spec)
    return [f"+recipe={name}" if a == named[0] else a for a in argv], spec


def locate_problems(err: ConfigError, spec: Spec | None) -> ConfigError:
    """The same problems, each key the spec sets followed by its file and line."""
    if spec is None:
        return err
    located = []
    for key, message in err.problems:
        where = spec.where(key) if not message.startswith("(") else None
        located.append((key, f"{message} ({where})" if where else message))
    return ConfigError(located)


# ---------------------------------------------------------------- writing a spec back


def spec_of(job: dict, choices: dict[str, str], base: dict) -> dict:
    """The spec of a composed job config: the group choices, then every key whose value differs from
    `base` (the config those choices give with no recipe and no overrides)."""
    spec: dict = {"defaults": {g: choices[g] for g in GROUPS if choices.get(g) is not None}}
    spec.update(_delta(job, base))
    return spec


def _delta(full: dict, base: dict) -> dict:
    out = {}
    for key, value in full.items():
        if key == "hydra":
            continue
        if key not in base:
            out[key] = value
        elif isinstance(value, dict) and isinstance(base[key], dict):
            sub = _delta(value, base[key])
            if sub:
                out[key] = sub
        elif value != base[key] or type(value) is not type(base[key]):
            out[key] = value
    return out


def compose_spec(overrides: list[str]) -> dict:
    """The spec of the run `overrides` compose to (recipe, spec file and keys), as a plain dict."""
    from musubi_pipe.config.recipes import compose

    cfg = compose(overrides, return_hydra_config=True)
    from omegaconf import OmegaConf

    choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items() if k in GROUPS}
    job = OmegaConf.to_container(cfg, resolve=False)
    job.pop("hydra", None)
    base = OmegaConf.to_container(compose([f"{g}={o}" for g, o in choices.items()]), resolve=False)
    return spec_of(job, choices, base)


def job_spec(cfg, choices: dict) -> dict:
    """The spec of the job running now (inside `python -m musubi_pipe`, where Hydra is initialized)."""
    from hydra import compose
    from omegaconf import OmegaConf

    choices = {k: v for k, v in choices.items() if k in GROUPS}
    job = OmegaConf.to_container(cfg, resolve=False)
    job.pop("hydra", None)
    base = compose(config_name="config", overrides=[f"{g}={o}" for g, o in choices.items()])
    base = OmegaConf.to_container(base, resolve=False)
    base.pop("hydra", None)
    return spec_of(job, choices, base)


def dumps(spec: dict, fmt: str, header: str = "") -> str:
    """The spec as YAML or TOML text (TOML: null values go to `set_null`), with `header` as comments."""
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) if header else ""
    if fmt == "toml":
        import tomli_w

        nulls: list[str] = []
        data = _drop_nulls(spec, "", nulls)
        if nulls:
            data = {NULL_KEY: nulls, **data}
        scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in data.items() if isinstance(v, dict)}
        return comment + tomli_w.dumps({**scalars, **tables}, multiline_strings=False)
    from omegaconf import OmegaConf

    return comment + OmegaConf.to_yaml(OmegaConf.create(spec))


def _drop_nulls(node, prefix: str, nulls: list[str]):
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if value is None:
                nulls.append(dotted)
            else:
                out[key] = _drop_nulls(value, dotted, nulls)
        return out
    if isinstance(node, list):
        if any(v is None for v in node):
            raise ConfigError([(prefix, "holds a null inside a list, which TOML cannot write; save the spec as "
                                        ".yaml")])
        return [_drop_nulls(v, prefix, nulls) for v in node]
    return node


def write_spec(spec: dict, path: str | Path, header: str = "") -> Path:
    """Write `spec` to `path` (.toml or .yaml/.yml by its suffix), atomically; return the path."""
    from musubi_pipe.fileio import write_text_atomic

    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ConfigError([(str(path), "a run spec file ends in .yaml, .yml or .toml")])
    fmt = "toml" if path.suffix.lower() == ".toml" else "yaml"
    write_text_atomic(path, dumps(spec, fmt, header))
    return path
