"""Write the tiny Wan model (task "tiny-t2v") that tests and the demo train on, in users' file formats.

    paths = build_tiny(root)   # {"dit": ..., "vae": ..., "t5": ..., "t5_tokenizer": ...}

`build_tiny` writes an official-key DiT .safetensors (or a ComfyUI `model.diffusion_model.` one), an
official-key Wan2.1 VAE .safetensors, a transformers UMT5 encoder folder and a T5 tokenizer folder.
The weights are seeded and the tokenizer is built from a fixed word list, so every call produces the
same bytes; files already holding those bytes are not rewritten, and each file is written under a
temporary name and renamed, so a killed process never leaves half a file. `save_tiny_diffusers`
writes the same weights as diffusers folders.
"""

from __future__ import annotations

import os
import string
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import save
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

from musubi_pipe.models.wan.keymap import OFFICIAL_PREFIXES, dit_to_official, vae_to_official
from musubi_pipe.models.wan.tasks import TASKS

TASK = TASKS["tiny-t2v"]

# Words the tokenizer knows whole; anything else is spelled out letter by letter.
_WORDS = """
a an the and or of in on at to from with by for over under above below near behind between into
is are was be being has have it its this that these those there here one two three four five many
some all each every no not very small big large tiny huge tall short long wide little old new
red blue green yellow orange purple pink brown black white gray grey gold silver dark light bright
colorful striped spotted shiny soft round flat square circle triangle star heart line dot cube
sphere ball box ring stripe pattern shape shapes circles squares balls lines dots
cat cats dog dogs bird birds fish horse cow sheep rabbit mouse fox bear lion tiger duck frog
man woman boy girl person people child children face hand hands head eyes hair smile
car bus train boat plane bike road street bridge house building city town village room door window
table chair bed lamp cup book phone clock flower flowers tree trees grass leaf leaves forest garden
field mountain hill river lake sea ocean beach sand water wave waves rain snow cloud clouds sky sun
moon night day morning evening sunset sunrise fire smoke light shadow wind ice stone rock wall floor
background foreground scene view video image photo picture frame camera closeup shot animation style
moving moves move rolling rolls roll bouncing bounces bounce spinning spins spin rotating rotates
flying flies fly running runs run walking walks walk jumping jumps jump falling falls fall
swimming swims sliding slides growing grows shrinking shrinks turning turns floating floats
sitting sits standing stands looking looks playing plays dancing dances
slowly quickly fast slow left right up down around across through along toward away back forth
together alone center middle top bottom side edge corner
""".split()


def _tokenizer() -> T5TokenizerFast:
    """A T5-style Unigram tokenizer (pad 0, eos 1, unk 2; "</s>" appended) over `_WORDS`."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -1.0) for word in sorted(set(_WORDS))]
    # single characters cost more than whole words, so known words stay whole
    pieces += [(char, -5.0) for char in string.ascii_letters + string.digits + string.punctuation]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(tokenizer_object=tok, extra_ids=0, model_max_length=TASK.text_len)


def _seeded(seed: int, build):
    # a private RNG stream: same weights every call, and the caller's RNG state is left alone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _dit() -> WanTransformer3DModel:
    # diffusers' default init (its proj_out is a random Linear, not zeros, so the untrained model
    # makes a non-trivial prediction), with the residual gates of every block opened to about 1 as in
    # a trained Wan: at their init scale (~0.1) the blocks barely reach the output and a LoRA on
    # them could hardly learn anything.
    def build():
        model = WanTransformer3DModel(**TASK.dit_config)
        with torch.no_grad():
            for block in model.blocks:
                block.scale_shift_table[:, 2] += 1.0  # gate of self-attention
                block.scale_shift_table[:, 5] += 1.0  # gate of the feed-forward
        return model

    return _seeded(0, build)


def _vae() -> AutoencoderKLWan:
    return _seeded(1, lambda: AutoencoderKLWan(**TASK.vae_config))


def _t5(vocab_size: int) -> UMT5EncoderModel:
    return _seeded(2, lambda: UMT5EncoderModel(UMT5Config(**{**TASK.t5_config, "vocab_size": vocab_size})))


def _write(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, unless the file already holds exactly these bytes."""
    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save_pretrained(obj, folder: Path) -> None:
    """`obj.save_pretrained` into a scratch folder, then move each file into `folder` via `_write`."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        obj.save_pretrained(scratch)
        for f in sorted(Path(scratch).iterdir()):
            _write(folder / f.name, f.read_bytes())


def build_tiny(root, comfy_prefix: bool = False) -> dict[str, str]:
    """Write the tiny model under `root`; return {"dit", "vae", "t5", "t5_tokenizer"} -> path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dit_state = dit_to_official(_dit().state_dict())
    dit_path = root / "wan_tiny_dit.safetensors"
    if comfy_prefix:
        dit_state = {OFFICIAL_PREFIXES[0] + k: v for k, v in dit_state.items()}
        dit_path = root / "wan_tiny_dit_comfy.safetensors"
    _write(dit_path, save(dit_state))
    vae_path = root / "wan_tiny_vae.safetensors"
    _write(vae_path, save(vae_to_official(_vae().state_dict())))
    tokenizer = _tokenizer()
    _save_pretrained(tokenizer, root / "umt5_tiny_tokenizer")
    _save_pretrained(_t5(len(tokenizer)), root / "umt5_tiny")
    return {
        "dit": str(dit_path),
        "vae": str(vae_path),
        "t5": str(root / "umt5_tiny"),
        "t5_tokenizer": str(root / "umt5_tiny_tokenizer"),
    }


def save_tiny_diffusers(root) -> dict[str, str]:
    """Write the same tiny DiT and VAE as diffusers folders `root/transformer` and `root/vae`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _save_pretrained(_dit(), root / "transformer")
    _save_pretrained(_vae(), root / "vae")
    return {"dit": str(root / "transformer"), "vae": str(root / "vae")}
