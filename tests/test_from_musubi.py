"""tools from-musubi: musubi-tuner command lines (as its docs write them) become run specs, flag by flag."""

import re
from pathlib import Path

import pytest

from musubi_pipe.config import compose
from musubi_pipe.config.musubi_flags import ACCELERATE, COMMON
from musubi_pipe.config.validate import validate
from musubi_pipe.errors import ConfigError, UserError
from musubi_pipe.models import family_names, get_family
from musubi_pipe.runner import resolve
from musubi_pipe.tools.__main__ import main as tools_main
from musubi_pipe.tools.from_musubi import build_spec, flag_table, split_commands, translate

REPO = Path(__file__).resolve().parents[1]

# musubi-tuner docs/wan.md: caching and training Wan2.1 T2V 1.3B
WAN21_T2V = r"""
python src/musubi_tuner/wan_cache_latents.py --dataset_config path/to/toml --vae path/to/wan_vae.safetensors
python src/musubi_tuner/wan_cache_text_encoder_outputs.py --dataset_config path/to/toml  --t5 path/to/models_t5_umt5-xxl-enc-bf16.pth --batch_size 16
accelerate launch --num_cpu_threads_per_process 1 --mixed_precision bf16 src/musubi_tuner/wan_train_network.py \
    --task t2v-1.3B \
    --dit path/to/wan2.1_xxx_bf16.safetensors \
    --dataset_config path/to/toml --sdpa --mixed_precision bf16 --fp8_base \
    --optimizer_type adamw8bit --learning_rate 2e-4 --gradient_checkpointing \
    --max_data_loader_n_workers 2 --persistent_data_loader_workers \
    --network_module networks.lora_wan --network_dim 32 \
    --timestep_sampling shift --discrete_flow_shift 3.0 \
    --max_train_epochs 16 --save_every_n_epochs 1 --seed 42 \
    --output_dir path/to/output_dir --output_name name-of-lora
"""

# Wan2.1 I2V 14B: --i2v and --clip when caching (docs/wan.md), sampling during training
WAN21_I2V = r"""
python src/musubi_tuner/wan_cache_latents.py --dataset_config data.toml --vae Wan2.1_VAE.pth --i2v --clip models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth
accelerate launch --mixed_precision bf16 src/musubi_tuner/wan_train_network.py --task i2v-14B \
  --dit wan2.1_i2v_480p_14B_bf16.safetensors --dataset_config data.toml --xformers --mixed_precision bf16 \
  --fp8_base --fp8_scaled --blocks_to_swap 20 --optimizer_type AdamW8bit --learning_rate 1e-4 \
  --gradient_checkpointing --network_module networks.lora_wan --network_dim 16 --network_alpha 8 \
  --network_args "loraplus_lr_ratio=4" "exclude_patterns=[r'.*ffn.*']" "verbose=True" \
  --timestep_sampling shift --discrete_flow_shift 5 --max_train_steps 3000 --save_every_n_steps 500 \
  --sample_prompts prompts.txt --sample_every_n_steps 250 --sample_at_first \
  --vae Wan2.1_VAE.pth --t5 models_t5_umt5-xxl-enc-bf16.pth --clip models_clip.pth \
  --output_name i2v-lora --log_with tensorboard --logging_dir logs
"""

# Wan2.2 T2V A14B: both experts (docs/wan.md "Wan2.2"), PowerShell line continuations
WAN22_T2V = """accelerate launch --num_cpu_threads_per_process 1 src/musubi_tuner/wan_train_network.py `
  --task t2v-A14B --dit wan2.2_t2v_low_noise_14B_fp16.safetensors `
  --dit_high_noise wan2.2_t2v_high_noise_14B_fp16.safetensors --timestep_boundary 875 `
  --offload_inactive_dit --dataset_config dataset.toml --sdpa --fp8_base --fp8_scaled `
  --optimizer_type adamw --learning_rate 3e-4 --lr_scheduler cosine --lr_warmup_steps 100 `
  --network_module networks.lora_wan --network_dim 32 --network_alpha 32 --max_train_epochs 10 `
  --timestep_sampling shift --discrete_flow_shift 12 --preserve_distribution_shape --min_timestep 0 `
  --max_timestep 1000 --save_precision bf16 --output_name wan22
"""

# Wan2.2 I2V A14B trained through python -m, with a musubi-tuner --config_file TOML
WAN22_I2V = """python -m musubi_tuner.wan_train_network --config_file {config} --task i2v-A14B --dit low.safetensors
  --dit_high_noise high.safetensors --network_module networks.lora_wan --fp8_t5 --compile --compile_mode max-autotune
  --dataset_config dataset.toml --lr_decay_steps 100
"""
WAN22_I2V_CONFIG = """
[model]
vae = "wan_2.1_vae.safetensors"
t5 = "umt5_xxl_fp16.safetensors"
[training]
learning_rate = 5e-5
network_dim = 64
gradient_checkpointing = true
max_train_steps = 1200
task = "t2v-A14B"   # overridden by the command line, as in musubi-tuner
"""

# musubi-tuner docs/hunyuan_video.md: caching and training HunyuanVideo (its wrapped lines carry no backslash)
HUNYUAN = """python src/musubi_tuner/cache_latents.py --dataset_config path/to/toml --vae path/to/ckpts/hunyuan-video-t2v-720p/vae/pytorch_model.pt --vae_chunk_size 32 --vae_tiling
python src/musubi_tuner/cache_text_encoder_outputs.py --dataset_config path/to/toml  --text_encoder1 path/to/ckpts/text_encoder --text_encoder2 path/to/ckpts/text_encoder_2 --batch_size 16 --fp8_llm
accelerate launch --num_cpu_threads_per_process 1 --mixed_precision bf16 src/musubi_tuner/hv_train_network.py
    --dit path/to/ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt
    --dataset_config path/to/toml --sdpa --mixed_precision bf16 --fp8_base
    --optimizer_type adamw8bit --learning_rate 2e-4 --gradient_checkpointing
    --max_data_loader_n_workers 2 --persistent_data_loader_workers
    --network_module networks.lora --network_dim 32
    --timestep_sampling shift --discrete_flow_shift 7.0
    --max_train_epochs 16 --save_every_n_epochs 1 --seed 42
    --output_dir path/to/output_dir --output_name name-of-lora --guidance_scale 1.0 --blocks_to_swap 10
    --use_pinned_memory_for_block_swap --split_attn --weighting_scheme sigma_sqrt --img_in_txt_in_offloading
"""


def _keys(translation) -> dict:
    return dict(translation.keys)


def test_wan21_t2v_from_the_docs():
    t = translate(WAN21_T2V)
    assert t.arch == "wan" and t.model == "wan/t2v_1_3b"
    assert _keys(t) == {
        "dataset.musubi_config": "path/to/toml", "model.vae": "path/to/wan_vae.safetensors",
        "model.t5": "path/to/models_t5_umt5-xxl-enc-bf16.pth", "model.dit": "path/to/wan2.1_xxx_bf16.safetensors",
        "memory.attention": "sdpa", "training.mixed_precision": "bf16", "memory.fp8_base": True,
        "optimizer.optimizer_type": "adamw8bit", "optimizer.lr": 2e-4, "memory.gradient_checkpointing": True,
        "network.network_module": "lora", "network.network_dim": 32, "training.timestep_sampling": "shift",
        "training.discrete_flow_shift": 3.0, "training.max_train_epochs": 16, "training.save_every_n_epochs": 1,
        "training.seed": 42, "paths.runs": "path/to/output_dir", "training.output_name": "name-of-lora",
        # musubi-tuner's defaults where ours differ
        "training.save_every_n_steps": None, "memory.pin_memory": False,
        "pipeline.stages": ["cache_latents", "cache_text", "train"], "name": "name-of-lora",
    }
    not_needed = dict(t.flags("not_needed"))
    assert set(not_needed) == {"accelerate --num_cpu_threads_per_process", "--batch_size",
                               "--max_data_loader_n_workers", "--persistent_data_loader_workers"}
    assert not t.flags("unsupported") and not t.flags("unknown")


def test_wan21_i2v_with_network_args_sampling_and_block_swap():
    t = translate(WAN21_I2V)
    keys = _keys(t)
    assert t.model == "wan/i2v_14b"
    assert keys["model.clip"] == "models_clip.pth"  # the training command's, given later, wins (and is noted)
    assert ("--clip", "note") in [(f, s) for f, s, _ in t.report]
    assert keys["memory.attention"] == "xformers" and keys["memory.fp8_scaled"] is True
    assert keys["memory.blocks_to_swap"] == 20 and keys["optimizer.optimizer_type"] == "AdamW8bit"
    assert keys["network.network_alpha"] == 8.0 and keys["network.loraplus_lr_ratio"] == 4.0
    assert keys["network.exclude_patterns"] == [".*ffn.*"]
    assert keys["sampling.prompt_file"] == "prompts.txt" and keys["sampling.sample_every_n_steps"] == 250
    assert keys["sampling.sample_at_first"] is True and keys["runtime.log_with"] == "tensorboard"
    assert keys["training.save_every_n_steps"] == 500 and keys["training.max_train_steps"] == 3000
    assert keys["training.discrete_flow_shift"] == 5.0 and keys["name"] == "i2v-lora"
    assert "--network_args verbose=True" in dict(t.flags("not_needed"))
    assert "--i2v" in dict(t.flags("not_needed")) and "--logging_dir" in dict(t.flags("not_needed"))


def test_wan22_t2v_both_experts_with_powershell_continuations():
    t = translate(WAN22_T2V)
    keys = _keys(t)
    assert t.model == "wan/t2v_a14b"
    assert keys["model.dit_high_noise"] == "wan2.2_t2v_high_noise_14B_fp16.safetensors"
    assert keys["model.timestep_boundary"] == 875.0 and keys["memory.offload_inactive_dit"] is True
    assert keys["optimizer.lr_scheduler"] == "cosine" and keys["optimizer.lr_warmup_steps"] == 100
    assert keys["training.preserve_distribution_shape"] is True and keys["network.save_dtype"] == "bfloat16"
    assert keys["training.mixed_precision"] == "no"  # neither accelerate nor the script said: musubi-tuner's fp32
    assert ("--mixed_precision", "default") in [(f, s) for f, s, _ in t.report]


def test_wan22_i2v_reads_its_config_file_under_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.toml").write_text(WAN22_I2V_CONFIG)
    t = translate(WAN22_I2V.format(config="train"))  # musubi-tuner appends .toml
    keys = _keys(t)
    assert t.model == "wan/i2v_a14b"  # --task on the command line wins over the file's
    assert keys["model.vae"] == "wan_2.1_vae.safetensors" and keys["model.t5"] == "umt5_xxl_fp16.safetensors"
    assert keys["optimizer.lr"] == 5e-5 and keys["network.network_dim"] == 64
    assert keys["memory.gradient_checkpointing"] is True and keys["training.max_train_steps"] == 1200
    assert keys["memory.fp8_text_encoder"] is True and keys["memory.compile_mode"] == "max-autotune"
    assert "--lr_decay_steps" in dict(t.flags("unsupported"))
    # musubi-tuner's defaults for what neither gives
    assert keys["training.timestep_sampling"] == "sigma" and keys["training.discrete_flow_shift"] == 1.0
    assert keys["training.mixed_precision"] == "no"


def test_hunyuan_video_from_the_docs():
    t = translate(HUNYUAN)
    keys = _keys(t)
    assert t.arch == "hunyuan_video" and t.model == "hunyuan_video/t2v"
    assert keys["model.text_encoder1"] == "path/to/ckpts/text_encoder"
    assert keys["model.vae_tiling"] is True and keys["model.vae_chunk_size"] == 32
    assert keys["memory.fp8_text_encoder"] is True and keys["model.train_guidance_scale"] == 1.0
    assert keys["memory.blocks_to_swap"] == 10 and keys["memory.pin_memory"] is True
    assert keys["memory.split_attn"] is True and keys["training.weighting_scheme"] == "sigma_sqrt"
    assert keys["training.discrete_flow_shift"] == 7.0 and keys["optimizer.lr"] == 2e-4
    assert "--img_in_txt_in_offloading" in dict(t.flags("unsupported"))


def test_hunyuan_cache_defaults_apply_only_with_its_caching_command():
    t = translate("python cache_latents.py --dataset_config d.toml --vae vae.pt")
    assert t.keys["model.vae_tiling"] is False and t.keys["model.vae_chunk_size"] is None
    assert t.keys["pipeline.stages"] == ["cache_latents"]
    assert "optimizer.lr" not in t.keys  # no training command: no training defaults


@pytest.mark.parametrize("text", [WAN21_T2V, WAN21_I2V, WAN22_T2V, HUNYUAN])
def test_converted_specs_compose_and_validate_but_for_the_files(text, tmp_path):
    """Every key the tool writes is a real key with a valid value: validation finds only the absent files."""
    from musubi_pipe.config.spec import write_spec

    spec = build_spec(translate(text))
    write_spec(spec, tmp_path / "run.toml")
    cfg = resolve(compose([str(tmp_path / "run.toml"), f"paths.root={tmp_path}"]))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    file_keys = {"dataset.musubi_config", "sampling.prompt_file", "model.dit", "model.dit_high_noise", "model.vae",
                 "model.t5", "model.t5_tokenizer", "model.clip", "model.text_encoder1", "model.text_encoder2"}
    found = {key for key, message in err.value.problems if "not installed here" not in message}  # xformers
    assert found <= file_keys, err.value.problems


def test_the_cli_writes_the_spec_with_its_report(tmp_path, capsys):
    script = tmp_path / "train.sh"
    script.write_text(WAN21_T2V + "\n--bogus_flag 1\n")
    assert tools_main(["from-musubi", "--file", str(script), "-o", str(tmp_path / "run.toml")]) == 0
    text = (tmp_path / "run.toml").read_text()
    assert text.startswith("# From musubi-tuner (wan_cache_latents.py, wan_cache_text_encoder_outputs.py, "
                           "wan_train_network.py)")
    assert "# UNKNOWN flags (not converted):\n#   --bogus_flag:" in text
    assert "# STILL TO SET" in text and "#   model.t5_tokenizer: musubi-tuner fetches google/umt5-xxl" in text
    assert '[defaults]\nmodel = "wan/t2v_1_3b"' in text
    assert "run it with: python -m musubi_pipe" in capsys.readouterr().err


def test_scripts_not_built_and_wrong_input_are_named():
    with pytest.raises(UserError, match="Qwen-Image is not supported here yet"):
        translate("accelerate launch src/musubi_tuner/qwen_image_train_network.py --dit x")
    with pytest.raises(UserError, match="Fun Control is not built here yet"):
        translate("python wan_train_network.py --task t2v-14B-FC --dit x")
    with pytest.raises(UserError, match="an inference script"):
        translate("python src/musubi_tuner/wan_generate_video.py --task t2v-14B")
    with pytest.raises(UserError, match="no musubi-tuner script found"):
        translate("echo hello")
    with pytest.raises(UserError, match="different models"):
        translate("python wan_train_network.py --dit a\npython hv_train_network.py --dit b")


def test_split_commands_joins_continuations_of_every_shell():
    text = "a.py --x 1 \\\n  --y 2\nb.py --z ^\n 3\n# comment\nc.py --w `\n 4 && d.py"
    assert split_commands(text) == [["a.py", "--x", "1", "--y", "2"], ["b.py", "--z", "3"], ["c.py", "--w", "4"],
                                    ["d.py"]]


def test_docs_table_is_the_tools_table():
    """docs/training.md holds exactly what `from-musubi --table` prints, so no flag is missing from the docs."""
    docs = (REPO / "docs" / "training.md").read_text()
    table = flag_table()
    assert table in docs
    every = set(COMMON) | set(ACCELERATE)
    for name in family_names():
        every |= set(get_family(name).musubi_flags)
    assert every <= set(re.findall(r"\| `(--[a-z0-9_]+)` \|", table))
