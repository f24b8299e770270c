"""Command line of the maintenance tools: `python -m musubi_pipe.tools VERB [options]`.

Each verb is a module of musubi_pipe.tools (see its docstring for the contract); this module only
builds the argparse parser with one subcommand per verb and turns a UserError into a message and
exit status 2. Importing it imports no torch: a verb imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from musubi_pipe.errors import UserError

# verb -> module (imported when the parser is built; each must stay torch-free at import time)
VERBS: dict[str, str] = {
    "convert": "musubi_pipe.tools.convert",
    "ema": "musubi_pipe.tools.ema",
    "from-musubi": "musubi_pipe.tools.from_musubi",
    "gc": "musubi_pipe.tools.gc",
    "inspect": "musubi_pipe.tools.inspect_lora",
    "loraid-table": "musubi_pipe.tools.loraid_table",
    "merge": "musubi_pipe.tools.merge",
}


def build_parser() -> argparse.ArgumentParser:
    """Return the parser: one subcommand per entry of VERBS, with the module's docstring as --help."""
    parser = argparse.ArgumentParser(
        prog="python -m musubi_pipe.tools",
        description="One-off commands for LoRA files, models and the cache of musubi_pipe. "
        "Run `python -m musubi_pipe.tools VERB --help` for the options of one verb.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", title="verbs")
    for verb, module_name in VERBS.items():
        module = importlib.import_module(module_name)
        verb_parser = sub.add_parser(
            verb,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]), run the verb and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help(sys.stderr)
        print(f"\nerror: name a verb, one of: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    try:
        return args._module.main(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
