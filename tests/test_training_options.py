"""Training options end to end on the demo: LoHa/LoKr files, target patterns, LoRA+, optimizers,
schedules, timestep methods and the timestep plot, and their validation before any weight loads."""

import json
import logging

import pytest
from PIL import Image
from safetensors import safe_open

from musubi_pipe.errors import ConfigError
from tests.conftest import stage

pytestmark = pytest.mark.pipeline


def _keys_and_metadata(path: str) -> tuple[set[str], dict]:
    with safe_open(path, "pt") as f:
        return set(f.keys()), f.metadata()


def test_loha_with_patterns_adafactor_and_timestep_plot(demo):
    # musubi-tuner's rule: exclude everything, re-admit blocks.0 but its cross-attention
    record = demo("network.network_module=loha", "network.network_dim=4",
                  r"network.include_patterns=['blocks\.0\.(self_attn|ffn)\..*']", "network.exclude_patterns=['.*']", "optimizer.optimizer_type=AdaFactor",
                  "optimizer.lr_scheduler=cosine", "optimizer.lr_warmup_steps=0.5", "training.timestep_sampling=logsnr",
                  "training.logit_mean=-1.0", "training.weighting_scheme=cosmap", "training.show_timesteps=true")
    keys, metadata = _keys_and_metadata(record["lora"][0])
    modules = {k.rsplit(".", 1)[0] for k in keys}
    assert modules == {f"lora_unet_blocks_0_{m}" for m in ("self_attn_q", "self_attn_k", "self_attn_v", "self_attn_o",
                                                             "ffn_0", "ffn_2")}
    assert {k.rsplit(".", 1)[1] for k in keys} == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    assert metadata["ss_network_module"] == "networks.loha"
    assert metadata["ss_optimizer"].startswith("transformers.optimization.Adafactor(")
    assert (metadata["ss_timestep_sampling"], metadata["ss_weighting_scheme"]) == ("logsnr", "cosmap")
    assert json.loads(metadata["ss_network_args"])["include_patterns"] == [r"blocks\.0\.(self_attn|ffn)\..*"]
    plot = record["timesteps"][0]
    assert Image.open(plot).size == (1000, 460)
    assert stage(record, "sample")["status"] == "ran"  # the sample stage loads the LoHa file as it is


def test_lokr_loraplus_and_min_max_timestep(demo):
    record = demo("network.network_module=lokr", "network.network_dim=4", "network.loraplus_lr_ratio=4",
                  "optimizer.lr_scheduler=cosine_with_restarts", "optimizer.lr_scheduler_num_cycles=2",
                  "training.min_timestep=100", "training.max_timestep=600", "training.preserve_distribution_shape=true",
                  "pipeline.stages=[cache_latents,cache_text,train]")
    keys, metadata = _keys_and_metadata(record["lora"][0])
    assert any(k.endswith(".lokr_w1") for k in keys) and not any("lora_down" in k for k in keys)
    assert (metadata["ss_min_timestep"], metadata["ss_max_timestep"]) == ("100", "600")
    assert metadata["modelspec.timestep_range"] == "100,600"


def test_training_settings_are_checked_before_loading(demo):
    with pytest.raises(ConfigError) as err:
        demo("network.include_patterns=['blocks\\.(']", "network.rank_dropout=1.5", "optimizer.optimizer_type=adam",
             "optimizer.lr_warmup_steps=10", "training.min_timestep=700", "training.max_timestep=600")
    keys = {key for key, _ in err.value.problems}
    assert keys == {"network.include_patterns[0]", "network.rank_dropout", "optimizer.optimizer_type",
                    "optimizer.lr_warmup_steps", "training.min_timestep"}
    with pytest.raises(ConfigError, match="training.weighting_scheme: .*no effect unless timestep_sampling=sigma"):
        demo("training.weighting_scheme=mode")  # musubi-tuner ignores it silently outside sigma sampling
    assert not (demo.root / "cache" / "cache_latents").exists()


def test_tensorboard_logs_and_validation_loss(demo):
    from pathlib import Path

    from musubi_pipe.training.logs import read_scalars

    record = demo("training.validation_split=0.3", "training.validate_every_n_steps=3", "runtime.log_every_n_steps=2",
                  "pipeline.stages=[cache_latents,cache_text,train]")
    train = stage(record, "train")
    assert [step for step, _ in train["validation_losses"]] == [3, 6]
    logs = Path(train["artifact"]) / "logs"
    scalars = read_scalars(logs)
    assert [step for step, _ in scalars["loss/current"]] == [1, 2, 3, 4, 5, 6]
    assert [round(v, 4) for _, v in scalars["loss/current"]] == [round(v, 4) for v in train["losses"]]
    assert [round(v, 4) for _, v in scalars["loss/validation"]] == [round(v, 4) for _, v in train["validation_losses"]]
    assert {"lr/unet", "grad_norm", "loss/average"} <= set(scalars)
    # the held-out items do not depend on the seed, so the validation losses of two runs compare
    other = stage(demo("training.validation_split=0.3", "training.validate_every_n_steps=3", "training.seed=7",
                       "pipeline.stages=[cache_latents,cache_text,train]"), "train")
    assert other["validation_items"] == train["validation_items"] and len(train["validation_items"]) >= 1
    assert len(other["validation_losses"]) == 2 and other["validation_losses"] != train["validation_losses"]


def test_sampling_during_training(demo):
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = demo("sampling.sample_every_n_steps=3", "sampling.sample_at_first=true", "sampling.steps=2",
                  "pipeline.stages=[cache_latents,cache_text,train]")
    train = stage(record, "train")
    names = [Path(p).name for p in record["training_samples"]]
    # the demo's two prompts (an image and a 9-frame video) before the first step and at steps 3 and 6
    assert names == [f"step{step:08d}_{i:02d}.{ext}" for step in (0, 3, 6) for i, ext in ((0, "png"), (1, "mp4"))]
    assert Image.open(record["training_samples"][0]).size == (64, 64)
    events = EventAccumulator(str(Path(train["artifact"]) / "logs" / "demo_lora")).Reload()
    assert any(tag.startswith("samples/00") for tag in events.Tags()["images"])
    plain = stage(demo("pipeline.stages=[cache_latents,cache_text,train]"), "train")
    assert plain["fingerprint"] != train["fingerprint"]  # the samples are part of the artifact


def test_saving_a_layout_a_consumer_ignores_warns_with_the_command(demo, caplog):
    with caplog.at_level(logging.WARNING, logger="musubi_pipe"):
        demo("pipeline.stages=[cache_latents,cache_text,train]")
    assert not [r for r in caplog.records if "unapplied" in r.getMessage()]  # Wan's default loads everywhere
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="musubi_pipe"):
        demo("network.save_format=comfy", "pipeline.stages=[cache_latents,cache_text,train]")
    [warning] = [r.getMessage() for r in caplog.records if "unapplied" in r.getMessage()]
    assert warning.startswith("train: musubi-tuner leaves 20 of the 20 modules of demo_lora.safetensors unapplied")
    assert "python -m musubi_pipe.tools convert demo_lora.safetensors demo_lora_musubi.safetensors --to musubi" in warning
