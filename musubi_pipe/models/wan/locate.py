"""Decide what a configured Wan DiT/VAE path is and whether it fits the task, without torch.

`locate_*` resolve a path (official file or shard set, official Wan-AI repo folder, diffusers folder,
diffusers pipeline root) into a `Source`; they are shared by the family's config checks, cache keys
(`weight_files`) and the loaders, so all three agree on which files make up a model part.
`check_dit`/`check_vae` also read the variant from safetensors headers or config.json (milliseconds
for a 28 GB checkpoint) and raise ConfigError naming the key, the file, what it is and the fix.
`.pth` files cannot be read without torch; the loaders check them with the same functions.
`EncoderSpec` holds the same locating and checking for the single-file text and image encoders
(t5.py, clip.py), and `FrozenEncoder` is the base of their loaded wrappers.

Wan2.2 A14B has two DiT experts. `expert` picks one inside a downloaded folder:

    expert        official Wan-AI repo root    diffusers pipeline root
    "high_noise"  high_noise_model/            transformer/
    "low_noise"   low_noise_model/             transformer_2/
    ""            (refused: two experts)       transformer/
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.files import (
    Source,
    existing,
    folder_files,
    read_config,
    shard_set,
    state_dict_file,
    subfolder,
)
from musubi_pipe.models.statedict import header_shapes
from musubi_pipe.models.wan.tasks import TASKS, WanTask

# the key prefixes ComfyUI (`model.diffusion_model.`) and some repacks (`diffusion_model.`) put before
# official DiT names; keymap.strip_prefix uses the same
OFFICIAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

_DIT_HINTS = {
    "": (
        "a Wan DiT .safetensors/.pth file (e.g. ComfyUI wan2.1_t2v_1.3B_bf16.safetensors), an official Wan-AI "
        "model folder, a diffusers transformer folder or a diffusers pipeline folder"
    ),
    "high_noise": (
        "the Wan2.2 high-noise expert: a file such as ComfyUI wan2.2_t2v_high_noise_14B_fp16.safetensors, the "
        "high_noise_model/ folder (or the root) of a Wan-AI/Wan2.2-*-A14B download, or a Wan2.2 A14B diffusers "
        "pipeline folder (its transformer/)"
    ),
    "low_noise": (
        "the Wan2.2 low-noise expert: a file such as ComfyUI wan2.2_t2v_low_noise_14B_fp16.safetensors, the "
        "low_noise_model/ folder (or the root) of a Wan-AI/Wan2.2-*-A14B download, or a Wan2.2 A14B diffusers "
        "pipeline folder (its transformer_2/)"
    ),
}
# (official Wan-AI repo subfolder, diffusers pipeline subfolder) of each expert
_EXPERT_FOLDERS = {"": (None, "transformer"), "high_noise": ("high_noise_model", "transformer"),
                   "low_noise": ("low_noise_model", "transformer_2")}

# what each VAE version is called where users download it
_VAE_FILES = {
    "2.1": "Wan2.1_VAE.pth / wan_2.1_vae.safetensors",
    "2.2": "Wan2.2_VAE.pth / wan2.2_vae.safetensors",
}
_VAE_Z_DIM = {16: "2.1", 48: "2.2"}  # latent channels -> VAE version
_VAE_HINT = (
    f"{_VAE_FILES['2.1']} (Wan2.1 and Wan2.2 A14B tasks), {_VAE_FILES['2.2']} (ti2v-5B), "
    "a diffusers AutoencoderKLWan folder or a diffusers pipeline folder"
)
# official Wan-AI repo roots hold the VAE as one of these files
_OFFICIAL_VAE_NAMES = ("Wan2.1_VAE.pth", "Wan2.2_VAE.pth")

# diffusers WanTransformer3DModel / AutoencoderKLWan constructor defaults, for configs that omit a key
_DIT_CONFIG_DEFAULTS = {"num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16,
                        "ffn_dim": 13824, "num_layers": 40}
_VAE_CONFIG_DEFAULTS = {"z_dim": 16, "base_dim": 96}


# --- locating -------------------------------------------------------------------------------------


def _dit_folder(path: Path, key: str, expert: str) -> Path:
    """Return the folder inside `path` that holds the DiT `expert` (`path` itself when it is that folder)."""
    official, pipeline = _EXPERT_FOLDERS[expert]
    if official and (path / official).is_dir():
        return path / official
    if (path / "transformer").is_dir():  # a diffusers pipeline root
        if not (path / pipeline).is_dir():
            message = (
                f"{path} is a diffusers pipeline folder with no {pipeline}/ (one DiT, not a Wan2.2 A14B pipeline); "
                f"set {key}=<{_DIT_HINTS[expert]}>"
            )
            raise ConfigError([(key, message)])
        return path / pipeline
    if not expert and (path / "high_noise_model").is_dir() and (path / "low_noise_model").is_dir():
        message = (
            f"{path} holds the two Wan2.2 A14B experts (high_noise_model/ and low_noise_model/) but this task has "
            f"one DiT; use model.task=t2v-A14B or i2v-A14B (model.dit = low_noise_model, model.dit_high_noise = "
            f"high_noise_model) or set {key}=<{_DIT_HINTS['']}>"
        )
        raise ConfigError([(key, message)])
    return path


def locate_dit(value, key: str = "model.dit", expert: str = "") -> Source:
    """Resolve a DiT path: an official file or shard set, an official Wan-AI folder (`config.json` of class
    WanModel + official-key shards), a diffusers transformer folder or a pipeline root; see the module doc
    for how `expert` ("", "high_noise", "low_noise") picks inside downloaded folders."""
    hint = _DIT_HINTS[expert]
    path = existing(value, key, hint)
    if path.is_file():
        return Source("official", path, shard_set(state_dict_file(path, key, hint), key))
    folder = _dit_folder(path, key, expert)
    config = folder / "config.json"
    weights = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not config.is_file() or not weights:
        message = f"{folder} needs config.json and diffusion_pytorch_model*.safetensors; set {key}=<{hint}>"
        raise ConfigError([(key, message)])
    # The official Wan-AI repos ship official-key safetensors next to a config.json of class "WanModel".
    if read_config(folder, key).get("_class_name") != "WanTransformer3DModel":
        files = tuple(sorted({shard for w in weights for shard in shard_set(w, key)}))
        return Source("official", folder, files)
    return Source("pretrained", folder, folder_files(folder))


def locate_vae(value, key: str = "model.vae") -> Source:
    """Resolve a VAE path: an official Wan VAE file, a diffusers VAE folder, a pipeline root, or an
    official Wan-AI repo root holding Wan2.1_VAE.pth / Wan2.2_VAE.pth."""
    path = existing(value, key, _VAE_HINT)
    if path.is_file():
        return Source("official", path, (state_dict_file(path, key, _VAE_HINT),))
    folder = subfolder(path, "vae")
    if not (folder / "config.json").is_file():
        official = [folder / name for name in _OFFICIAL_VAE_NAMES if (folder / name).is_file()]
        if len(official) == 1:
            return Source("official", official[0], (official[0],))
        raise ConfigError([(key, f"{folder} has no config.json; set {key}=<{_VAE_HINT}>")])
    return Source("pretrained", folder, folder_files(folder))


def check_source(source: Source, task: WanTask, key: str, from_config, from_shapes, check,
                 fix: str = "re-download it") -> Source:
    """Check a located model part against `task` without torch and return `source`.

    Calls `check(found, task, source.path, key)` with found = `from_config(config.json)` for a
    pretrained folder, else `from_shapes({name: shape})` from the safetensors headers (ConfigError
    ending in `fix` if they are unreadable). .pt/.pth files are left to the loaders.
    """
    if source.kind == "pretrained":
        found = from_config(read_config(source.path, key))
    else:
        shapes = header_shapes(source.files, key, fix)
        if shapes is None:
            return source
        found = from_shapes(shapes)
    check(found, task, source.path, key)
    return source


# --- the DiT variant ------------------------------------------------------------------------------


def strip_dit_prefix(shapes: dict) -> dict:
    """Drop a ComfyUI-style `model.diffusion_model.` / `diffusion_model.` prefix from each key."""
    out = {}
    for name, value in shapes.items():
        prefix = next((p for p in OFFICIAL_PREFIXES if name.startswith(p)), "")
        out[name[len(prefix):]] = value
    return out


def is_fp8_scaled(names) -> bool:
    """True for a ComfyUI "fp8_scaled" checkpoint (a `scaled_fp8` marker or per-layer `.scale_weight` tensors)."""
    return any(n == "scaled_fp8" or n.endswith((".scaled_fp8", ".scale_weight")) for n in names)


def reject_fp8_scaled(names, path: Path, key: str) -> None:
    """Raise ConfigError on `key` when `names` (tensor names of a DiT file) are a ComfyUI fp8_scaled file."""
    if is_fp8_scaled(names):
        raise ConfigError([(key, (
            f"{path} is a ComfyUI fp8_scaled checkpoint (scaled_fp8 / .scale_weight tensors), which is not "
            f"supported; point {key} at the bf16/fp16 file or a plain fp8_e4m3fn file (e.g. *_fp8_e4m3fn.safetensors)"
        ))])


def dit_file_signature(shapes: dict[str, tuple[int, ...]], path: Path, key: str) -> dict[str, int] | None:
    """`dit_signature_from_shapes` of a DiT file's tensors (ComfyUI prefixes allowed); fp8_scaled files are refused."""
    shapes = strip_dit_prefix(shapes)
    reject_fp8_scaled(shapes, path, key)
    return dit_signature_from_shapes(shapes)


def dit_signature_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, int] | None:
    """The `WanTask.dit_signature()` facts of official DiT tensors {name: shape}; None if not a Wan DiT."""
    needed = ("head.modulation", "patch_embedding.weight", "blocks.0.ffn.0.weight")
    if not all(name in shapes for name in needed):
        return None
    dim, in_channels = shapes["patch_embedding.weight"][:2]
    return {
        "dim": dim,
        "layers": len({name.split(".")[1] for name in shapes if name.startswith("blocks.")}),
        "in_channels": in_channels,
        "ffn_dim": shapes["blocks.0.ffn.0.weight"][0],
        # Wan2.1 I2V projects CLIP tokens with img_emb; Wan2.2 I2V-A14B has no such tensors
        "image_dim": shapes["img_emb.proj.0.weight"][0] if "img_emb.proj.0.weight" in shapes else 0,
    }


def dit_signature_from_config(config: dict) -> dict[str, int] | None:
    """The signature facts of a diffusers `WanTransformer3DModel` config.json; None for another class."""
    if config.get("_class_name") != "WanTransformer3DModel":
        return None
    c = {**_DIT_CONFIG_DEFAULTS, **config}
    return {
        "dim": c["num_attention_heads"] * c["attention_head_dim"],
        "layers": c["num_layers"],
        "in_channels": c["in_channels"],
        "ffn_dim": c["ffn_dim"],
        "image_dim": c.get("image_dim") or 0,
    }


def describe_dit(sig: dict[str, int]) -> str:
    text = f"dim {sig['dim']}, {sig['layers']} layers, in_channels {sig['in_channels']}, ffn {sig['ffn_dim']}"
    return text + (f", CLIP image_dim {sig['image_dim']}" if sig["image_dim"] else "")


def dit_variants(sig: dict[str, int]) -> list[str]:
    """Names of every task whose DiT has signature `sig` (e.g. ["t2v-14B", "t2v-A14B"])."""
    return [name for name, task in TASKS.items() if task.dit_signature() == sig]


def check_dit_signature(found: dict[str, int] | None, task: WanTask, path: Path, key: str) -> None:
    """Raise ConfigError on `key` naming the detected variant(s) when `found` does not fit `task`.

    `found` None means the file is not a Wan DiT at all.
    """
    if found is None:
        message = (
            f"{path} is not a Wan DiT checkpoint (no head.modulation / patch_embedding / blocks.0.ffn tensors); "
            f"point {key} at a DiT of {task.name}"
        )
        raise ConfigError([(key, message)])
    expected = task.dit_signature()
    if found == expected:
        return
    detected = dit_variants(found)
    what = f"a DiT of {' or '.join(detected)}" if detected else "a Wan DiT of no supported task"
    note = ""
    if found["image_dim"] != expected["image_dim"] and found["in_channels"] == expected["in_channels"]:
        note = (
            "; the file has img_emb CLIP image tensors, which only Wan2.1 I2V DiTs have" if found["image_dim"]
            else "; the file has no img_emb CLIP image tensors, which Wan2.1 I2V DiTs have (Wan2.2 I2V-A14B ones do not)"
        )
    fix = f"point {key} at a DiT of {task.name}"
    if len(detected) == 1:
        fix += f" or set model.task={detected[0]}"
    elif detected:
        fix += f" or set model.task to one of {', '.join(detected)}"
    message = (f"{path} is {what} ({describe_dit(found)}) but model.task={task.name} needs "
               f"{describe_dit(expected)}{note}; {fix}")
    raise ConfigError([(key, message)])


def check_dit(value, task: WanTask, key: str = "model.dit", expert: str = "") -> Source:
    """Locate the DiT and check from headers/config.json that it fits `task` (.pth files: loader checks).

    Also rejects ComfyUI fp8_scaled files. Returns the Source.
    """
    source = locate_dit(value, key, expert)
    return check_source(source, task, key, dit_signature_from_config,
                        lambda shapes: dit_file_signature(shapes, source.path, key), check_dit_signature)


# --- the VAE variant ------------------------------------------------------------------------------


def vae_variant_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, int] | None:
    """{"z_dim", "base_dim"} of official Wan VAE tensors {name: shape}; None if not a Wan VAE."""
    if "conv2.weight" not in shapes or "encoder.conv1.weight" not in shapes or "decoder.head.2.weight" not in shapes:
        return None
    return {"z_dim": shapes["conv2.weight"][0], "base_dim": shapes["encoder.conv1.weight"][0]}


def vae_variant_from_config(config: dict) -> dict[str, int] | None:
    """{"z_dim", "base_dim"} of a diffusers `AutoencoderKLWan` config.json; None for another class."""
    if config.get("_class_name") != "AutoencoderKLWan":
        return None
    c = {**_VAE_CONFIG_DEFAULTS, **config}
    return {"z_dim": c["z_dim"], "base_dim": c["base_dim"]}


def _vae_name(version: str | None, z_dim: int) -> str:
    return f"the Wan{version} VAE ({z_dim} latent channels)" if version else f"a Wan VAE with {z_dim} latent channels"


def check_vae_variant(found: dict[str, int] | None, task: WanTask, path: Path, key: str) -> None:
    """Raise ConfigError on `key` when the VAE `found` ({"z_dim", "base_dim"}; None = not a Wan VAE) does
    not fit `task`: Wan2.1 (16 channels) vs Wan2.2 (48, TI2V-5B only), then the width (tiny vs real)."""
    if found is None:
        message = (
            f"{path} is not a Wan VAE (no conv2 / encoder.conv1 / decoder.head tensors); point {key} at "
            f"{_VAE_FILES[task.vae_version]}"
        )
        raise ConfigError([(key, message)])
    want = {**_VAE_CONFIG_DEFAULTS, **task.vae_config}
    version, wanted_version = _VAE_Z_DIM.get(found["z_dim"]), task.vae_version
    needs = f"the Wan{wanted_version} VAE ({_VAE_FILES[wanted_version]})"
    if found["z_dim"] != want["z_dim"]:
        raise ConfigError([(key, (
            f"{path} is {_vae_name(version, found['z_dim'])} but model.task={task.name} needs {needs}; "
            f"point {key} at it"
        ))])
    if found["base_dim"] != want["base_dim"]:
        tiny = " (a tiny test VAE)" if found["base_dim"] < 32 else ""
        raise ConfigError([(key, (
            f"{path} is a Wan{version} VAE {found['base_dim']} channels wide{tiny} but model.task={task.name} "
            f"needs {want['base_dim']}; point {key} at {needs}"
        ))])


def check_vae(value, task: WanTask, key: str = "model.vae") -> Source:
    """Locate the VAE and check from headers/config.json that it is the one `task` needs (.pth: loader checks)."""
    return check_source(locate_vae(value, key), task, key, vae_variant_from_config, vae_variant_from_shapes,
                        check_vae_variant)


# --- single-file encoders (t5.py, clip.py) --------------------------------------------------------


@dataclass(frozen=True)
class EncoderSpec:
    """How a Wan text or image encoder is located and checked against a task's config (torch-free).

    The task's config (`WanTask.<task_config>`) fixes a width (`width`, called `width_label` in messages)
    and a layer count (`layers`). A state-dict file shows them as axis `axis` of the first of `tensors`
    it has and the number of distinct block indices `blocks` matches (both per layout, see t5.py).
    """

    name: str  # "UMT5": a "UMT5 encoder" with a "UMT5 config.json"
    hint: str  # what to set the key to
    official_file: str  # the official .pth, also found in the root of an official Wan-AI download
    subfolder: str  # the part's folder in a diffusers pipeline root
    task_config: str  # the WanTask attribute holding the expected config
    width: str
    width_label: str
    layers: str
    signatures: dict[str, tuple[tuple[str, ...], int, re.Pattern]]  # layout -> (tensors, axis, blocks)
    mismatch_fix: str  # the fix of a signature mismatch; formatted with key and hint

    def locate(self, value, key: str, layout) -> Source:
        """A Source for `value`: a state-dict file of kind `layout(names, path, key)` ("official" for a .pth),
        the official file in a Wan-AI download root, or a pretrained folder (or pipeline root) with a config.json
        holding width and layers. ConfigError on `key` otherwise."""
        path = existing(value, key, self.hint)
        if path.is_dir():
            return self._locate_folder(path, key)
        state_dict_file(path, key, self.hint)
        shapes = header_shapes([path], key, f"set {key}=<{self.hint}>")
        kind = "official" if shapes is None else layout(shapes, path, key)
        return Source(kind, path, (path,))

    def _locate_folder(self, path: Path, key: str) -> Source:
        folder = subfolder(path, self.subfolder)
        if (folder / self.official_file).is_file():  # the root of an official Wan-AI download
            return Source("official", folder / self.official_file, (folder / self.official_file,))
        if not {self.width, self.layers} <= read_config(folder, key).keys():
            message = (f"{folder} has no {self.name} config.json (with {self.width} and {self.layers}); "
                       f"set {key}=<{self.hint}>")
            raise ConfigError([(key, message)])
        return Source("pretrained", folder, folder_files(folder))

    def check(self, source: Source, task: WanTask, key: str) -> Source:
        """Check a located encoder against `task` from its config.json or safetensors headers (.pth: loader)."""
        return check_source(source, task, key, lambda config: {n: config[n] for n in (self.width, self.layers)},
                            lambda shapes: self.signature(shapes, source.kind), self.check_signature,
                            f"set {key}=<{self.hint}>")

    def signature(self, shapes: dict, kind: str) -> dict[str, int]:
        """{width: ..., layers: ...} of a state dict {name: shape} of layout `kind`."""
        tensors, axis, blocks = self.signatures[kind]
        width = next((tuple(shapes[name])[axis] for name in tensors if name in shapes), None)
        return {self.width: width, self.layers: len({m[1] for name in shapes if (m := blocks.match(name))})}

    def check_signature(self, found: dict, task: WanTask, path: Path, key: str) -> None:
        """ConfigError on `key` naming both signatures when `found` is not the task's."""
        config = getattr(task, self.task_config)
        expected = {name: config[name] for name in (self.width, self.layers)}
        if found != expected:
            raise ConfigError([(key, (
                f"{path} is a {self.name} encoder with {self._describe(found)}, but model.task={task.name} "
                f"expects {self._describe(expected)}; {self.mismatch_fix.format(key=key, hint=self.hint)}"
            ))])

    def _describe(self, signature: dict) -> str:
        return f"{self.width_label} {signature[self.width]} and {signature[self.layers]} layers"


class FrozenEncoder:
    """Base of the loaded encoders (t5.WanTextEncoder, clip.WanCLIP): the wrapped `model`, its dtype and device."""

    def __init__(self, model):
        self.model = model

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def device(self):
        return self.model.device
