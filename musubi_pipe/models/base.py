"""The interface every architecture family implements; stages and the training loop use only this.

`model_cfg` is the composed `model` config group as a plain dict (OmegaConf containers converted),
for example for Wan: {"arch": "wan", "task": "t2v-A14B", "dit": path, "dit_high_noise": path,
"vae": path, "t5": path, "t5_tokenizer": path, ...}. Methods that load weights import torch lazily.

Some models are several DiTs ("experts"), each denoising one range of timesteps (Wan2.2 A14B: a
high-noise expert for t >= boundary, a low-noise one below). `Family.experts` lists them; a model
with one DiT has one expert named "" covering [0, 1]. `route` is the one rule that picks the expert
for a timestep, in training and in sampling alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence


@dataclass(frozen=True)
class Geometry:
    """How pixels map to the DiT's tokens, and the frame rate the model works at."""

    fps: int
    vae_stride: tuple[int, int, int]  # (temporal, height, width) compression of the VAE
    patch: tuple[int, int, int]  # the DiT's patch size over latents (frames, height, width)
    latent_channels: int

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this (VAE stride x patch): bucket step and sample sizes."""
        return self.vae_stride[1] * self.patch[1]


@dataclass(frozen=True)
class Expert:
    """One DiT of a model: denoises timesteps t (in [0, 1]) with t_min <= t < t_max (t_max 1 includes 1)."""

    name: str  # "" for single-DiT models; else e.g. "high_noise" (also the LoRA file suffix)
    key: str  # the model config key of its weights, e.g. "model.dit_high_noise"
    t_min: float
    t_max: float

    def contains(self, t: float) -> bool:
        return self.t_min <= t and (t < self.t_max or self.t_max >= 1.0)


def route(experts: Sequence[Expert], t: float) -> Expert:
    """Return the expert that denoises timestep t in [0, 1] (t >= boundary goes to the higher expert)."""
    for expert in sorted(experts, key=lambda e: -e.t_min):
        if t >= expert.t_min:
            return expert
    return min(experts, key=lambda e: e.t_min)


def active_experts(experts: list, which: str) -> list:
    """The experts `training.experts` selects: both (all), high or low (Wan2.2 A14B)."""
    if which == "both":
        return list(experts)
    chosen = [e for e in experts if e.name == f"{which}_noise"]
    if not chosen:
        raise ValueError(f"training.experts={which} needs a model with high- and low-noise experts")
    return chosen


@dataclass(frozen=True)
class DitTensor:
    """One tensor of a DiT file as `Family.dit_tensors` lists it (for tools merge): the file and key it is read from,
    its official name, safetensors dtype code ("BF16", ...) and shape; `loaded` holds it already when the file has
    no header to read lazily (a .pt state dict, renamed diffusers weights); `parts` names the LoRA modules whose
    weights are row slices of it."""

    file: Path
    key: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    loaded: Any = None
    # a fused official weight whose rows are several LoRA modules (Z-Image's attention.qkv holds to_q, to_k and
    # to_v): ((module, first row, rows), ...); a LoRA on a part is merged into those rows
    parts: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True)
class LoraidLayout:
    """How LORAID (network/loraid.py) cuts a model into units: the block list (official name prefix, e.g. "blocks"),
    the sub-module groups of a block (loraid_unit=submodule), the blocks per DiT, the experts (in canonical order)
    and one expert's LoRA candidates (official names, in order; no torch needed)."""

    block_list: str
    groups: tuple[str, ...]
    num_blocks: int
    experts: tuple[str, ...]
    candidates: tuple[str, ...]


class NotADit(Exception):
    """Family.dit_tensors: the path is not this family's DiT (the message says what was expected)."""


@dataclass
class TrainingInputs:
    """What one training step feeds the DiT and compares its output with.

    noisy [B, C, F, H, W]; timesteps [B] on the model's 0..1000 scale (musubi: up to 1001); target like noisy; mask None
    or a tensor broadcastable to target (1 = counts in the loss); cond: conditioning tensors for
    `Family.predict` (e.g. image latents), batched.
    """

    noisy: Any
    timesteps: Any
    target: Any
    mask: Any = None
    cond: dict = field(default_factory=dict)


class VAE(Protocol):
    """A loaded video VAE (with any image encoder the task needs). Pixels are float in [-1, 1], [B, 3, F, H, W]."""

    def encode(self, pixels) -> Any:
        """Return normalized latents [B, C, F', H', W'] of pixels (used for control media)."""

    def encode_item(self, pixels) -> dict:
        """Return the cached tensors of one training item: "latents" (normalized) plus conditioning tensors."""

    def encode_condition(self, image, frames: int) -> dict:
        """Return the sampling conditioning for a [1, 3, 1, H, W] image and a video of `frames` frames."""

    def decode(self, latents) -> Any:
        """Return pixels [B, 3, F, H, W] in [-1, 1] from normalized latents."""


class TextEncoder(Protocol):
    def encode(self, texts: Sequence[str]) -> list[dict]:
        """Return per text its embedding tensors {name: tensor}, e.g. Wan {"embedding": [L_i, D]} trimmed to
        the real token length; cache_text stores them as one entry and `Family.predict` gets them back."""


class LoraNaming(Protocol):
    """How a family's LoRA files spell its modules (torch-free); network.formats reads and writes through it.

    Canonical names are the official checkpoint's module paths (`blocks.0.self_attn.q`,
    `double_blocks.0.img_attn_qkv`).
    """

    arch: str
    save_formats: tuple[str, ...]  # the network.save_format values this family writes (network.formats.FORMATS)
    default_save_format: str  # what network.save_format null means: the layout ComfyUI and musubi-tuner load
    description: str  # the module names it reads, for error messages

    def claims(self, names) -> bool:
        """Whether these module names (dotted or underscored) are this family's."""

    def official_from_underscored(self, written: str) -> str | None:
        """`blocks_0_self_attn_q` -> `blocks.0.self_attn.q`; None when not a module of this family."""

    def official_from_diffusers(self, name: str) -> str | None:
        """A diffusers module path's official name, None when `name` is not a diffusers-only name."""

    def diffusers_file_name(self, official: str) -> str | None:
        """The module path diffusers' LoRA loader expects for an official module, None when it has none."""

    def diffusers_problems(self, modules) -> list[str]:
        """Why a LoRA on these official modules cannot be written for diffusers (empty: it can)."""

    def ignored_by(self, save_format: str, modules) -> dict[str, tuple[list[str], str]]:
        """{consumer: (the modules of a file in `save_format` it leaves unapplied, the format it loads fully)} for
        ComfyUI and musubi-tuner (its --network_weights, generate and merge read `lora_unet_` keys only); checked with
        their own code, docs/training.md's table. Empty: both apply every module."""


def required(method):
    """Mark a Family method every family must define (checked when the family's class is created)."""
    method.__required__ = True
    return method


@dataclass
class SampleRequest:
    """One prompt to denoise, as `Family.sample` gets it.

    prompt: the resolved settings (sampling/settings.py: width, height, frames, seed, steps, shift, guidance_scale,
    guidance_scale_high, strength, ...); cond: its conditioning tensors on the CPU (start image latents, embedded
    "guidance", "init_latents" for video-to-video, reference latents); positive / negative: the text embeddings of
    the prompt and the negative prompt (one dict per pass, as TextEncoder.encode made them); experts and dits (an
    ExpertDits) as loaded, LoRAs applied or not.
    """

    prompt: dict
    cond: dict
    positive: list
    negative: list
    experts: list
    dits: Any
    device: Any
    progress: bool = True


class Family:
    """One architecture family (Wan, HunyuanVideo, ...), found through models.get_family(arch).

    A family is a subclass holding its settings as class attributes and defining every `@required` method;
    a subclass that misses one fails when it is created, at import, naming what is missing. The sampling
    members (`sample`, `latent_shape`, `sampling_shift`, `guidance_style`) have defaults that serve most
    models: docs/architectures.md says when to override them.
    """

    # class attributes every family sets (checked at class creation, like the @required methods)
    REQUIRED_ATTRIBUTES = ("name", "modelspec_arch", "modelspec_implementation", "musubi_network_module", "model_keys",
                           "text_dtype_key", "lora_naming", "fp8_text_key", "fp8_layers", "supports_loraid",
                           "lora_default_excludes", "tiny_models", "block_lists")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        missing = [a for a in cls.REQUIRED_ATTRIBUTES if not hasattr(cls, a)]
        missing += [name for name, member in vars(Family).items()
                    if getattr(member, "__required__", False) and getattr(cls, name) is member]
        if missing:
            raise TypeError(f"architecture family {cls.__name__} does not define {', '.join(missing)} "
                            "(models/base.py, Family, says what each is)")

    def loraid_layout(self, model_cfg: dict) -> LoraidLayout | None:
        """How LORAID cuts this model into units; None (the default) when LORAID does not support it."""
        return None

    image_only: bool = False  # True: the model takes images only (a video dataset or frames > 1 is a config error)
    # how sampling guides: "cfg" (classifier-free with the negative prompt; guidance_scale 1 skips the negative
    # pass), or "none" for distilled models (never a negative pass); embedded guidance rides in cond["guidance"]
    guidance_style: str = "cfg"

    def latent_shape(self, model_cfg: dict, prompt: dict) -> tuple[int, ...]:
        """The shape [1, C, F, H, W] of the latents one prompt samples."""
        geometry = self.geometry(model_cfg)
        st, sh, sw = geometry.vae_stride
        return (1, geometry.latent_channels, (prompt["frames"] - 1) // st + 1, prompt["height"] // sh,
                prompt["width"] // sw)

    def sampling_shift(self, model_cfg: dict, prompt: dict, latent_shape) -> float:
        """The flow shift of the sampling schedule: the prompt's (a family whose shift depends on the image's
        token count, as FLUX and Qwen-Image do, computes it from `latent_shape`)."""
        return prompt["shift"]

    def sampling_sigmas(self, model_cfg: dict, prompt: dict) -> list[float] | None:
        """The unshifted sigmas of the prompt's steps (1 first; the shift is applied to them), or None (the default)
        for diffusers' FlowMatchEulerDiscreteScheduler spacing, from 1 to 1/1000 in `steps` points. A model whose
        reference sampler spaces its steps otherwise (Z-Image: 1 - i/steps) returns its own."""
        return None

    # musubi-tuner's scripts for this family (file names: tools from-musubi converts their command lines), the
    # flags they take beyond config/musubi_flags.COMMON ({flag: Flag}), musubi-tuner's defaults where ours differ
    # ({flag: (key, value, "train" | "latents" | "text": the kind of script whose default it is)}), and a hint
    # for each model key a converted spec may still lack ({"model.t5_tokenizer": "where it comes from"})
    musubi_scripts: tuple[str, ...] = ()
    musubi_flags: dict = {}
    musubi_defaults: dict = {}
    musubi_hints: dict = {}

    def musubi_model(self, flags: dict) -> str:
        """The model group option (`wan/t2v_14b`) a musubi-tuner command with these {flag: values} trains;
        a UserError names a task that is not built."""
        from musubi_pipe.errors import UserError

        raise UserError(f"{self.name}: musubi-tuner command lines are not converted for this model yet")

    def sample(self, model_cfg: dict, request: SampleRequest):
        """Denoise one prompt; return its latents [1, C, F, H, W] (float32, CPU). The default is the flow-matching
        Euler loop (sampling/denoise.py) with expert routing and `guidance_style`; a model that samples in
        sections (FramePack) or needs another loop overrides it."""
        from musubi_pipe.sampling.denoise import flow_match_sample

        return flow_match_sample(self, model_cfg, request)

    name: str  # full architecture name, written as ss_base_model_version
    modelspec_arch: str  # SAI ModelSpec architecture id of its LoRA files
    modelspec_implementation: str  # the upstream repository of its model code (modelspec.implementation)
    musubi_network_module: str  # musubi-tuner's LoRA network module for it (ss_network_module of LoRA files)
    # blocks_to_swap of each memory preset ("24gb", "16gb", "12gb") by model_size (memory.blocks_to_swap=preset)
    swap_presets: dict = {}
    # the DiT's lists of repeated blocks by official name prefix (tools inspect groups a LoRA's modules by them)
    block_lists: tuple[str, ...]
    # {tiny task: its model group option}: the models tests and the conformance test build and run (every task)
    tiny_models: dict
    # {old model group option: its name now}, e.g. {"wan21_t2v_14b": "wan/t2v_14b"}: accepted on the command line
    config_aliases: dict = {}
    model_keys: dict  # model.* config keys of this family beyond the common ones, with type specs
    text_dtype_key: str  # the model.* key of the text encoders' dtype (e.g. "t5_dtype")
    lora_naming: LoraNaming
    # musubi-tuner's name of memory.fp8_text_encoder for this family ("fp8_t5", "fp8_llm"), accepted as its alias
    fp8_text_key: str
    # (include, exclude) substrings of the DiT's module names whose Linears memory.fp8_base stores in fp8
    fp8_layers: tuple[tuple[str, ...], tuple[str, ...]]

    @required
    def geometry(self, model_cfg: dict) -> Geometry:
        raise NotImplementedError

    @required
    def experts(self, model_cfg: dict) -> list[Expert]:
        """The model's DiTs, highest timesteps first; one expert named "" for single-DiT models."""

    @required
    def sample_image(self, model_cfg: dict) -> str:
        """Whether sampling takes a conditioning image: "required", "optional" or "none"."""

    @required
    def sampling_defaults(self, model_cfg: dict) -> dict:
        """Defaults for sampling keys left null: steps, shift, guidance_scale, guidance_scale_high, negative_prompt,
        fps, and embedded_guidance_scale for models with embedded guidance (absent: setting it is an error)."""

    supports_loraid: bool  # whether network.loraid can allocate units of this family's models (network/loraid.py)

    @required
    def check_stages(self, model_cfg: dict, stages) -> list[tuple[str, str]]:
        """Problems with running these pipeline stages on this model (e.g. training an inference-only task)."""

    @required
    def uses_controls(self, model_cfg: dict) -> bool:
        """Whether the task trains with control media (then cache_latents encodes them as "control_latents_<i>")."""

    @required
    def check_config(self, model_cfg: dict) -> list[tuple[str, str]]:
        """Return (key, message) problems with the model config and its files; never imports torch."""

    @required
    def weight_files(self, model_cfg: dict, part: str, expert: str = "") -> list[Path]:
        """Return every file whose content determines `part` ("vae", "text", "dit" of `expert`)."""

    @required
    def encoder_identity(self, model_cfg: dict, part: str) -> dict:
        """Return the settings besides file content that determine `part`'s outputs."""

    @required
    def training_identity(self, model_cfg: dict) -> dict:
        """Return the model settings besides weights that change training (task, resolved boundary...)."""

    @required
    def load_vae(self, model_cfg: dict, device, dtype) -> VAE:
        raise NotImplementedError

    @required
    def load_text_encoder(self, model_cfg: dict, device, dtype, fp8: bool = False) -> TextEncoder:
        """The frozen text encoder(s); `fp8` stores the Linear weights of the one fp8_text_key names in fp8."""

    @required
    def load_dit(self, model_cfg: dict, device, dtype, expert: str = ""): ...

    @required
    def blocks(self, dit) -> list[Any]:
        """The DiT's repeated transformer blocks, in order (the units of FSDP sharding and block swap)."""

    @required
    def num_blocks(self, model_cfg: dict) -> int:
        """len(blocks(dit)), known without loading (memory.blocks_to_swap is checked against it)."""

    @required
    def model_size(self, model_cfg: dict) -> str:
        """The size class memory presets key their tables by: "wan_14b", "wan_1.3b", "hunyuan_video", "tiny", ..."""

    # musubi-tuner's default exclude patterns for this architecture, always appended to network.exclude_patterns
    lora_default_excludes: tuple[str, ...]

    @required
    def lora_targets(self, dit) -> dict[str, Any]:
        """Return {official module name: torch.nn.Linear} of the LoRA candidates: every Linear of the blocks
        musubi-tuner's network module wraps (lora_default_excludes and the network patterns choose among them)."""

    @required
    def training_inputs(self, model_cfg: dict, latents, noise, t, timesteps, cached: dict, generator,
                        conventions: str = "musubi") -> TrainingInputs:
        """Build one step's inputs from clean latents, noise, t [B] in [0, 1], the model timesteps [B] the loop
        computed for them (training.conventions; TrainingInputs.timesteps is usually these) and the items' cached
        extras. `conventions` ("musubi" or "exact") is for what else musubi-tuner computes its own way (e.g.
        HunyuanVideo's training guidance)."""

    @required
    def predict(self, dit, noisy_latents, timesteps, text_embeds: list, cond: dict | None = None) -> Any:
        """Run the DiT: noisy latents [B, C, F, H, W], timesteps [B] in [0, 1000], text embeddings per item
        (the dicts TextEncoder.encode made), `cond` the batched conditioning (TrainingInputs.cond, or sampling's)."""

    @required
    def dit_tensors(self, dit, expert: str = "") -> tuple[list[DitTensor], list[Path]]:
        """(every tensor of the DiT `dit` (a file, shards or folder, as model.dit takes) under its official name, the
        files read), for tools merge and the merge stage. Raises NotADit when `dit` is not this family's DiT, and
        UserError when it is but cannot be read (naming the file and the fix)."""

    @required
    def build_tiny(self, root: Path, task: str) -> dict[str, str]:
        """Write a tiny deterministic model of `task` in the formats users download; return {model key: path}."""
