"""merge: bake LoRA/LoHa/LoKr files into a DiT (Wan, HunyuanVideo, Z-Image) and write one official-format .safetensors.

    python -m musubi_pipe.tools merge --dit DIT [--dit SHARD2 ...] --lora LORA[:MULT] [--lora ...]
                                      --output OUT.safetensors [--dtype bfloat16|float16|float32]
                                      [--device cpu|cuda] [--include REGEX ...] [--exclude REGEX ...]
                                      [--expert high_noise|low_noise] [--overwrite]

Writes W + sum(multiplier * dW) for every module the LoRAs target; every other tensor is copied. The
architecture is recognised from the DiT (each family's reader; docs/tools.md lists what each takes). The
output uses the official key names (Wan blocks.0.self_attn.q.weight, ...; a LoRA on a part of a fused
official weight, such as Z-Image's to_q in attention.qkv, lands in its rows), so musubi_pipe
(model.dit=OUT.safetensors) and ComfyUI load it (for HunyuanVideo and Z-Image: not verified beyond the names). Its metadata lists the merged LoRAs
(ss_merged_loras: file, multiplier, sshs_model_hash).

--dit      an official file or any shard of a shard set, a ComfyUI file (model.diffusion_model.
           prefix, fp16/bf16 or plain fp8_e4m3fn; fp8_scaled is refused), an official Wan-AI folder
           (e.g. Wan2.2-T2V-A14B/high_noise_model), HunyuanVideo's mp_rank_00_model_states.pt, or a
           diffusers transformer or pipeline folder
--lora     a LoRA, LoHa or LoKr file, optionally with :MULTIPLIER (default 1.0, may be negative);
           repeat for several LoRAs. musubi/sd-scripts (lora_unet_*), ComfyUI/diffusion-pipe
           (diffusion_model.*), diffusers/PEFT (transformer.*), ai-toolkit and Wan-Fun files are read
--output   refused when the file exists, unless --overwrite is given
--dtype    output dtype of every float tensor (default: keep each tensor's; fp8 is upcast)
--device   where dW is computed in float32 (default cpu; a GPU helps with LoHa/LoKr or a slow CPU,
           plain LoRAs merge about as fast on the CPU: reading and writing dominate)
--include / --exclude
           regular expressions on official module paths (re.fullmatch, e.g. 'blocks\\.[0-9]\\..*'),
           applied to every LoRA: include keeps only matching modules, exclude then drops modules

Memory: the DiT is streamed one tensor at a time (read, merge, write), so a 28 GB 14B checkpoint
merges in well under 1 GB beyond the Python process itself: about three copies of the largest
tensor (a 13824x5120 FFN weight: 141 MB in bf16, 283 MB in float32) plus the LoRAs. The output is
written to a temporary file in the output folder and moved into place when complete, so disk space
for one more model is needed.

Wan2.2 A14B has two experts, i.e. two DiT files; merge each with its own LoRA, one command each:

    python -m musubi_pipe.tools merge --dit Wan2.2-T2V-A14B/high_noise_model \\
        --lora my_lora_high.safetensors --output wan22_high_merged.safetensors
    python -m musubi_pipe.tools merge --dit Wan2.2-T2V-A14B/low_noise_model \\
        --lora my_lora_low.safetensors --output wan22_low_merged.safetensors

(or --dit the repo root with --expert high_noise / low_noise; ComfyUI files work the same way:
--dit wan2.2_t2v_high_noise_14B_fp16.safetensors). A LoRA trained once for both experts is merged
into each file in turn.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from musubi_pipe.errors import UserError

HELP = "merge LoRA/LoHa/LoKr files into a DiT (Wan, HunyuanVideo, Z-Image): one official-format .safetensors"


def parse_lora(text: str) -> tuple[str, float]:
    """'path[:multiplier]' -> (path, multiplier); a colon not followed by a number belongs to the path."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the merge options on `parser` (the `merge` subcommand of python -m musubi_pipe.tools)."""
    parser.add_argument("--dit", action="append", required=True, metavar="DIT",
                        help="the DiT: a file, a shard (repeat --dit or name any shard), a Wan-AI or diffusers folder")
    parser.add_argument("--lora", action="append", required=True, type=parse_lora, metavar="LORA[:MULT]",
                        help="a LoRA file and its multiplier (default 1.0); repeat for several")
    parser.add_argument("--output", required=True, metavar="OUT.safetensors", help="the merged DiT to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists (default: refuse)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="output dtype of float tensors (default: keep each tensor's, fp8 upcast)")
    parser.add_argument("--device", default="cpu", help="device computing dW: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--include", action="append", default=[], metavar="REGEX",
                        help="merge only modules whose official path fully matches REGEX (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                        help="do not merge modules whose official path fully matches REGEX (repeatable)")
    parser.add_argument("--expert", choices=("high_noise", "low_noise"), default="",
                        help="Wan2.2 A14B: the expert to take when --dit is a Wan-AI repo root or diffusers pipeline")


def main(args: argparse.Namespace) -> int:
    """Run the merge with parsed options and print what was merged. Return the exit status."""
    from musubi_pipe.network.merge import merge_loras
    from musubi_pipe.tools.gc import human_bytes

    output = Path(args.output)
    if (output.exists() or output.is_symlink()) and not args.overwrite:
        raise UserError(f"--output {output} exists (a merged model takes minutes to write and much disk); pass "
                        "--overwrite to replace it, or choose another name")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    report = merge_loras(args.dit, args.lora, args.output, dtype=args.dtype, device=args.device,
                         expert=args.expert, include=args.include, exclude=args.exclude)
    for lora in report["loras"]:
        print(f"merged {lora['modules']} {lora['kind']} modules x {lora['multiplier']:g} from {lora['file']}")
    print(f"wrote {report['output']}: {human_bytes(report['bytes'])}, {report['tensors']} tensors "
          f"({report['changed']} changed) in {report['seconds']:.1f} s", flush=True)
    return 0
