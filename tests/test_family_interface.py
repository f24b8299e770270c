"""The family interface: members checked when a family is defined, per-architecture settings with the family."""

import pytest

from musubi_pipe.models import family_names, get_family
from musubi_pipe.models.base import Family


def test_a_family_missing_a_member_fails_when_defined():
    with pytest.raises(TypeError, match=r"Half does not define .*modelspec_arch.*predict.*build_tiny"):
        class Half(Family):
            name = "half"

            def geometry(self, model_cfg):
                return None


def test_every_registered_family_is_a_complete_family():
    for name in family_names():
        family = get_family(name)
        assert isinstance(family, Family) and family.name == name
        assert family.guidance_style in ("cfg", "none") and isinstance(family.image_only, bool)
        assert family.musubi_network_module.startswith("networks.")
        assert family.modelspec_implementation.startswith("https://github.com/")


def test_memory_presets_take_block_counts_from_the_family():
    from musubi_pipe.config import compose
    from musubi_pipe.memory.settings import blocks_to_swap
    from musubi_pipe.runner import resolve

    for preset in ("24gb", "16gb", "12gb"):
        memory = resolve(compose([f"memory={preset}"]))["memory"]
        assert (memory["preset"], memory["blocks_to_swap"]) == (preset, "preset")
        for name, task in (("wan", "t2v-14B"), ("wan", "t2v-1.3B"), ("hunyuan_video", "t2v")):
            family = get_family(name)
            size = family.model_size({"task": task})
            assert blocks_to_swap(memory, family, {"task": task}) == family.swap_presets[preset][size]


def test_fp8_text_encoder_is_one_key_with_the_families_names_as_aliases(tmp_path):
    from musubi_pipe.config import compose
    from musubi_pipe.memory.settings import memory_problems, text_encoder_fp8
    from musubi_pipe.pipeline.stage import Job
    from musubi_pipe.runner import resolve
    from musubi_pipe.stages.common import text_document

    wan = get_family("wan")
    assert text_encoder_fp8({"fp8_text_encoder": True}, wan) and text_encoder_fp8({"fp8_t5": True}, wan)
    assert not text_encoder_fp8({"fp8_llm": True}, wan)
    cfg = {"memory": {"fp8_llm": True}, "pipeline": {"stages": ["train"]}, "model": {"arch": "wan", "task": "t2v-14B"}}
    assert memory_problems(cfg, wan)[0] == ("memory.fp8_llm", "is another model's text encoder; wan calls it "
                                                              "memory.fp8_t5, or use memory.fp8_text_encoder")

    def text_doc(*overrides):
        cfg = resolve(compose(["+recipe=demo", f"paths.root={tmp_path}", *overrides]))
        from musubi_pipe.config.validate import prepare_embedded
        from musubi_pipe.pipeline.fingerprint import DigestCache
        from musubi_pipe.pipeline.store import Store

        prepare_embedded(cfg)
        store = Store(cfg["paths"]["cache"])
        return text_document(Job(cfg=cfg, store=store, digests=DigestCache(store.root / "d.json"), run_dir=tmp_path))

    generic, alias, off = text_doc("memory.fp8_text_encoder=true"), text_doc("memory.fp8_t5=true"), text_doc()
    assert generic == alias and generic["fp8"] is True and "fp8" not in off  # same text-cache keys either way


def test_an_image_only_family_refuses_video_datasets_and_frames(tmp_path, monkeypatch):
    from musubi_pipe.config import compose
    from musubi_pipe.config.validate import validate
    from musubi_pipe.errors import ConfigError
    from musubi_pipe.runner import resolve

    cfg = resolve(compose(["+recipe=demo", f"paths.root={tmp_path}"]))
    validate(cfg)  # the demo is valid as it is
    monkeypatch.setattr(type(get_family("wan")), "image_only", True)
    cfg = resolve(compose(["+recipe=demo", f"paths.root={tmp_path}"]))
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
    assert caught.value.problems == [
        ("dataset.datasets[1].video_directory", "is a video source, but wan trains on images only; use "
                                                "image_directory or image_jsonl_file"),
        ("sampling.prompts[1].frames", "is 9, but wan makes images; set sampling.frames=1 (or the prompt's frames)"),
    ]


def test_families_are_found_from_their_folders():
    from pathlib import Path

    import musubi_pipe.models as models

    folders = sorted(p.name for p in Path(models.__file__).parent.iterdir() if (p / "family.py").is_file())
    assert family_names() == folders and "wan" in folders and "hunyuan_video" in folders
    assert all(get_family(name).name == name for name in folders)  # model.arch is the folder's name


def test_loraid_units_come_from_the_family_layout():
    from musubi_pipe.errors import ConfigError
    from musubi_pipe.models.base import LoraidLayout
    from musubi_pipe.network.loraid import Unit, modules_by_expert, task_candidates, task_units

    wan = get_family("wan").loraid_layout({"task": "t2v-A14B"})
    assert (wan.block_list, wan.groups, wan.num_blocks, wan.experts) == (
        "blocks", ("self_attn", "cross_attn", "ffn"), 40, ("high_noise", "low_noise"))
    assert list(wan.candidates) == task_candidates("t2v-A14B") and len(task_units("t2v-A14B")) == 80
    # another architecture's blocks: the same units, its own names
    other = LoraidLayout("layers", ("attention", "feed_forward"), 2, ("",),
                         ("layers.0.attention.to_q", "layers.0.feed_forward.w1", "layers.1.attention.to_q"))
    assert Unit("", 0, "attention").modules(other.candidates, other) == ["layers.0.attention.to_q"]
    assert modules_by_expert([["", 1, "all"]], {"": other.candidates}, other) == {"": ["layers.1.attention.to_q"]}
    assert get_family("hunyuan_video").loraid_layout({"task": "t2v"}) is None
    with pytest.raises(ConfigError, match="LORAID allocation is not built for model.arch=hunyuan_video"):
        task_units("t2v", arch="hunyuan_video")
