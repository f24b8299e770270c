"""HunyuanVideo DiT tensors for tools merge (musubi-tuner's merge_lora.py is HunyuanVideo's), officially named.

Every form model.dit takes: Tencent's mp_rank_00_model_states.pt (DeepSpeed's {"module": ...} unwrapped), the
official download folder, bf16/fp16/fp8_e4m3fn .safetensors with official or diffusers names, a diffusers
transformer folder or pipeline root. A .pt has no header, so it is read memory-mapped (weights_only) and its
tensors are handed over as loaded; diffusers-named weights are renamed to the official layout (fused qkv
and linear1 rebuilt) by keymap.dit_to_official.
"""

from __future__ import annotations

from pathlib import Path

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.base import DitTensor, NotADit

DIT_KEY = "--dit"


def dit_tensors(dit, expert: str = "") -> tuple[list[DitTensor], list[Path]]:
    """Family.dit_tensors for HunyuanVideo (one DiT: `expert` is unused)."""
    from musubi_pipe.models.hunyuan_video.keymap import dit_to_official, strip_dit_wrappers
    from musubi_pipe.models.hunyuan_video.locate import check_dit, dit_layout, dit_signature
    from musubi_pipe.models.statedict import read_state_dict
    from musubi_pipe.network.safetensors_stream import DTYPE_CODES

    values = [dit] if not isinstance(dit, (list, tuple)) else list(dit)
    if len(values) != 1:
        raise NotADit(f"{DIT_KEY}: a HunyuanVideo DiT is one file or folder, not {len(values)} paths")
    try:
        source = check_dit(values[0], DIT_KEY)
    except ConfigError as e:
        raise NotADit("; ".join(f"{key} {message}" for key, message in e.problems)) from None
    files = list(source.files) if source.kind != "pretrained" else sorted(Path(source.path).glob("*.safetensors"))
    state = strip_dit_wrappers(read_state_dict(files, DIT_KEY))
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    if dit_layout(shapes) != "official":
        state = dit_to_official(state, dit_signature(shapes)["hidden_size"])
    code_of = {dtype: code for code, dtype in DTYPE_CODES.items()}
    tensors = [DitTensor(source.path, name, name, code_of[t.dtype], tuple(t.shape), loaded=t) for name, t in state.items()]
    return tensors, files
