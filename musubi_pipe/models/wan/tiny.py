"""Write the tiny Wan models (the "tiny-*" tasks) that tests and the demo train on, in users' file formats.

    paths = build_tiny(root, "tiny-t2v")   # {"dit": ..., "vae": ..., "t5": ..., "t5_tokenizer": ...}

Each tiny task is written in the layout users download for its real twin (file names under `root`):

  tiny-t2v       official single files: wan_tiny_dit.safetensors, wan_tiny_vae.safetensors (Wan2.1 VAE),
                 models_t5_umt5_tiny-enc.pth (official T5 keys), umt5_tiny_tokenizer/
  tiny-i2v       wan_tiny_i2v_dit.safetensors (with img_emb, k_img/v_img), the shared VAE/T5/tokenizer,
                 models_clip_tiny.pth (official Wan CLIP keys)
  tiny-t2v-A14B  ComfyUI files with `model.diffusion_model.` keys: wan2.2_t2v_high_noise_tiny_fp16.safetensors,
                 wan2.2_t2v_low_noise_tiny_fp8_e4m3fn.safetensors (block linears in float8_e4m3fn, the rest
                 fp16), the shared VAE (ComfyUI wan_2.1_vae style = official keys), umt5_tiny_fp16.safetensors
                 (transformers keys, as ComfyUI's umt5_xxl_fp16.safetensors)
  tiny-i2v-A14B  the official Wan-AI repo: Wan2.2-I2V-A14B-tiny/{high_noise_model,low_noise_model}/ (config.json
                 of class WanModel + 2 official-key shards + index), Wan2.1_VAE.pth,
                 models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ (tokenizer)
  tiny-ti2v-5B   a diffusers pipeline: Wan2.2-TI2V-5B-tiny-Diffusers/{transformer,vae,text_encoder,tokenizer}/

The returned dict maps model config keys (dit, dit_high_noise, vae, t5, t5_tokenizer, clip) to paths.
Weights are seeded (each DiT expert its own seed, so experts differ) and the tokenizer is built from a
fixed word list, so every call produces the same bytes; files already holding those bytes are not
rewritten, and each file is written under a temporary name and renamed, so a killed process never
leaves half a file. Files shared by several tasks are written once under `root`.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import save
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

from musubi_pipe.models.tiny_files import json_bytes as _json
from musubi_pipe.models.tiny_files import torch_bytes
from musubi_pipe.models.tiny_files import save_pretrained_files as _save_pretrained
from musubi_pipe.models.tiny_files import seeded as _seeded
from musubi_pipe.models.tiny_files import write_file as _write
from musubi_pipe.models.wan import clip as clip_files
from musubi_pipe.models.wan import t5 as t5_files
from musubi_pipe.models.wan.keymap import OFFICIAL_PREFIXES, dit_to_official, vae_to_official
from musubi_pipe.models.wan.tasks import TASKS, WanTask

TEXT_LEN = TASKS["tiny-t2v"].text_len  # every tiny task's

# Seeds of the tiny weights: one per DiT (task, expert) so no two DiTs share weights, one per encoder.
_DIT_SEEDS = {
    ("tiny-t2v", ""): 0,
    ("tiny-i2v", ""): 10,
    ("tiny-t2v-A14B", "high_noise"): 20,
    ("tiny-t2v-A14B", "low_noise"): 21,
    ("tiny-i2v-A14B", "high_noise"): 30,
    ("tiny-i2v-A14B", "low_noise"): 31,
    ("tiny-ti2v-5B", ""): 40,
}
_VAE_SEEDS = {"2.1": 1, "2.2": 41}
_T5_SEED = 2
_CLIP_SEED = 3

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
    return T5TokenizerFast(tokenizer_object=tok, extra_ids=0, model_max_length=TEXT_LEN)


# --- seeded models --------------------------------------------------------------------------------


def _dit(task: WanTask, expert: str = "") -> WanTransformer3DModel:
    """The tiny DiT of `task` (`expert` of an A14B task).

    diffusers' default init (its proj_out is a random Linear, not zeros, so the untrained model makes
    a non-trivial prediction), with the residual gates of every block opened to about 1 as in a trained
    Wan: at their init scale (~0.1) the blocks barely reach the output and a LoRA on them could hardly
    learn anything.
    """

    def build():
        model = WanTransformer3DModel(**task.dit_config)
        with torch.no_grad():
            for block in model.blocks:
                block.scale_shift_table[:, 2] += 1.0  # gate of self-attention
                block.scale_shift_table[:, 5] += 1.0  # gate of the feed-forward
        return model

    return _seeded(_DIT_SEEDS[(task.name, expert)], build)


def _vae(task: WanTask) -> AutoencoderKLWan:
    return _seeded(_VAE_SEEDS[task.vae_version], lambda: AutoencoderKLWan(**task.vae_config))


def _t5(task: WanTask, vocab_size: int) -> UMT5EncoderModel:
    return _seeded(_T5_SEED, lambda: UMT5EncoderModel(UMT5Config(**{**task.t5_config, "vocab_size": vocab_size})))


def _clip_state(task: WanTask) -> dict:
    """Official Wan CLIP keys of the tiny CLIP vision tower (no projection head: Wan does not use it)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = _seeded(_CLIP_SEED, lambda: CLIPVisionModel(CLIPVisionConfig(**task.clip_config)))
    return clip_files.clip_to_official(model.state_dict(), projection_dim=task.clip_config["projection_dim"])


# --- writing --------------------------------------------------------------------------------------
def _pth(state: dict) -> bytes:
    return torch_bytes({k: v.contiguous() for k, v in state.items()})


def _official_dit(task: WanTask, expert: str = "") -> dict:
    return dit_to_official(_dit(task, expert).state_dict())


def _comfy(state: dict, dtype_of) -> dict:
    """ComfyUI single-file layout: `model.diffusion_model.` keys, each tensor cast to `dtype_of(name)`."""
    return {OFFICIAL_PREFIXES[0] + k: v.to(dtype_of(k)).contiguous() for k, v in state.items()}


def _fp8_dtype(name: str) -> torch.dtype:
    """Like ComfyUI *_fp8_e4m3fn.safetensors: the block linears' weights in float8_e4m3fn, the rest fp16."""
    return torch.float8_e4m3fn if name.startswith("blocks.") and name.endswith(".weight") and "norm" not in name \
        else torch.float16


class _Shared:
    """Files several tiny tasks use, written once per `build_tiny` call under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self._tokenizer = None
        self._t5_official = None

    def tokenizer(self, folder: Path | None = None) -> Path:
        folder = folder or self.root / "umt5_tiny_tokenizer"
        if self._tokenizer is None:
            self._tokenizer = _tokenizer()
        _save_pretrained(self._tokenizer, folder)
        return folder

    def t5_model(self, task: WanTask) -> UMT5EncoderModel:
        if self._tokenizer is None:
            self._tokenizer = _tokenizer()
        return _t5(task, len(self._tokenizer))

    def t5_pth(self, task: WanTask, path: Path | None = None) -> Path:
        """The official Wan T5 .pth (official keys, as models_t5_umt5-xxl-enc-bf16.pth)."""
        path = path or self.root / "models_t5_umt5_tiny-enc.pth"
        if self._t5_official is None:
            self._t5_official = _pth(t5_files.t5_to_official(self.t5_model(task).state_dict()))
        _write(path, self._t5_official)
        return path

    def vae21(self, task: WanTask) -> Path:
        """The Wan2.1 VAE with official keys as one .safetensors (ComfyUI wan_2.1_vae.safetensors style)."""
        path = self.root / "wan_tiny_vae.safetensors"
        _write(path, save(vae_to_official(_vae(task).state_dict(), "2.1")))
        return path


# --- one writer per tiny task ---------------------------------------------------------------------


def _build_t2v(root: Path, task: WanTask, shared: _Shared) -> dict[str, str]:
    dit = root / "wan_tiny_dit.safetensors"
    _write(dit, save(_official_dit(task)))
    return {"dit": dit, "vae": shared.vae21(task), "t5": shared.t5_pth(task), "t5_tokenizer": shared.tokenizer()}


def _build_i2v(root: Path, task: WanTask, shared: _Shared) -> dict[str, str]:
    dit, clip = root / "wan_tiny_i2v_dit.safetensors", root / "models_clip_tiny.pth"
    _write(dit, save(_official_dit(task)))
    _write(clip, _pth(_clip_state(task)))
    return {"dit": dit, "vae": shared.vae21(task), "t5": shared.t5_pth(task), "t5_tokenizer": shared.tokenizer(),
            "clip": clip}


def _build_t2v_a14b(root: Path, task: WanTask, shared: _Shared) -> dict[str, str]:
    high = root / "wan2.2_t2v_high_noise_tiny_fp16.safetensors"
    low = root / "wan2.2_t2v_low_noise_tiny_fp8_e4m3fn.safetensors"
    _write(high, save(_comfy(_official_dit(task, "high_noise"), lambda name: torch.float16)))
    _write(low, save(_comfy(_official_dit(task, "low_noise"), _fp8_dtype)))
    t5 = root / "umt5_tiny_fp16.safetensors"  # transformers keys, the tied embedding once (as ComfyUI's)
    t5_state = shared.t5_model(task).state_dict()
    t5_state.pop("encoder.embed_tokens.weight")
    _write(t5, save({k: v.to(torch.float16).contiguous() for k, v in t5_state.items()}))
    return {"dit": low, "dit_high_noise": high, "vae": shared.vae21(task), "t5": t5,
            "t5_tokenizer": shared.tokenizer()}


def _official_config(task: WanTask, model_type: str) -> dict:
    """config.json of an official Wan-AI model folder (class WanModel)."""
    c = task.dit_config
    return {
        "_class_name": "WanModel",
        "_diffusers_version": "0.33.0",
        "dim": c["num_attention_heads"] * c["attention_head_dim"],
        "eps": c["eps"],
        "ffn_dim": c["ffn_dim"],
        "freq_dim": c["freq_dim"],
        "in_dim": c["in_channels"],
        "model_type": model_type,
        "num_heads": c["num_attention_heads"],
        "num_layers": c["num_layers"],
        "out_dim": c["out_channels"],
        "text_len": task.text_len,
    }


def _write_official_folder(folder: Path, task: WanTask, expert: str, model_type: str) -> Path:
    """An official Wan-AI model folder: config.json, 2 official-key shards and their index."""
    state = _official_dit(task, expert)
    names = sorted(state)
    parts = (names[: len(names) // 2], names[len(names) // 2:])
    weight_map, total = {}, 0
    for i, part in enumerate(parts, start=1):
        shard = f"diffusion_pytorch_model-{i:05d}-of-{len(parts):05d}.safetensors"
        _write(folder / shard, save({k: state[k] for k in part}))
        weight_map.update({k: shard for k in part})
        total += sum(state[k].numel() * state[k].element_size() for k in part)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write(folder / "diffusion_pytorch_model.safetensors.index.json", _json(index))
    _write(folder / "config.json", _json(_official_config(task, model_type)))
    return folder


def _build_i2v_a14b(root: Path, task: WanTask, shared: _Shared) -> dict[str, str]:
    repo = root / "Wan2.2-I2V-A14B-tiny"
    high = _write_official_folder(repo / "high_noise_model", task, "high_noise", "i2v")
    low = _write_official_folder(repo / "low_noise_model", task, "low_noise", "i2v")
    vae = repo / "Wan2.1_VAE.pth"
    _write(vae, _pth(vae_to_official(_vae(task).state_dict(), "2.1")))
    t5 = shared.t5_pth(task, repo / t5_files.OFFICIAL_T5_FILE)
    tokenizer = shared.tokenizer(repo / "google" / "umt5-xxl")
    return {"dit": low, "dit_high_noise": high, "vae": vae, "t5": t5, "t5_tokenizer": tokenizer}


def _build_ti2v_5b(root: Path, task: WanTask, shared: _Shared) -> dict[str, str]:
    pipeline = root / "Wan2.2-TI2V-5B-tiny-Diffusers"
    save_tiny_diffusers(pipeline, task.name)
    _save_pretrained(shared.t5_model(task), pipeline / "text_encoder")
    shared.tokenizer(pipeline / "tokenizer")
    return {"dit": pipeline, "vae": pipeline, "t5": pipeline, "t5_tokenizer": pipeline}


_BUILDERS = {
    "tiny-t2v": _build_t2v,
    "tiny-i2v": _build_i2v,
    "tiny-t2v-A14B": _build_t2v_a14b,
    "tiny-i2v-A14B": _build_i2v_a14b,
    "tiny-ti2v-5B": _build_ti2v_5b,
}
TINY_TASKS = tuple(_BUILDERS)


def build_tiny(root, task_name: str = "tiny-t2v") -> dict[str, str]:
    """Write the tiny model of `task_name` under `root` (layouts in the module doc); return
    {model config key: path} with keys among dit, dit_high_noise, vae, t5, t5_tokenizer, clip."""
    if task_name not in _BUILDERS:
        raise ValueError(f"no tiny model for task {task_name!r}; expected one of {list(_BUILDERS)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = _BUILDERS[task_name](root, TASKS[task_name], _Shared(root))
    return {key: str(path) for key, path in paths.items()}


def save_tiny_diffusers(root, task_name: str = "tiny-t2v") -> dict[str, str]:
    """Write the tiny DiT and VAE of a single-DiT tiny task as diffusers folders `root/transformer`, `root/vae`."""
    task = TASKS[task_name]
    if task.boundary is not None:
        raise ValueError(f"{task_name} has two DiT experts; save_tiny_diffusers writes single-DiT tasks")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _save_pretrained(_dit(task), root / "transformer")
    _save_pretrained(_vae(task), root / "vae")
    return {"dit": str(root / "transformer"), "vae": str(root / "vae")}
