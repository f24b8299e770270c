"""`musubi_pipe.network.merge` and the `merge` tool on tiny Wan DiTs: merged values (LoRA, LoHa, LoKr, two LoRAs with
multipliers), parity with hooked LoRAs through our loader, every DiT layout (official, ComfyUI prefix, fp8, Wan2.2
experts, Wan-AI folders, diffusers folders), errors, streaming (one tensor alive at a time), atomic writes, the CLI.
CPU only, tiny weights."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from musubi_pipe.errors import UserError
from musubi_pipe.models import get_family
from musubi_pipe.models.wan import tiny
from musubi_pipe.network import merge
from musubi_pipe.network.lora import LoRANetwork
from musubi_pipe.network.lora_file import save_lora_file
from musubi_pipe.network.lycoris import LoHaNetwork, LoKrNetwork
from musubi_pipe.tools import merge as merge_tool

ROOT = Path(__file__).parents[1]
FAMILY = get_family("wan")
EXPERT_KEYS = {"": "dit", "high_noise": "dit_high_noise", "low_noise": "dit"}


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict:
    """Tiny models: tiny-t2v (official file), tiny-t2v-A14B (ComfyUI fp16 + fp8 experts), tiny-i2v-A14B (Wan-AI
    repo folders) and tiny-t2v as a diffusers pipeline folder."""
    root = tmp_path_factory.mktemp("merge_models")
    paths = {name: FAMILY.build_tiny(root, name) for name in ("tiny-t2v", "tiny-t2v-A14B", "tiny-i2v-A14B")}
    paths["diffusers"] = tiny.save_tiny_diffusers(root / "diffusers", "tiny-t2v")
    return paths


def load_dit(path, task: str = "tiny-t2v", expert: str = ""):
    return FAMILY.load_dit({"arch": "wan", "task": task, EXPERT_KEYS[expert]: str(path)}, "cpu", torch.float32,
                           expert)


def make_lora(dit, path: Path, seed: int, multiplier: float = 1.0, network_class=LoRANetwork, targets=None,
              **kwargs) -> LoRANetwork:
    """A network on `dit` (or `targets`) with random nonzero weights everywhere, saved to `path`."""
    torch.manual_seed(seed)
    network = network_class(targets or FAMILY.lora_targets(dit), 4, 2.0, multiplier, **kwargs)
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(0, 0.2)
    save_lora_file(path, network.lora_state_dict(), {"ss_network_module": "networks.lora_wan"})
    return network


def predict(dit) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    latents, embeds = torch.randn(1, 16, 2, 4, 4, generator=g), [{"embedding": torch.randn(5, 32, generator=g)}]
    return FAMILY.predict(dit, latents, torch.tensor([500.0]), embeds)


def expected_state(base: dict, networks) -> dict:
    """base + Σ multiplier·ΔW (float32) for the networks' modules; other tensors unchanged."""
    out = {k: v.float() for k, v in base.items()}
    for network in networks:
        for official in network.official_names:
            module = network.loras[network.prefix + "_" + official.replace(".", "_")]
            out[f"{official}.weight"] = out[f"{official}.weight"] + module.delta_weight() * module.multiplier
    return out


@pytest.fixture(scope="session")
def two_loras(built, tmp_path_factory):
    """Two LoRAs (0.5 and 1.0) on tiny-t2v, merged into the official file: (networks, merged path)."""
    folder = tmp_path_factory.mktemp("two_loras")
    dit = load_dit(built["tiny-t2v"]["dit"])
    networks = [make_lora(dit, folder / "a.safetensors", 1, 0.5), make_lora(dit, folder / "b.safetensors", 2, 1.0)]
    out = folder / "merged.safetensors"
    merge.merge_loras(built["tiny-t2v"]["dit"], [(folder / "a.safetensors", 0.5), (folder / "b.safetensors", 1.0)], out)
    return networks, out


# --- values ----------------------------------------------------------------------------------------------------------


def test_merged_tensors_are_base_plus_deltas(built, two_loras):
    networks, out = two_loras
    base, merged = load_file(built["tiny-t2v"]["dit"]), load_file(out)
    expected = expected_state(base, networks)
    targeted = {f"{o}.weight" for o in networks[0].official_names}
    assert merged.keys() == base.keys() and len(targeted) == 20
    for key, value in merged.items():
        assert value.dtype == base[key].dtype
        if key in targeted:
            assert not torch.equal(value, base[key])
            torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(value, base[key]), key
    with safe_open(str(out), "pt") as f:
        record = json.loads(f.metadata()["ss_merged_loras"])
    assert [(r["file"], r["multiplier"]) for r in record] == [("a.safetensors", 0.5), ("b.safetensors", 1.0)]
    with safe_open(str(out.parent / "a.safetensors"), "pt") as f:
        assert record[0]["sshs_model_hash"] == f.metadata()["sshs_model_hash"]


def test_merged_file_loads_and_predicts_like_hooked_loras(built, two_loras):
    networks, out = two_loras
    dit = load_dit(built["tiny-t2v"]["dit"])
    hooked = [LoRANetwork(FAMILY.lora_targets(dit), 4, 2.0, n.loras[next(iter(n.loras))].multiplier) for n in networks]
    for network, source in zip(hooked, networks):
        network.load_lora_state_dict(source.lora_state_dict())
        network.apply_to()
    with torch.no_grad():
        reference = predict(dit)
        merged = predict(load_dit(out))
        base = predict(load_dit(built["tiny-t2v"]["dit"]))
    assert not torch.allclose(reference, base, atol=1e-3)  # the LoRAs do change the output
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("network_class, kwargs", [(LoHaNetwork, {}), (LoKrNetwork, {"factor": 4}),
                                                   (LoKrNetwork, {"factor": -1})], ids=["loha", "lokr", "lokr-full-w2"])
def test_loha_and_lokr_use_their_delta_formulas(built, tmp_path, network_class, kwargs):
    dit = load_dit(built["tiny-t2v"]["dit"])
    targets = {k: v for k, v in FAMILY.lora_targets(dit).items() if k.startswith("blocks.1.")}
    network = make_lora(dit, tmp_path / "l.safetensors", 5, 0.7, network_class, targets, **kwargs)
    merge.merge_loras(built["tiny-t2v"]["dit"], [(tmp_path / "l.safetensors", 0.7)], tmp_path / "out.safetensors")
    merged, expected = load_file(tmp_path / "out.safetensors"), expected_state(load_file(built["tiny-t2v"]["dit"]), [network])
    for key, value in merged.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-5)


def test_include_and_exclude_select_modules(built, two_loras, tmp_path):
    lora = two_loras[1].parent / "b.safetensors"
    out = tmp_path / "out.safetensors"
    report = merge.merge_loras(built["tiny-t2v"]["dit"], [(lora, 1.0)], out, include=[r"blocks\.0\..*"],
                               exclude=[r".*\.ffn\..*"])
    assert report["loras"][0]["modules"] == 8
    base, merged = load_file(built["tiny-t2v"]["dit"]), load_file(out)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == {f"blocks.0.{a}_attn.{p}.weight" for a in ("self", "cross") for p in "qkvo"}
    with pytest.raises(UserError, match=r"--exclude .*9.* matches no module of .*b\.safetensors"):
        merge.merge_loras(built["tiny-t2v"]["dit"], [(lora, 1.0)], out, exclude=[r"blocks\.9\..*"])
    with pytest.raises(UserError, match="leave none"):
        merge.merge_loras(built["tiny-t2v"]["dit"], [(lora, 1.0)], out, exclude=[".*"])


def test_dtype_casts_every_float_tensor(built, two_loras, tmp_path):
    lora = two_loras[1].parent / "a.safetensors"
    merge.merge_loras(built["tiny-t2v"]["dit"], [(lora, 1.0)], tmp_path / "bf16.safetensors", dtype="bfloat16")
    merged, reference = load_file(tmp_path / "bf16.safetensors"), load_file(two_loras[1])
    assert {v.dtype for v in merged.values()} == {torch.bfloat16}
    assert torch.equal(merged["head.modulation"], reference["head.modulation"].to(torch.bfloat16))


@pytest.mark.parametrize("layout", ["comfy", "diffusers"])
def test_lora_files_of_other_layouts_merge_the_same(built, two_loras, tmp_path, layout):
    formats = pytest.importorskip("musubi_pipe.network.formats")
    musubi_file = two_loras[1].parent / "a.safetensors"
    formats.convert_file(musubi_file, tmp_path / "converted.safetensors", layout)
    merge.merge_loras(built["tiny-t2v"]["dit"], [(musubi_file, 0.5)], tmp_path / "musubi.safetensors")
    merge.merge_loras(built["tiny-t2v"]["dit"], [(tmp_path / "converted.safetensors", 0.5)], tmp_path / "other.safetensors")
    reference, merged = load_file(tmp_path / "musubi.safetensors"), load_file(tmp_path / "other.safetensors")
    assert reference.keys() == merged.keys()
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], rtol=1e-6, atol=1e-6)


# --- layouts ---------------------------------------------------------------------------------------------------------


def test_comfy_prefixed_input_merges_the_same(built, two_loras, tmp_path):
    comfy = tmp_path / "wan_comfy.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in load_file(built["tiny-t2v"]["dit"]).items()}, comfy)
    folder = two_loras[1].parent
    out = tmp_path / "out.safetensors"
    merge.merge_loras(comfy, [(folder / "a.safetensors", 0.5), (folder / "b.safetensors", 1.0)], out)
    assert_same_file_tensors(out, two_loras[1])


def test_diffusers_folder_merges_like_the_official_file(built, two_loras, tmp_path):
    folder = two_loras[1].parent
    out = tmp_path / "out.safetensors"
    merge.merge_loras(built["diffusers"]["dit"], [(folder / "a.safetensors", 0.5), (folder / "b.safetensors", 1.0)], out)
    assert_same_file_tensors(out, two_loras[1])


def assert_same_file_tensors(a: Path, b: Path) -> None:
    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.mark.parametrize("expert", ["high_noise", "low_noise"])
def test_wan22_expert_files_merge_and_load(built, tmp_path, expert):
    paths = built["tiny-t2v-A14B"]
    source = paths[EXPERT_KEYS[expert]]  # high: ComfyUI fp16, low: ComfyUI fp8_e4m3fn
    dit = load_dit(source, "tiny-t2v-A14B", expert)
    network = make_lora(dit, tmp_path / "l.safetensors", 7, 0.8)
    out = tmp_path / f"{expert}.safetensors"
    merge.merge_loras(source, [(tmp_path / "l.safetensors", 0.8)], out, dtype="float32")
    network.apply_to()
    with torch.no_grad():
        reference = predict(dit)
        merged = predict(load_dit(out, "tiny-t2v-A14B", expert))
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-4)
    with safe_open(str(out), "pt") as f:
        assert "blocks.0.self_attn.q.weight" in f.keys()  # official names, prefix stripped


def test_fp8_is_upcast_to_the_files_other_dtype(built, tmp_path):
    source = built["tiny-t2v-A14B"]["dit"]
    make_lora(load_dit(source, "tiny-t2v-A14B", "low_noise"), tmp_path / "l.safetensors", 8)
    merge.merge_loras(source, [(tmp_path / "l.safetensors", 1.0)], tmp_path / "out.safetensors")
    base, merged = load_file(source), load_file(tmp_path / "out.safetensors")
    assert any(v.dtype == torch.float8_e4m3fn for v in base.values())
    assert {v.dtype for v in merged.values()} == {torch.float16}
    key = "blocks.0.norm3.weight"  # untouched, fp16 in and out
    assert torch.equal(merged[key], base["model.diffusion_model." + key])


def test_wan_ai_repo_folders(built, tmp_path):
    repo = Path(built["tiny-i2v-A14B"]["dit"]).parent
    high = repo / "high_noise_model"
    make_lora(load_dit(high, "tiny-i2v-A14B", "high_noise"), tmp_path / "l.safetensors", 9)
    lora = [(tmp_path / "l.safetensors", 1.0)]
    merge.merge_loras(high, lora, tmp_path / "a.safetensors")
    merge.merge_loras(repo, lora, tmp_path / "b.safetensors", expert="high_noise")
    assert_same_file_tensors(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    merge.merge_loras(sorted(high.glob("*.safetensors")), lora, tmp_path / "c.safetensors")  # every shard named
    assert_same_file_tensors(tmp_path / "a.safetensors", tmp_path / "c.safetensors")
    with pytest.raises(UserError, match="high_noise_model"):
        merge.merge_loras(repo, lora, tmp_path / "d.safetensors")


# --- errors ----------------------------------------------------------------------------------------------------------


def test_lora_of_another_width_names_the_shapes(built, tmp_path):
    wide = {"blocks.0.self_attn.q": torch.nn.Linear(256, 256), "blocks.0.ffn.0": torch.nn.Linear(256, 512)}
    make_lora(None, tmp_path / "wide.safetensors", 1, targets=wide)
    with pytest.raises(UserError) as e:
        merge.merge_loras(built["tiny-t2v"]["dit"], [(tmp_path / "wide.safetensors", 1.0)], tmp_path / "o.safetensors")
    message = str(e.value)
    assert "wide.safetensors" in message and "blocks.0.self_attn.q" in message
    assert "[256, 256]" in message and "[128, 128]" in message and "14B LoRA on the 1.3B model" in message
    assert not (tmp_path / "o.safetensors").exists()


def test_lora_module_missing_from_the_dit_is_named(built, tmp_path):
    make_lora(None, tmp_path / "deep.safetensors", 1, targets={"blocks.7.self_attn.q": torch.nn.Linear(128, 128)})
    with pytest.raises(UserError, match=r"deep\.safetensors: 1 module\(s\) match no 2-D weight.*lora_unet_blocks_7"):
        merge.merge_loras(built["tiny-t2v"]["dit"], [(tmp_path / "deep.safetensors", 1.0)], tmp_path / "o.safetensors")


def test_bad_inputs_are_user_errors(built, two_loras, tmp_path):
    dit, lora = built["tiny-t2v"]["dit"], [(two_loras[1].parent / "a.safetensors", 1.0)]
    with pytest.raises(UserError, match="does not exist"):
        merge.merge_loras(tmp_path / "missing.safetensors", lora, tmp_path / "o.safetensors")
    with pytest.raises(UserError, match="must end in .safetensors"):
        merge.merge_loras(dit, lora, tmp_path / "o.ckpt")
    with pytest.raises(UserError, match="one of the DiT files"):
        merge.merge_loras(dit, lora, dit)
    with pytest.raises(UserError, match="--dtype"):
        merge.merge_loras(dit, lora, tmp_path / "o.safetensors", dtype="int8")
    with pytest.raises(UserError, match=r"wan_tiny_dit\.safetensors"):  # not a LoRA
        merge.merge_loras(dit, [(dit, 1.0)], tmp_path / "o.safetensors")


def test_a_failed_merge_leaves_no_file(built, two_loras, tmp_path, monkeypatch):
    def fail(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(merge, "add_delta", fail)
    with pytest.raises(RuntimeError, match="boom"):
        merge.merge_loras(built["tiny-t2v"]["dit"], [(two_loras[1].parent / "a.safetensors", 1.0)],
                          tmp_path / "o.safetensors")
    assert list(tmp_path.iterdir()) == []


# --- streaming -------------------------------------------------------------------------------------------------------


class TensorSpy:
    """Wraps safe_open: counts get_tensor calls and the most tensors it returned that were alive at once."""

    def __init__(self, real):
        self.real, self.calls, self.alive, self.peak = real, 0, 0, 0

    def __call__(self, *args, **kwargs):
        spy, handle = self, self.real(*args, **kwargs)

        class Handle:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def get_tensor(self, key):
                tensor = handle.get_tensor(key)
                spy.calls, spy.alive = spy.calls + 1, spy.alive + 1
                spy.peak = max(spy.peak, spy.alive)
                weakref.finalize(tensor, spy.released)
                return tensor

            def __getattr__(self, name):
                return getattr(handle, name)

        return Handle()

    def released(self):
        self.alive -= 1


def test_merge_streams_one_tensor_at_a_time(built, two_loras, tmp_path, monkeypatch):
    spy = TensorSpy(safe_open)
    monkeypatch.setattr(merge, "safe_open", spy)
    for name in ("load_file", "load"):  # the whole-file readers must not be used
        monkeypatch.setattr(safetensors.torch, name, lambda *a, **k: pytest.fail("read the whole DiT at once"))
    folder = two_loras[1].parent
    merge.merge_loras(built["tiny-t2v"]["dit"], [(folder / "a.safetensors", 0.5), (folder / "b.safetensors", 1.0)],
                      tmp_path / "out.safetensors")
    assert spy.calls == len(load_file_keys(built["tiny-t2v"]["dit"]))
    assert spy.peak == 1
    assert_same_file_tensors(tmp_path / "out.safetensors", two_loras[1])


def load_file_keys(path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_written_header_is_aligned_and_ordered(two_loras):
    raw = two_loras[1].read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    assert length % 8 == 0
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - length
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


# --- command line ----------------------------------------------------------------------------------------------------


def test_cli_merges_and_reports(built, two_loras, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    merge_tool.add_arguments(parser)
    folder = two_loras[1].parent
    out = tmp_path / "cli.safetensors"
    args = parser.parse_args(["--dit", built["tiny-t2v"]["dit"], "--lora", f"{folder / 'a.safetensors'}:0.5",
                              "--lora", str(folder / "b.safetensors"), "--output", str(out)])
    assert merge_tool.main(args) == 0
    printed = capsys.readouterr().out
    assert "merged 20 lora modules x 0.5 from" in printed and "merged 20 lora modules x 1 from" in printed
    assert f"wrote {out}" in printed and "69 tensors (20 changed)" in printed
    assert_same_file_tensors(out, two_loras[1])
    before = out.stat().st_mtime_ns
    with pytest.raises(UserError, match=r"--output .*cli\.safetensors exists .* pass --overwrite"):
        merge_tool.main(args)  # an existing output is kept unless asked
    assert out.stat().st_mtime_ns == before
    args.overwrite = True
    assert merge_tool.main(args) == 0 and out.stat().st_mtime_ns != before


def test_parse_lora():
    assert merge_tool.parse_lora("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert merge_tool.parse_lora("a.safetensors:-1") == ("a.safetensors", -1.0)
    assert merge_tool.parse_lora("a.safetensors") == ("a.safetensors", 1.0)
    assert merge_tool.parse_lora(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)


def test_tool_import_is_torch_free():
    code = ("import sys, argparse, musubi_pipe.tools.merge as m; m.add_arguments(argparse.ArgumentParser()); "
            "assert 'torch' not in sys.modules and m.HELP and m.__doc__")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_lora_on_a_part_of_a_fused_weight_merges_into_its_rows():
    """DitTensor.parts (Z-Image's fused attention.qkv holds to_q, to_k, to_v): each part's ΔW lands in its rows."""
    from musubi_pipe.models.base import DitTensor

    torch.manual_seed(0)
    fused = torch.randn(12, 5)
    item = DitTensor(Path("x"), "a.qkv.weight", "a.qkv.weight", "F32", (12, 5), loaded=fused,
                     parts=(("a.to_q", 0, 4), ("a.to_k", 4, 4), ("a.to_v", 8, 4)))
    assert merge.module_shapes([item]) == {"a.qkv": (12, 5), "a.to_q": (4, 5), "a.to_k": (4, 5), "a.to_v": (4, 5)}
    up, down = torch.randn(4, 2), torch.randn(2, 5)
    adapter = merge.Adapter("lora", {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0)})
    lora = merge.LoadedLora(merge.LoraSpec(Path("l.safetensors"), 0.5, (), ()), {"a.to_k": adapter}, "h",
                            frozenset({"a.to_k"}))
    rows = dict(merge.tensor_modules(item))
    expected, fused = fused.clone(), fused.clone()
    expected[4:8] += 0.5 * (up @ down) * (1.0 / 2)
    out = merge.merged_tensor(item, torch.float32, [(lora, "a.to_k", rows["a.to_k"])], "cpu")
    assert torch.allclose(out, expected, atol=1e-6) and torch.equal(out[:4], fused[:4]) and torch.equal(out[8:], fused[8:])
