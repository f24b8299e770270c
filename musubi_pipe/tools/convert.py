"""convert: rewrite a LoRA file (Wan, HunyuanVideo) in the key layout another tool loads.

    python -m musubi_pipe.tools convert INPUT OUTPUT --to {musubi,comfy,official,diffusers}
                                        [--dtype float32|bfloat16|float16]

For whoever trained a LoRA here (musubi layout) and loads it elsewhere, or brings a LoRA from another
trainer; `musubi_pipe.network.formats.convert_file()` does the same from Python. Prints the source
format it detected, the target and the module count.

Targets (--to); docs/training.md ("Where LoRA files load") has which tool loads which, checked with their code:
  musubi     lora_unet_<module>.lora_down/lora_up.weight + .alpha: the only layout musubi-tuner reads
             (--network_weights, generate, merge_lora.py). ComfyUI loads it, except HunyuanVideo's MLP and
             modulation modules; diffusers (Wan) when every block has all its linears.
  official   diffusion_model.<module>.lora_down/lora_up.weight + .alpha: ComfyUI (HunyuanVideo's default).
  comfy      diffusion_model.<module>.lora_A/lora_B.weight, alpha baked in (musubi-tuner's
             convert_lora.py --target other). ComfyUI, and diffusers for Wan, also a LoRA on a subset of
             the modules. LoHa/LoKr keep hada_*/lokr_* + .alpha: ComfyUI only.
  diffusers  transformer.<module>.lora_A/lora_B.weight (PEFT), alpha baked in, for diffusers'
             load_lora_weights: Wan diffusers module names (block linears), HunyuanVideo official
             names with an img_attn_qkv module; plain LoRA only.

Inputs (detected from the keys): musubi/musubi-tuner/sd-scripts files, Wan-Fun (lora_unet__...),
ComfyUI and diffusion-pipe (diffusion_model.<module>.lora_A/B or lora_down/lora_up), ai-toolkit
(diffusers module names under diffusion_model. or transformer., optional .alpha) and diffusers.

Alpha: a LoRA scales by alpha/rank; "baked in" means A and B are each multiplied by sqrt(alpha/rank)
and no alpha key is written, so every loader applies the same update. The metadata is copied, with
ss_lora_format set to the target and the baked alphas recorded (ss_lora_baked_alpha), so converting
back to musubi restores the original tensors and alpha. Hashes are recomputed. --dtype casts every
tensor (default: keep each tensor's dtype).
"""

from __future__ import annotations

import argparse

from musubi_pipe.network.formats import DTYPES, FORMATS, KIND_TITLES, convert_file

HELP = "convert a LoRA between the musubi, official, ComfyUI (comfy) and diffusers key layouts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the convert options on `parser` (the `convert` subcommand of python -m musubi_pipe.tools)."""
    parser.add_argument("input", metavar="INPUT", help="the LoRA .safetensors file to read (any layout above)")
    parser.add_argument("output", metavar="OUTPUT", help="the .safetensors file to write (replaced if it exists)")
    parser.add_argument(
        "--to", required=True, choices=list(FORMATS), help="target layout (see Targets above)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="cast every tensor to this dtype (default: keep the input's)")


def main(args: argparse.Namespace) -> int:
    """Convert args.input to args.output in layout args.to; print what was done. Return the exit status."""
    report = convert_file(args.input, args.output, args.to, dtype=args.dtype)
    kinds = ", ".join(f"{n} {KIND_TITLES[k]}" for k, n in sorted(report["kinds"].items()))
    modules = f"{report['modules']} module{'' if report['modules'] == 1 else 's'}"
    print(f"{args.input}: {report['source_format']} -> {report['to']}, {modules} ({kinds}) written to "
          f"{report['output']}", flush=True)
    return 0
