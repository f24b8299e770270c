"""Register recipes/*.yaml as the Hydra group `recipe` (package _global_), and compose configs.

Hydra names a group after its folder; our recipes live in a top-level `recipes/` folder but must be
selected as `+recipe=NAME`, so each file is stored in the ConfigStore under group `recipe`.
`+recipe=x`, `override /model: y` inside a recipe and `-m '+recipe=glob(*)'` all work that way.
Users' own recipes go in `<dir>/recipe/NAME.yaml` with `--config-dir <dir>` (or hydra.searchpath).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from musubi_pipe.config.locate import conf_dir, recipes_dir
from musubi_pipe.config.run_dirs import register_run_dir_resolver

EXTRA_RECIPES: set[str] = set()  # recipes stored from run spec files (config/spec.py) in this process


def register_recipes(directory: Path | None = None) -> list[str]:
    """Store every recipe YAML of `directory` (default: bundled recipes) in the ConfigStore; return names."""
    from hydra.core.config_store import ConfigStore

    register_run_dir_resolver()
    store = ConfigStore.instance()
    names = []
    for path in sorted((directory or recipes_dir()).glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
        names.append(path.stem)
    return names


def compose(overrides: list[str] | None = None, config_dir: Path | None = None, return_hydra_config: bool = False):
    """Compose the config as the command line would (for tests and tools); returns a DictConfig.

    A run spec file among the overrides (`my_run.toml`) is read and stands for its recipe, as on the command line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from musubi_pipe.config.overrides import rewrite_aliases

    from musubi_pipe.config.spec import spec_arguments

    register_recipes()
    overrides, _ = spec_arguments(list(overrides or []))
    overrides, _ = rewrite_aliases(overrides)
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir or conf_dir())):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=return_hydra_config)
