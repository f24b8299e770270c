"""Validate a composed config before any weight is loaded; report every problem at once.

Every check runs and all problems are raised together: a musubi-tuner dataset file and the prompt
file, the schema (unknown keys, missing `???`, types, choices) for every group, dataset entries and
sampling prompts, the training settings, and, when model.arch names a family, the embedded demo assets
are built and the family checks its weight files and each stage's needs. A check that stumbles over a
value already reported (a string where a number belongs) is skipped rather than reported twice.
"""

from __future__ import annotations

from musubi_pipe.config.schema import PROMPT_KEYS, SCHEMA, check_mapping
from musubi_pipe.errors import ConfigError


def _schema_for(cfg: dict) -> dict:
    """Return SCHEMA with the model group extended by the family's own keys."""
    from musubi_pipe.models import family_names, get_family

    schema = dict(SCHEMA)
    arch = (cfg.get("model") or {}).get("arch")
    if arch in family_names():
        schema["model"] = {**SCHEMA["model"], **get_family(arch).model_keys}
    return schema


def check_structure(cfg: dict) -> list[tuple[str, str]]:
    """Return schema problems of the whole config (no file access)."""
    from musubi_pipe.data.dataset_config import check_datasets
    from musubi_pipe.config.schema import STAGE_NAMES

    body = {k: v for k, v in cfg.items() if k != "hydra"}
    problems = check_mapping("", body, _schema_for(cfg))
    dataset = body.get("dataset") or {}
    stages = (body.get("pipeline") or {}).get("stages") or []
    from musubi_pipe.config.schema import DATASET_STAGES

    needs_data = any(name in DATASET_STAGES for name in stages)
    if isinstance(dataset, dict) and dataset.get("datasets") == [] and needs_data:
        problems.append(("dataset.datasets", "is empty; add at least one image_directory or video_directory entry, "
                         "e.g. 'dataset.datasets=[{video_directory:/data/clips,target_frames:[81]}]', or give a "
                         "musubi-tuner dataset file with dataset.musubi_config=path/to/dataset.toml"))
    elif isinstance(dataset.get("datasets"), list) and isinstance(dataset.get("general", {}), dict) and needs_data:
        problems += check_datasets(dataset.get("general"), dataset["datasets"], "dataset")
    for i, prompt in enumerate((body.get("sampling") or {}).get("prompts") or []):
        problems += check_mapping(f"sampling.prompts[{i}]", prompt, PROMPT_KEYS)
    for name in (body.get("pipeline") or {}).get("stages") or []:
        if name not in STAGE_NAMES:
            problems.append(("pipeline.stages", f"unknown stage {name!r}; stages are {list(STAGE_NAMES)}"))
    return problems


def check_training_settings(cfg: dict) -> list[tuple[str, str]]:
    """Network, optimizer, schedule and timestep settings, checked without torch or the model."""
    from musubi_pipe.network.settings import network_problems
    from musubi_pipe.training.optimizers import check_optimizer_config
    from musubi_pipe.training.schedule import check_scheduler_config
    from musubi_pipe.training.timestep_spec import check_spec

    train = cfg["training"]
    max_steps = None if train.get("max_train_epochs") else train["max_train_steps"]
    problems = network_problems(cfg["network"], "network")
    dataset = cfg["dataset"]
    if not 1 <= dataset["slice"] <= max(dataset["num_slices"], 1) or dataset["num_slices"] < 1:
        problems.append(("dataset.slice", f"is {dataset['slice']} with dataset.num_slices={dataset['num_slices']}; "
                         "use 1 <= slice <= num_slices"))
    problems += check_optimizer_config(cfg["optimizer"]) + check_scheduler_config(cfg["optimizer"], max_steps)
    problems += _check_loraid(cfg)
    return problems + check_spec(train)


def _check_loraid(cfg: dict) -> list[tuple[str, str]]:
    """LORAID settings: capacity for the model, and no other way of choosing modules beside them."""
    from musubi_pipe.models import get_family
    from musubi_pipe.network.loraid import check_loraid_settings

    net = cfg["network"]
    if net.get("loraid") is None:
        return []
    if not getattr(get_family(cfg["model"]["arch"]), "supports_loraid", False):
        return [("network.loraid", f"LORAID allocation is built for Wan models only, not model.arch="
                 f"{cfg['model']['arch']}; remove network.loraid")]
    problems = check_loraid_settings(net, cfg["model"].get("task"), arch=cfg["model"]["arch"])
    if net.get("include_patterns"):
        problems.append(("network.include_patterns", "is set with network.loraid, which already chooses the modules; "
                         "remove it (exclude_patterns still apply on top)"))
    if cfg["training"].get("shared_expert_lora"):
        problems.append(("training.shared_expert_lora", "cannot share one LoRA between experts with network.loraid "
                         "(an ID owns different modules on each expert); set it to false"))
    return problems


def read_prompt_file(cfg: dict) -> None:
    """Append the prompts of sampling.prompt_file (musubi-tuner's inline syntax) to sampling.prompts, in place."""
    from musubi_pipe.sampling.prompts import read_prompt_file as read

    sampling = cfg.get("sampling")
    path = sampling.get("prompt_file") if isinstance(sampling, dict) else None
    if isinstance(path, str):
        sampling["prompts"] = list(sampling.get("prompts") or []) + read(path)


def read_musubi_config(cfg: dict, overrides=()) -> None:
    """Replace dataset.general/datasets with a musubi-tuner dataset file's, when dataset.musubi_config names one.

    The file replaces both, so a `dataset.general.*` or `dataset.datasets` given on the command line
    (`overrides`) alongside it would be dropped: that is an error naming the keys.
    """
    from musubi_pipe.data.dataset_config import load_musubi_config

    dataset = cfg.get("dataset")
    path = dataset.get("musubi_config") if isinstance(dataset, dict) else None
    if not isinstance(path, str):
        return
    dropped = [key for key in map(_override_key, overrides) if key == "dataset.general"
               or key.startswith("dataset.general.")]
    if dropped:
        raise ConfigError([(key, f"is given on the command line, but dataset.musubi_config={path} replaces all of "
                            "dataset.general with the file's [general]; set it in the file, or drop "
                            "dataset.musubi_config and give dataset.datasets") for key in dropped])
    if dataset.get("datasets"):
        raise ConfigError([("dataset.musubi_config", f"is set ({path}) and so is dataset.datasets; use one: "
                            "dataset.datasets=[] to read the file, or dataset.musubi_config=null")])
    dataset["general"], dataset["datasets"] = load_musubi_config(path)


def _override_key(override: str) -> str:
    """The dotted key of a command-line override (`+a.b=1`, `++a.b=1`, `~a.b` -> `a.b`)."""
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def _collect(check, *args) -> list[tuple[str, str]]:
    """Run a check that raises ConfigError; return its problems instead."""
    try:
        check(*args)
    except ConfigError as err:
        return err.problems
    return []


def _guarded(check, cfg: dict, known: list) -> list[tuple[str, str]]:
    """Run a check that assumes well-formed values. When earlier problems make it stumble (a string where a
    number belongs), those problems already explain why; without earlier problems the error is a bug."""
    try:
        found = check(cfg)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        if known:
            return []
        raise
    reported = {key for key, _ in known}
    return [(key, msg) for key, msg in found if key not in reported]  # one message per bad value


def validate(cfg: dict, overrides=()) -> None:
    """Raise ConfigError listing every problem of `cfg` (a resolved plain dict); build demo assets.

    Every check runs, so one pass reports them all: the dataset file, the schema, the training settings
    and, when model.arch names a family, the model's files and the stage-specific checks. A
    musubi-tuner dataset file (dataset.musubi_config) is read into `cfg` first, in place; `overrides` are
    the command line's (see read_musubi_config).
    """
    from musubi_pipe.models import family_names, get_family

    problems = _collect(read_musubi_config, cfg, overrides)
    dataset_file_failed = bool(problems)
    problems += _collect(read_prompt_file, cfg)
    structure = check_structure(cfg)
    if dataset_file_failed:  # its problems say why the datasets are missing
        structure = [(key, msg) for key, msg in structure if not key.startswith("dataset.datasets")]
    problems += structure
    problems += _guarded(check_training_settings, cfg, problems)
    if (cfg.get("model") or {}).get("arch") in family_names():  # each check skips what earlier problems explain
        _guarded(lambda c: prepare_embedded(c) or [], cfg, problems)
        problems += _guarded(lambda c: get_family(c["model"]["arch"]).check_config(c["model"]), cfg, problems)
        problems += _guarded(_check_stages, cfg, problems)
    if problems:
        raise ConfigError(_unique(problems))


def _unique(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((key, msg) for key, msg in problems))


def _check_stages(cfg: dict) -> list[tuple[str, str]]:
    """The checks of what the selected stages need: experts, dataset features, memory, prompts, formats."""
    from musubi_pipe.memory.settings import memory_problems
    from musubi_pipe.models import get_family
    from musubi_pipe.sampling.settings import check_embedded_guidance, check_generate, check_prompts

    family = get_family(cfg["model"]["arch"])
    stages = cfg["pipeline"]["stages"]
    problems = _check_experts(cfg, family) + _check_image_only(cfg, family) + _check_dataset_features(cfg["dataset"])
    problems += family.check_stages(cfg["model"], stages) + _check_save_format(cfg, family)
    problems += memory_problems(cfg, family)
    problems += check_embedded_guidance(cfg["sampling"], family.sampling_defaults(cfg["model"]))
    if "sample" in stages or ("generate" in stages and not cfg["sampling"].get("latents")):
        problems += check_prompts(cfg["sampling"], family.geometry(cfg["model"]), family.sample_image(cfg["model"]))
    if "generate" in stages:
        problems += check_generate(cfg["sampling"])
    return problems


# Dataset keys of musubi-tuner features not built here yet: accepted by the schema (a dataset file
# written for musubi-tuner reads), but a value other than the default is an error, not a silent no-op.
UNBUILT_DATASET_FEATURES = {
    "multiple_target": "Qwen-Image-Layered training",
    "fp_1f_clean_indices": "one-frame training (FramePack / Wan)",
    "fp_1f_target_index": "one-frame training (FramePack / Wan)",
    "fp_1f_no_post": "one-frame training (FramePack / Wan)",
}


def _check_dataset_features(dataset: dict) -> list[tuple[str, str]]:
    """Name the dataset keys that ask for a feature musubi_pipe does not have yet."""
    from musubi_pipe.data.dataset_config import entry_where, merged_entry

    problems = []
    for i, entry in enumerate(dataset["datasets"]):
        merged = merged_entry(dataset.get("general"), entry)
        for key, feature in UNBUILT_DATASET_FEATURES.items():
            if merged.get(key) not in (None, False):
                problems.append((f"{entry_where(dataset, i)}.{key}", f"asks for {feature}, which musubi_pipe does not "
                                 "support yet; remove the key"))
    return problems


def _check_save_format(cfg: dict, family) -> list[tuple[str, str]]:
    value = cfg["network"].get("save_format")
    allowed = family.lora_naming.save_formats
    if value is not None and value not in allowed:
        return [("network.save_format", f"is {value!r}; {family.name} LoRAs are saved as one of {list(allowed)} "
                 f"(null: {family.lora_naming.default_save_format})")]
    if value == "diffusers" and cfg["network"]["network_module"] != "lora":
        return [("network.save_format", "is diffusers, which loads no LoHa or LoKr; use network_module=lora or "
                 "another format")]
    return []


def _check_image_only(cfg: dict, family) -> list[tuple[str, str]]:
    """A model that takes images only (Family.image_only): video datasets and samples of several frames are errors."""
    if not family.image_only:
        return []
    from musubi_pipe.data.dataset_config import entry_where
    from musubi_pipe.sampling.settings import prompt_settings

    problems = []
    dataset = cfg["dataset"]
    for i, entry in enumerate(dataset.get("datasets") or []):
        for key in ("video_directory", "video_jsonl_file"):
            if entry.get(key):
                problems.append((f"{entry_where(dataset, i)}.{key}", f"is a video source, but {family.name} trains on "
                                 "images only; use image_directory or image_jsonl_file"))
    for i, p in enumerate(prompt_settings(cfg["sampling"], family.sampling_defaults(cfg["model"]))):
        if p["frames"] not in (None, 1):
            problems.append((f"sampling.prompts[{i}].frames", f"is {p['frames']}, but {family.name} makes images; set "
                             "sampling.frames=1 (or the prompt's frames)"))
    return problems


def _check_experts(cfg: dict, family) -> list[tuple[str, str]]:
    """Expert options on a model with one DiT are mistakes, not no-ops: name them."""
    if len(family.experts(cfg["model"])) > 1:
        return []
    task, problems = cfg["model"].get("task"), []
    which = cfg["training"]["experts"]
    if which != "both":
        problems.append(("training.experts", f"is {which!r} but model.task={task} has one DiT; use both"))
    sampling = cfg["sampling"]
    scales = [("sampling.guidance_scale_high", sampling.get("guidance_scale_high"))]
    scales += [(f"sampling.prompts[{i}].guidance_scale_high", p.get("guidance_scale_high"))
               for i, p in enumerate(sampling.get("prompts") or [])]
    for key, value in scales:
        if value is not None:
            problems.append((key, f"is set but model.task={task} has one DiT; use guidance_scale"))
    return problems


def prepare_embedded(cfg: dict) -> None:
    """Write the embedded tiny model and demo dataset where the config points (first use only)."""
    from musubi_pipe.models import get_family

    if cfg["model"].get("tiny_dir"):
        get_family(cfg["model"]["arch"]).build_tiny(cfg["model"]["tiny_dir"], cfg["model"]["task"])
    if cfg["dataset"].get("demo_dir"):
        from musubi_pipe.data.demo import make_demo_dataset

        make_demo_dataset(cfg["dataset"]["demo_dir"])
