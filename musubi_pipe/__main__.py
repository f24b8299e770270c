"""Command line: `python -m musubi_pipe +recipe=NAME [key=value ...]` (or the `musubi-pipe` script).

Hydra composes the config (conf/ + the recipe + overrides); `--cfg job` prints it without importing
torch; `-m` sweeps, each job sharing the same caches. Bad input exits with status 2 and a message
naming the key or file, without a traceback.
"""

from __future__ import annotations

import sys

from musubi_pipe.config import conf_dir, register_recipes


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from musubi_pipe.errors import UserError
    from musubi_pipe.runner import run

    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def entry() -> None:
    """Console-script entry point."""
    import hydra

    register_recipes()
    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")(_task)()


if __name__ == "__main__":
    entry()
