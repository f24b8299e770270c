"""State-dict key maps between official HunyuanVideo names and diffusers names, for the DiT and the VAE.

    state = dit_to_diffusers(strip_dit_wrappers(torch.load("mp_rank_00_model_states.pt")), hidden_size=3072)
    official = dit_to_official(model.state_dict(), hidden_size=3072)   # exact inverse
    vae_state = vae_to_diffusers(torch.load("vae/pytorch_model.pt"))

The DiT is converted in both directions by the tables below, parametrized by the hidden size
(diffusers' own `convert_hunyuan_video_transformer_to_diffusers` hard-codes 3072, which would split
a tiny model's fused projections wrongly). Besides renames, the official DiT fuses what diffusers
keeps apart: `img_attn_qkv`, `txt_attn_qkv` and the token refiner's `self_attn_qkv` are q, k and v
stacked on the output axis; a single block's `linear1` is q, k, v and the MLP input (the rest) and
its `linear2` is diffusers' `proj_out`. The final layer's modulation `final_layer.adaLN_modulation.1`
emits (shift, scale) where diffusers' `norm_out.linear` emits (scale, shift), so its halves swap.

The VAE needs no renaming: diffusers' AutoencoderKLHunyuanVideo uses the official
AutoencoderKLCausal3D names (`encoder.down_blocks.0.resnets.0.conv1.conv.weight`, ...). The official
loader (and musubi-tuner's hunyuan_model/vae.py) accept a `{"state_dict": ...}` wrapper and `vae.`
key prefixes, keeping only the `vae.` keys when there are any; `vae_to_diffusers` does the same.

Every key must match a rule: an unknown one is a ValueError that names it. Tensors are only split
(views), concatenated or renamed; no module imports torch at import time.
"""

from __future__ import annotations

from musubi_pipe.models.statedict import compile_rules, match_rule, reverse_rules

__all__ = ["DIT_PREFIXES", "dit_to_diffusers", "dit_to_official", "strip_dit_wrappers", "vae_to_diffusers",
           "vae_to_official"]

# key prefixes ComfyUI (`model.diffusion_model.`) and some repacks (`diffusion_model.`) put before official names
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# dict keys that wrap a whole state dict: DeepSpeed's mp_rank_00_model_states.pt holds {"module": {...}}
_WRAPPERS = ("module", "model", "state_dict")

_REFINER = "txt_in.individual_token_refiner.blocks.{}"
_DIFFUSERS_REFINER = "context_embedder.token_refiner.refiner_blocks.{}"

# (diffusers template, official template): `{}` is a block index and `*` a parameter name (weight, bias)
_DIT_RULES: list[tuple[str, str]] = [
    ("x_embedder.proj.*", "img_in.proj.*"),
    ("context_embedder.proj_in.*", "txt_in.input_embedder.*"),
    ("context_embedder.time_text_embed.timestep_embedder.linear_1.*", "txt_in.t_embedder.mlp.0.*"),
    ("context_embedder.time_text_embed.timestep_embedder.linear_2.*", "txt_in.t_embedder.mlp.2.*"),
    ("context_embedder.time_text_embed.text_embedder.linear_1.*", "txt_in.c_embedder.linear_1.*"),
    ("context_embedder.time_text_embed.text_embedder.linear_2.*", "txt_in.c_embedder.linear_2.*"),
    (f"{_DIFFUSERS_REFINER}.norm1.*", f"{_REFINER}.norm1.*"),
    (f"{_DIFFUSERS_REFINER}.attn.to_out.0.*", f"{_REFINER}.self_attn_proj.*"),
    (f"{_DIFFUSERS_REFINER}.norm2.*", f"{_REFINER}.norm2.*"),
    (f"{_DIFFUSERS_REFINER}.ff.net.0.proj.*", f"{_REFINER}.mlp.fc1.*"),
    (f"{_DIFFUSERS_REFINER}.ff.net.2.*", f"{_REFINER}.mlp.fc2.*"),
    (f"{_DIFFUSERS_REFINER}.norm_out.linear.*", f"{_REFINER}.adaLN_modulation.1.*"),
    ("time_text_embed.timestep_embedder.linear_1.*", "time_in.mlp.0.*"),
    ("time_text_embed.timestep_embedder.linear_2.*", "time_in.mlp.2.*"),
    ("time_text_embed.text_embedder.linear_1.*", "vector_in.in_layer.*"),
    ("time_text_embed.text_embedder.linear_2.*", "vector_in.out_layer.*"),
    ("time_text_embed.guidance_embedder.linear_1.*", "guidance_in.mlp.0.*"),
    ("time_text_embed.guidance_embedder.linear_2.*", "guidance_in.mlp.2.*"),
    ("transformer_blocks.{}.norm1.linear.*", "double_blocks.{}.img_mod.linear.*"),
    ("transformer_blocks.{}.norm1_context.linear.*", "double_blocks.{}.txt_mod.linear.*"),
    ("transformer_blocks.{}.attn.norm_q.weight", "double_blocks.{}.img_attn_q_norm.weight"),
    ("transformer_blocks.{}.attn.norm_k.weight", "double_blocks.{}.img_attn_k_norm.weight"),
    ("transformer_blocks.{}.attn.norm_added_q.weight", "double_blocks.{}.txt_attn_q_norm.weight"),
    ("transformer_blocks.{}.attn.norm_added_k.weight", "double_blocks.{}.txt_attn_k_norm.weight"),
    ("transformer_blocks.{}.attn.to_out.0.*", "double_blocks.{}.img_attn_proj.*"),
    ("transformer_blocks.{}.attn.to_add_out.*", "double_blocks.{}.txt_attn_proj.*"),
    ("transformer_blocks.{}.ff.net.0.proj.*", "double_blocks.{}.img_mlp.fc1.*"),
    ("transformer_blocks.{}.ff.net.2.*", "double_blocks.{}.img_mlp.fc2.*"),
    ("transformer_blocks.{}.ff_context.net.0.proj.*", "double_blocks.{}.txt_mlp.fc1.*"),
    ("transformer_blocks.{}.ff_context.net.2.*", "double_blocks.{}.txt_mlp.fc2.*"),
    ("single_transformer_blocks.{}.attn.norm_q.weight", "single_blocks.{}.q_norm.weight"),
    ("single_transformer_blocks.{}.attn.norm_k.weight", "single_blocks.{}.k_norm.weight"),
    ("single_transformer_blocks.{}.norm.linear.*", "single_blocks.{}.modulation.linear.*"),
    ("single_transformer_blocks.{}.proj_out.*", "single_blocks.{}.linear2.*"),
    ("proj_out.*", "final_layer.linear.*"),
]

# (official fused template, diffusers part templates): parts are stacked in order on the output axis,
# each `hidden_size` rows except a last part that takes the rest (a single block's MLP input)
_FUSED: list[tuple[str, tuple[str, ...]]] = [
    ("double_blocks.{}.img_attn_qkv.*", tuple(f"transformer_blocks.{{}}.attn.to_{p}.*" for p in "qkv")),
    ("double_blocks.{}.txt_attn_qkv.*", tuple(f"transformer_blocks.{{}}.attn.add_{p}_proj.*" for p in "qkv")),
    (f"{_REFINER}.self_attn_qkv.*", tuple(f"{_DIFFUSERS_REFINER}.attn.to_{p}.*" for p in "qkv")),
    ("single_blocks.{}.linear1.*",
     (*(f"single_transformer_blocks.{{}}.attn.to_{p}.*" for p in "qkv"), "single_transformer_blocks.{}.proj_mlp.*")),
]
# (official, diffusers): the same tensor with its two halves swapped ((shift, scale) <-> (scale, shift))
_SWAPPED = ("final_layer.adaLN_modulation.1.*", "norm_out.linear.*")

_TO_OFFICIAL = compile_rules(_DIT_RULES)
_TO_DIFFUSERS = compile_rules(reverse_rules(_DIT_RULES))
_SWAP_TO_DIFFUSERS = compile_rules([_SWAPPED])
_SWAP_TO_OFFICIAL = compile_rules(reverse_rules([_SWAPPED]))
# per fused tensor: its official pattern with one target per part, and one rule per part back to it
_SPLIT = [compile_rules([(official, part) for part in parts]) for official, parts in _FUSED]
_JOIN = [[compile_rules([(part, official)]) for part in parts] for official, parts in _FUSED]


def _rename(key: str, rules, what: str) -> str:
    hit = match_rule(key, rules)
    if hit is None:
        raise ValueError(f"no {what} key {key!r}")
    return hit[1]


def _swap_halves(tensor):
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _split_sizes(name: str, rows: int, parts: int, hidden_size: int) -> list[int]:
    """Row counts of the `parts` stacked in fused tensor `name` (`rows` rows): hidden_size each, the last the rest."""
    rest = rows - hidden_size * (parts - 1)
    if rest <= 0 or (parts == 3 and rest != hidden_size):
        raise ValueError(f"official HunyuanVideo DiT tensor {name!r} has {rows} rows, which do not split into "
                         f"{parts} parts of hidden size {hidden_size}")
    return [hidden_size] * (parts - 1) + [rest]


def dit_to_diffusers(state: dict, hidden_size: int) -> dict:
    """Official HunyuanVideo DiT keys (no wrappers or prefixes: see `strip_dit_wrappers`) ->
    `HunyuanVideoTransformer3DModel` keys; fused projections are split into views. ValueError names
    a key no rule covers or a fused tensor that does not split by `hidden_size`."""
    out = {}
    for key, value in state.items():
        if match_rule(key, _SWAP_TO_DIFFUSERS):
            out[_rename(key, _SWAP_TO_DIFFUSERS, "")] = _swap_halves(value)
            continue
        parts = next((rules for rules in _SPLIT if match_rule(key, rules)), None)
        if parts is None:
            out[_rename(key, _TO_DIFFUSERS, "diffusers HunyuanVideo DiT name for official")] = value
            continue
        sizes = _split_sizes(key, value.shape[0], len(parts), hidden_size)
        for rule, part in zip(parts, value.split(sizes, dim=0)):
            out[_rename(key, [rule], "")] = part
    return out


def dit_to_official(state: dict, hidden_size: int) -> dict:
    """`HunyuanVideoTransformer3DModel` keys -> official HunyuanVideo DiT keys (the exact inverse of
    `dit_to_diffusers`); fused projections are concatenated. ValueError names a key no rule covers,
    a fused tensor with a part missing, or a q/k/v part that is not `hidden_size` rows."""
    import torch

    out, pending = {}, {}  # pending: (fused index, official key) -> {part index: tensor}
    for key, value in state.items():
        if match_rule(key, _SWAP_TO_OFFICIAL):
            out[_rename(key, _SWAP_TO_OFFICIAL, "")] = _swap_halves(value)
            continue
        slot = next(((f, p) for f, rules in enumerate(_JOIN) for p, rule in enumerate(rules) if match_rule(key, rule)),
                    None)
        if slot is None:
            out[_rename(key, _TO_OFFICIAL, "official HunyuanVideo DiT name for diffusers")] = value
            continue
        fused, part = slot
        pending.setdefault((fused, _rename(key, _JOIN[fused][part], "")), {})[part] = value
    for (fused, official), parts in pending.items():
        count = len(_FUSED[fused][1])
        if sorted(parts) != list(range(count)):
            raise ValueError(f"official HunyuanVideo DiT tensor {official!r} needs {count} diffusers parts, "
                             f"the state has parts {sorted(parts)}")
        if any(parts[i].shape[0] != hidden_size for i in range(3)):
            raise ValueError(f"the q/k/v parts of official {official!r} are not {hidden_size} rows (hidden size)")
        out[official] = torch.cat([parts[i] for i in range(count)], dim=0)
    return out


def _unwrap(state: dict) -> dict:
    """Descend through {"module" | "model" | "state_dict": {...}} wrappers."""
    while True:
        inner = next((state[w] for w in _WRAPPERS if isinstance(state.get(w), dict)), None)
        if inner is None:
            return state
        state = inner


def strip_dit_wrappers(state: dict) -> dict:
    """The bare official DiT state dict of a loaded file: unwrapped from DeepSpeed's {"module": ...}
    (mp_rank_00_model_states.pt) and with ComfyUI `model.diffusion_model.` / `diffusion_model.`
    prefixes dropped. The input is left as is."""
    out = {}
    for name, value in _unwrap(state).items():
        prefix = next((p for p in DIT_PREFIXES if name.startswith(p)), "")
        out[name[len(prefix):]] = value
    return out


def vae_to_diffusers(state: dict) -> dict:
    """Official HunyuanVideo VAE state (pytorch_model.pt, maybe {"state_dict": ...} and `vae.` prefixed)
    -> `AutoencoderKLHunyuanVideo` keys, which are the official names; as the official loader, only
    the `vae.` keys are kept when there are any."""
    state = _unwrap(state)
    if any(name.startswith("vae.") for name in state):
        return {name[len("vae."):]: value for name, value in state.items() if name.startswith("vae.")}
    return dict(state)


def vae_to_official(state: dict) -> dict:
    """`AutoencoderKLHunyuanVideo` keys -> official VAE keys: the same names (a copy of the dict)."""
    return dict(state)
