"""ema: average the intermediate LoRA files of one training run with post-hoc EMA into one LoRA.

    python -m musubi_pipe.tools ema CKPT|FOLDER [CKPT|FOLDER ...] --output OUT.safetensors
                                    [--beta 0.95] [--beta2 B] [--sigma_rel S] [--no_sort]

musubi-tuner's lora_post_hoc_ema.py (same arithmetic, same options; --output_file also works).
The train stage's artifact folder holds the checkpoints (<name>-step00000200.safetensors,
<name>-000002.safetensors, kept by training.save_last_n) next to the final <name>.safetensors.

With files c_0 .. c_{N-1} in training order:

    state = c_0 (float32);  state ← β_i·state + (1 − β_i)·c_i  for i = 1 .. N−1

  --beta B [--beta2 B2]   β_i goes linearly from B (first merge) to B2 (last merge); constant B
                          without --beta2. Higher β keeps more of the earlier files.
  --sigma_rel S           power-function EMA (Karras et al. 2023, Algorithm 2), overrides --beta/--beta2:
                          γ = largest root >= 0 of γ³ + 7γ² + (16 − S⁻²)γ + (12 − S⁻²) = 0 and
                          β_i = (1 − 1/i)^(γ+1), so β_1 = 0 as in musubi-tuner: the first file
                          gets weight 0 (it only supplies the layout). S must be in (0, 0.2887];
                          0.2887 (1/√12) is the plain mean of files 2..N, smaller S leans to the last.

musubi-tuner's recipes (30 epochs): --beta 0.9 over epochs 15-30; --beta 0.95 over 10-30 for early
convergence; --beta 0.8 over 15-25 against overfitting; --sigma_rel 0.2 over all epochs.

Arguments: LoRA files, or folders standing for their *.safetensors files (not recursive) except
files without ss_steps metadata (the final LoRA of another tool, converted files), earlier EMA
results (ss_ema metadata), the --output file, and a file with the same step and tensors as another
(the last checkpoint next to the final LoRA); what a folder skipped is printed.

Order: by the training step recorded in each file (ss_steps, or ss_epoch when some file lacks
ss_steps), not by modification time as musubi-tuner does, so copied or downloaded files keep their
order; --no_sort takes the files as given, oldest first. It is an error when two files share a
step (two runs, or the high- and low-noise experts of a Wan2.2 run: average each expert apart),
when tensor names/shapes or .alpha values differ, or when network kind, expert or LORAID
allocation differ. Tensors keep the first file's dtypes; the metadata is the last file's with
ss_ema (a JSON record of method, steps, files, betas and weights) added and hashes recomputed.
Prints the order used (step, β, final weight of each file) and the output path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from musubi_pipe.errors import UserError

DEFAULT_BETA = 0.95
HELP = "average a run's intermediate LoRA checkpoints with post-hoc EMA (musubi-tuner's lora_post_hoc_ema)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ema options on `parser` (the `ema` subcommand of python -m musubi_pipe.tools)."""
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT",
                        help="LoRA .safetensors files of one run, or folders holding them")
    parser.add_argument("--output", "--output_file", required=True, metavar="OUT",
                        help="the averaged LoRA file to write")
    parser.add_argument("--beta", type=float, default=None,
                        help="decay at the first merge, kept for all merges without --beta2 (default: 0.95)")
    parser.add_argument("--beta2", type=float, default=None,
                        help="decay at the last merge; β goes linearly from --beta to --beta2")
    parser.add_argument("--sigma_rel", type=float, default=None,
                        help="power-function EMA width in (0, 0.2887], e.g. 0.2; overrides --beta/--beta2")
    parser.add_argument("--no_sort", action="store_true",
                        help="keep the files in the order given (oldest first) instead of ordering by ss_steps")


def main(args: argparse.Namespace) -> int:
    """Average the checkpoints, write --output and print the order used. Return the exit status."""
    from musubi_pipe.network.ema import collect_checkpoints, post_hoc_ema
    from musubi_pipe.network.lora_file import save_lora_file

    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise UserError(f"--output {output}: name a .safetensors file")
    if args.sigma_rel is not None and (args.beta is not None or args.beta2 is not None):
        print("warning: --sigma_rel overrides --beta/--beta2; they are ignored", file=sys.stderr)
    paths, notes = collect_checkpoints(args.checkpoints, exclude=[output])
    for note in notes:
        print(note)
    if output.resolve() in {p.resolve() for p in paths}:
        raise UserError(f"--output {output} is one of the checkpoints; choose another output file")
    beta = DEFAULT_BETA if args.beta is None else args.beta
    tensors, metadata = post_hoc_ema(paths, beta=beta, beta2=args.beta2, sigma_rel=args.sigma_rel,
                                     sort=not args.no_sort, log=print)
    save_lora_file(output, tensors, metadata)
    print(f"wrote {output}")
    return 0
