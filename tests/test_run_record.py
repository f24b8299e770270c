"""Every run leaves its record (failed ones too), disk errors say what to do, and validation names every
problem in one pass."""

import errno
import json
import time
from pathlib import Path

import pytest

from conftest import stage
from musubi_pipe.errors import ConfigError, UserError, storage_errors

TRAIN = "pipeline.stages=[cache_latents,cache_text,train,sample]"


def test_claimed_run_folders_are_unique_in_the_same_second(tmp_path, monkeypatch):
    from musubi_pipe.config.run_dirs import claim_run_dir

    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261203_120000")
    names = [Path(claim_run_dir(str(tmp_path), "demo")).name for _ in range(3)]
    assert names == ["20261203_120000_demo", "20261203_120000_demo_2", "20261203_120000_demo_3"]
    monkeypatch.setenv("RANK", "1")  # another process of the same run claims nothing
    assert Path(claim_run_dir(str(tmp_path), "demo")).name == "20261203_120000_demo"


def test_disk_full_during_a_checkpoint_is_named_and_recorded(demo, monkeypatch, capsys):
    real = Path.write_bytes

    def full_disk(self, data):
        if self.name == "states.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(UserError) as caught:
        demo(TRAIN)
    message = str(caught.value)
    assert message.startswith("stage train: no space left on the device writing ")
    assert "/cache/train/.partial/" in message and "step_00000003" in message
    assert "tools gc" in message and "paths.cache" in message

    run_dir = max((demo.root / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and record["error"] == message
    assert [(s["name"], s["status"]) for s in record["stages"]] == [
        ("cache_latents", "ran"), ("cache_text", "ran"), ("train", "failed"), ("sample", "pending")]
    assert all(s["artifact"] for s in record["stages"])  # tools gc keeps what the run was using
    log = (run_dir / "run.log").read_text()
    assert "plan (" in log and "cache_latents: ran" in log and "cache_text: ran" in log
    assert "ERROR run failed: stage train: no space left" in log
    train = demo.root / "cache" / "train"
    assert not list((train / ".tmp").iterdir()) and not list(train.glob(".partial/*/.step_*"))  # nothing half-written

    monkeypatch.setattr(Path, "write_bytes", real)
    capsys.readouterr()
    ok = demo(TRAIN)
    assert ok["status"] == "ok" and stage(ok, "train")["status"] == "ran"
    assert json.loads((Path(ok["run_dir"]) / "run.json").read_text())["error"] is None
    printed = capsys.readouterr().out.splitlines()  # the end of a run names the run folder and its links
    assert printed[-3:] == [f"run folder: {ok['run_dir']}", "  lora/: demo_lora.safetensors",
                            "  samples/: sample_00.png, sample_01.mp4"]


def test_storage_errors_name_path_and_fix(tmp_path):
    with pytest.raises(UserError, match=r"^stage sample: permission denied writing /x/y\. Fix: make that folder"):
        with storage_errors("stage sample"):
            raise PermissionError(errno.EACCES, "Permission denied", "/x/y")
    # libraries that wrap the OS error in their own type (safetensors, torch) still get the message
    with pytest.raises(UserError, match=r"^stage train: no space left on the device writing /fallback"):
        with storage_errors("stage train", "/fallback"):
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, ... (os error 28)")
    with pytest.raises(ValueError):  # anything else goes on untouched
        with storage_errors("stage train"):
            raise ValueError("not a disk problem")


def _dataset_toml(tmp_path) -> Path:
    path = tmp_path / "dataset.toml"
    path.write_text('[general]\nresolution = [64, 64]\n\n[[datasets]]\nimage_directoryy = "/data/images"\n')
    return path


def test_validation_reports_every_problem_in_one_pass(tmp_path):
    from musubi_pipe.config import compose
    from musubi_pipe.config.validate import validate
    from musubi_pipe.runner import resolve

    overrides = ["+recipe=wan21_t2v_14b", f"dataset.musubi_config={_dataset_toml(tmp_path)}", "optimizer.lr=abc",
                 "training.max_train_steps=-5", f"model.vae={tmp_path}/missing_vae.safetensors",
                 "model.t5=x", "model.t5_tokenizer=y"]
    with pytest.raises(ConfigError) as caught:
        validate(resolve(compose(overrides)), overrides)
    keys = [key for key, _ in caught.value.problems]
    assert f"{tmp_path}/dataset.toml: datasets[0].image_directoryy" in keys  # the dataset file
    assert "optimizer.lr" in keys and keys.count("optimizer.lr") == 1  # one message per bad value
    assert "training.max_train_steps" in keys
    assert "model.dit" in keys  # required, not set
    assert any("missing_vae" in msg for _, msg in caught.value.problems)  # the family's file checks ran too
    assert "dataset.datasets" not in keys  # emptied only because the file failed: not a problem of its own


def test_command_line_dataset_general_with_a_dataset_file_is_an_error(tmp_path):
    from musubi_pipe.config import compose
    from musubi_pipe.config.validate import read_musubi_config
    from musubi_pipe.runner import resolve

    toml = tmp_path / "dataset.toml"
    toml.write_text('[general]\nresolution = [64, 64]\n\n[[datasets]]\nimage_directory = "/data/images"\n')
    overrides = ["+recipe=wan21_t2v_14b", f"dataset.musubi_config={toml}", "dataset.general.resolution=[32,32]",
                 "dataset.general.batch_size=4"]
    with pytest.raises(ConfigError) as caught:
        read_musubi_config(resolve(compose(overrides)), overrides)
    assert [key for key, _ in caught.value.problems] == ["dataset.general.resolution", "dataset.general.batch_size"]
    assert "replaces all of dataset.general with the file's [general]" in caught.value.problems[0][1]
    cfg = resolve(compose(overrides[:2]))  # the recipe's own general is replaced, as documented
    read_musubi_config(cfg, overrides[:2])
    assert cfg["dataset"]["general"]["resolution"] == [64, 64]


def test_progress_bars_print_lines_when_redirected():
    import io

    from musubi_pipe.progress import progress_bar

    log = io.StringIO()  # not a terminal, like a SLURM output file
    for _ in progress_bar(range(500), desc="train", file=log):
        pass
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("train: 100%") and "500/500" in lines[-1]


def test_a_new_recipe_is_explained_against_its_own_runs(demo):
    plan = "pipeline.dry_run=true"
    demo(TRAIN)
    first = {p["name"]: p["reason"] for p in demo(plan, "name=mine", "training.output_name=mine_lora")["plan"]}
    assert first["cache_latents"] == "cached"  # same inputs: shared with the demo's runs
    assert first["train"] == "new: no earlier artifact of this stage for run name 'mine'"  # not "demo_lora -> mine_lora"
    demo(TRAIN, "name=mine", "training.output_name=mine_lora")
    again = {p["name"]: p["reason"] for p in demo(plan, "name=mine", "training.output_name=mine_lora",
                                                  "optimizer.lr=0.0005")["plan"]}
    assert again["train"] == "optimizer.lr 0.001 -> 0.0005"  # against mine's last run, not the demo's
