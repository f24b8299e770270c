"""Command line: `python -m musubi_pipe +recipe=NAME [key=value ...]` (or the `musubi-pipe` script).

Hydra composes the config (conf/ + the recipe + overrides); `--cfg job` prints it without importing
torch; `-m` sweeps, each job sharing the same caches. Bad input exits with status 2 and a message
naming the key or file, without a traceback.
"""

from __future__ import annotations

import signal
import sys

from musubi_pipe.config import conf_dir, register_recipes
from musubi_pipe.config.overrides import check_overrides, rewrite_aliases


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from musubi_pipe.errors import Terminated, UserError
    from musubi_pipe.runner import run

    def terminated(signum, frame):
        raise Terminated("stopped by SIGTERM")

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # SLURM and `kill` send it: record the run, then stop
        signal.signal(signal.SIGTERM, terminated)
    hydra_cfg = HydraConfig.get()
    try:
        run(cfg, hydra_cfg.runtime.output_dir, overrides=list(hydra_cfg.overrides.task))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print(f"interrupted: stopped by SIGTERM; the run folder records it ({hydra_cfg.runtime.output_dir})",
              file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)


def entry() -> None:
    """Console-script entry point."""
    import hydra

    register_recipes()
    sys.argv[1:], notes = rewrite_aliases(sys.argv[1:])
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    problems = check_overrides(sys.argv[1:])
    if problems:
        from musubi_pipe.config.overrides import report_all
        from musubi_pipe.errors import ConfigError

        print(f"error: {ConfigError(report_all(sys.argv[1:]))}", file=sys.stderr)
        sys.exit(2)
    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")(_task)()


if __name__ == "__main__":
    entry()
