"""One-off maintenance commands: `python -m musubi_pipe.tools VERB [options]`.

Unlike `python -m musubi_pipe`, these are not pipeline runs: they take plain argparse options, write
no run record and never import torch unless a verb needs it. Verbs today:

    gc    remove cache entries no recent run references and report the space freed (tools/gc.py)

Later verbs (merge, convert, ema, inspect) live in one module each here and register one line in
`VERBS` of tools/__main__.py. A verb module provides `HELP` (one line), `__doc__` (its --help text),
`add_arguments(parser)` and `main(args) -> int` (the exit status).
"""
