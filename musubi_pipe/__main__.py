"""Command line: `python -m musubi_pipe +recipe=NAME [key=value ...]` or `python -m musubi_pipe my_run.toml
[key=value ...]` (a run spec file, YAML or TOML: config/spec.py), or the `musubi-pipe` script.

Hydra composes the config (conf/ + the recipe or spec + overrides); `--cfg job` prints it without importing
torch, and `--cfg job --save my_run.toml` writes it as a run spec instead; `-m` sweeps, each job sharing
the same caches. Bad input exits with status 2 and a message naming the key, file or line, without a
traceback.
"""

from __future__ import annotations

import signal
import sys

from musubi_pipe.config import conf_dir, register_recipes
from musubi_pipe.config.overrides import check_overrides, rewrite_aliases

_SPEC = None  # the run spec file named on the command line (config.spec.Spec), for errors naming its lines


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from musubi_pipe.config.spec import job_spec, locate_problems
    from musubi_pipe.errors import ConfigError, Terminated, UserError
    from musubi_pipe.runner import run

    def terminated(signum, frame):
        raise Terminated("stopped by SIGTERM")

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # SLURM and `kill` send it: record the run, then stop
        signal.signal(signal.SIGTERM, terminated)
    hydra_cfg = HydraConfig.get()
    try:
        try:
            spec = job_spec(cfg, dict(hydra_cfg.runtime.choices))
        except Exception as err:  # noqa: BLE001 - the run goes on without its spec.yaml; say why
            print(f"warning: the run spec of this run could not be written ({err})", file=sys.stderr)
            spec = None
        run(cfg, hydra_cfg.runtime.output_dir, overrides=list(hydra_cfg.overrides.task), spec=spec)
    except ConfigError as err:
        print(f"error: {locate_problems(err, _SPEC)}", file=sys.stderr)
        sys.exit(2)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print(f"interrupted: stopped by SIGTERM; the run folder records it ({hydra_cfg.runtime.output_dir})",
              file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)


def _save_spec(argv: list[str], typed: list[str]) -> None:
    """`--cfg job --save FILE`: write the composed run as a run spec (YAML or TOML by FILE's suffix)."""
    from musubi_pipe.config.spec import compose_spec, write_spec

    i = argv.index("--save")
    path = argv[i + 1] if i + 1 < len(argv) else ""
    rest = argv[:i] + argv[i + 2:]
    cfg_flags = [j for j, a in enumerate(rest) if a in ("--cfg", "-c")]
    if not path or not cfg_flags or rest[cfg_flags[0] + 1: cfg_flags[0] + 2] != ["job"]:
        print("error: --save FILE.toml|FILE.yaml goes with --cfg job: python -m musubi_pipe +recipe=NAME "
              "[key=value ...] --cfg job --save my_run.toml", file=sys.stderr)
        sys.exit(2)
    j = cfg_flags[0]
    overrides = rest[:j] + rest[j + 2:]
    if any(a.startswith("-") for a in overrides):
        print(f"error: --save writes one run; drop {[a for a in overrides if a.startswith('-')]}", file=sys.stderr)
        sys.exit(2)
    header = ("Run spec written by: python -m musubi_pipe " + " ".join(typed) +
              f"\nRun it: python -m musubi_pipe {path} [key=value ...]")
    write_spec(compose_spec(overrides), path, header=header)
    print(f"wrote {path}", file=sys.stderr)


def entry() -> None:
    """Console-script entry point."""
    import hydra

    from musubi_pipe.config.spec import spec_arguments
    from musubi_pipe.errors import ConfigError

    global _SPEC
    register_recipes()
    typed = sys.argv[1:]
    try:
        sys.argv[1:], _SPEC = spec_arguments(sys.argv[1:])
        if "--save" in sys.argv[1:]:
            _save_spec(sys.argv[1:], typed)
            return
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
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
