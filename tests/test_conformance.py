"""Every registered family and tiny task through the whole pipeline: a new architecture is covered by registering it.

Per case (Family.tiny_models, from the registry): the tiny model builds in users' formats and validates clean
(an inference-only task, such as SkyReels V1 I2V, then runs the generate stage and stops there);
cache -> train 2 steps -> sample -> merge runs; every LoRA target moved in training (a target whose gradient was
zero keeps its zero-initialised lora_up); the default LoRA file reads back through network.formats with every key
used and `tools inspect` groups its modules by the family's own blocks; the merge stage's DiT, reloaded by the
family's own loader, computes what the hooked LoRA computes; and
`tools merge`, recognising the architecture from the DiT alone, writes the same tensors. Merged DiTs are written in
float32 here, so rounding to a bf16 file does not hide a wrong ΔW.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import stage
from musubi_pipe.models import family_names, get_family

pytestmark = pytest.mark.pipeline

CASES = [(arch, task, group) for arch in family_names() for task, group in get_family(arch).tiny_models.items()]
STAGES = "pipeline.stages=[cache_latents,cache_text,train,sample,merge]"


def test_every_family_has_tiny_models_for_every_case():
    assert {arch for arch, _, _ in CASES} == set(family_names())
    assert len(CASES) == 8 and ("hunyuan_video", "tiny-t2v", "hunyuan_video/tiny") in CASES
    assert ("zimage", "tiny", "zimage/tiny") in CASES


def _image(demo) -> str:
    return str(demo.root / "demo_data" / "images" / "red_circle.png")


@pytest.mark.parametrize("arch,task,group", CASES)
def test_family_conformance(arch, task, group, demo):
    from musubi_pipe.network.factory import network_from_weights
    from musubi_pipe.network.formats import read_lora_file
    from musubi_pipe.network.merge import merge_loras
    from musubi_pipe.tools.inspect_lora import inspect_lora

    family = get_family(arch)
    overrides = [f"model={group}", STAGES, "training.max_train_steps=2", "training.save_every_n_steps=null",
                 "sampling.steps=2", "sampling.prompts=[{prompt: a red circle on a white background, frames: 1}]",
                 "model.dit_dtype=float32", "model.vae_dtype=float32", "merge.dtype=float32"]
    if family.image_only:  # the demo dataset's video is a config error for an image model
        overrides.append("dataset.datasets=[{image_directory: ${dataset.demo_dir}/images}]")
    if family.sample_image({"task": task}) == "required":
        from musubi_pipe.data.demo import make_demo_dataset

        make_demo_dataset(demo.root / "demo_data")  # as validation will: the start image is among the demo data
        overrides.append(f"sampling.image={_image(demo)}")
    if family.check_stages({"task": task}, ["train"]):  # inference only (SkyReels V1 I2V): generate with its DiT
        record = demo(*overrides[:1], "pipeline.stages=[generate]", *overrides[2:])
        assert [s["status"] for s in record["stages"]] == ["ran"] and len(record["samples"]) == 1
        return
    record = demo(*overrides)
    assert [s["status"] for s in record["stages"]] == ["ran"] * 5
    assert [Path(p).suffix for p in record["samples"]] == [".png"]
    model = record_model(record)
    train = stage(record, "train")
    merged = dict(zip(sorted(train["lora_experts"]), stage(record, "merge")["outputs"]["merged"]))

    for expert_name, lora_name in sorted(train["lora_experts"].items()):
        lora = Path(train["artifact"]) / lora_name
        tensors, _ = read_lora_file(lora)  # the default layout, read back through network.formats
        ups = {k: v for k, v in tensors.items() if k.endswith("lora_up.weight")}
        if train["expert_steps"].get(expert_name, 0):  # an expert no batch was routed to keeps lora_up at zero
            assert ups and all(v.abs().max() > 0 for v in ups.values()), "a LoRA target got no gradient"

        targets = inspect_lora(lora)["targets"]  # tools inspect groups the modules by the family's own blocks
        assert (targets["block_count"], targets["outside_blocks"]) == (family.num_blocks(model), [])
        assert set(targets["lists"]) <= set(family.block_lists)  # the lists the default targets train

        base = family.load_dit(model, "cpu", torch.float32, expert_name)
        network = network_from_weights(family.lora_targets(base), tensors, source=str(lora))  # every key used
        assert len(network.loras) == len(ups)
        network.apply_to()
        expert = next(e for e in family.experts(model) if e.name == expert_name)
        merged_path = Path(stage(record, "merge")["artifact"]) / merged[expert_name]
        reloaded = family.load_dit({**model, expert.key.removeprefix("model."): str(merged_path)}, "cpu",
                                   torch.float32, expert_name)
        hooked, plain = family.lora_targets(base), family.lora_targets(reloaded)
        g = torch.Generator().manual_seed(0)
        for name in network.official_names:
            x = torch.randn(3, hooked[name].in_features, generator=g)
            torch.testing.assert_close(plain[name](x), hooked[name](x), atol=1e-5, rtol=1e-4)

        by_tool = merged_path.with_name("by_tool.safetensors")
        merge_loras(model[expert.key.removeprefix("model.")], [(str(lora), 1.0)], by_tool,  # arch recognised
                    dtype="float32")
        a, b = load_file(str(by_tool)), load_file(str(merged_path))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        by_tool.unlink()


def record_model(record: dict) -> dict:
    import yaml

    return yaml.safe_load(Path(record["config"]).read_text())["model"]
