"""TrainingLog: TensorBoard round trips, log_with=none, wandb missing/faked, failures that must not raise."""

from __future__ import annotations

import logging
import sys
import importlib.machinery
import types

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from musubi_pipe.errors import UserError
from musubi_pipe.training import logs
from musubi_pipe.training.logs import TrainingLog, flatten_config, read_scalars


def _f32(value: float) -> float:
    return float(np.float32(value))


def _accumulator(run_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"images": 0, "histograms": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def _frames(count: int = 5, size: int = 8) -> np.ndarray:
    return (np.arange(count * size * size * 3) % 256).astype(np.uint8).reshape(count, size, size, 3)


def test_tensorboard_scalars_round_trip_exactly(tmp_path):
    with TrainingLog(tmp_path, "tensorboard", "network_train") as tl:
        assert tl.backends == ("tensorboard",)
        tl.scalars({"loss/current": 0.5, "loss/average": 0.75, "lr/unet": 1e-4, "grad_norm": torch.tensor(2.25)}, step=1)
        tl.scalars({"loss/current": 0.125, "loss/average": np.float32(0.3), "lr/unet": 2e-4}, step=2)
        tl.scalars({"loss/validation": 0.0625}, step=2)
    assert tl.run_dir == tmp_path / "network_train"
    scalars = read_scalars(tmp_path)
    assert scalars["loss/current"] == [(1, 0.5), (2, 0.125)]
    assert scalars["loss/average"] == [(1, 0.75), (2, _f32(0.3))]
    assert scalars["lr/unet"] == [(1, _f32(1e-4)), (2, _f32(2e-4))]
    assert scalars["grad_norm"] == [(1, 2.25)]
    assert scalars["loss/validation"] == [(2, 0.0625)]


def test_tensorboard_histogram_images_video(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "tensorboard_video_supported", lambda: False)
    with TrainingLog(tmp_path, "tensorboard", "run") as tl:
        tl.histogram("timesteps", torch.rand(64), step=3)
        tl.histogram("empty", np.zeros(0), step=3)  # skipped, no error
        image = np.zeros((6, 10, 3), np.uint8)
        tl.images("sample", [image], step=3)
        tl.images("samples", [image, np.full((4, 4, 3), 200, np.uint8)], step=3, captions=["a cat", "a dog"])
        tl.video("sample_video", _frames(), step=3, fps=16)
    tags = _accumulator(tmp_path / "run").Tags()
    assert "timesteps" in tags["histograms"] and "empty" not in tags["histograms"]
    assert {"sample", "samples/00", "samples/01", "sample_video/frames"} <= set(tags["images"])
    accumulator = _accumulator(tmp_path / "run")
    assert accumulator.Histograms("timesteps")[0].histogram_value.num == 64
    stills = accumulator.Images("sample_video/frames")
    assert stills[0].step == 3 and (stills[0].width, stills[0].height) == (3 * 8, 8)  # first, middle, last in a row
    assert accumulator.Images("sample")[0].width == 10 and accumulator.Images("sample")[0].height == 6


def test_key_frames_of_short_videos():
    assert len(logs.key_frames(_frames(1))) == 1
    assert len(logs.key_frames(_frames(2))) == 2
    assert [int(f[0, 0, 0]) for f in logs.key_frames(_frames(5, size=1))] == [0, 6, 12]


def test_config_is_flattened_without_secrets(tmp_path):
    config = {"training": {"lr": 1e-4, "steps": 10, "log_with": "tensorboard", "betas": [0.9, 0.99]},
              "wandb_api_key": "xyz", "hub": {"token": "abc", "huggingface_token": "abc"},
              "text_encoder": {"tokenizer": "t5"}, "seed": None}
    flat = flatten_config(config)
    assert flat == {"training.lr": 1e-4, "training.steps": 10, "training.log_with": "tensorboard",
                    "training.betas": "[0.9, 0.99]", "text_encoder.tokenizer": "t5", "seed": "None"}
    with TrainingLog(tmp_path, "tensorboard", "run", config=config) as tl:
        tl.scalars({"loss/current": 1.0}, step=0)
    assert read_scalars(tmp_path)["loss/current"] == [(0, 1.0)]
    text = _accumulator(tmp_path / "run").Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| training.lr | 0.0001 |" in text and "abc" not in text and "xyz" not in text


def test_none_writes_nothing(tmp_path):
    log_dir = tmp_path / "logs"
    with TrainingLog(log_dir, "none", "run", config={"a": 1}) as tl:
        assert tl.backends == () and not tl.enabled and tl.run_dir is None
        tl.scalars({"loss/current": 1.0}, step=1)
        tl.histogram("timesteps", torch.rand(4), step=1)
        tl.images("sample", [np.zeros((2, 2, 3), np.uint8)], step=1)
        tl.video("video", _frames(), step=1, fps=8)
    assert not log_dir.exists()
    assert TrainingLog(log_dir, None, "run").backends == ()


def test_unknown_log_with_is_a_config_error(tmp_path):
    with pytest.raises(UserError, match="training.log_with"):
        TrainingLog(tmp_path, "mlflow", "run")


def test_wandb_missing_raises_with_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "_wandb_available", lambda: False)
    with pytest.raises(UserError, match=r"training\.log_with.*pip install wandb"):
        TrainingLog(tmp_path, "wandb", "run")
    assert not (tmp_path / "run").exists()


def test_all_without_wandb_warns_and_uses_tensorboard(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(logs, "_wandb_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="musubi_pipe"):
        with TrainingLog(tmp_path, "all", "run") as tl:
            assert tl.backends == ("tensorboard",)
    assert "pip install wandb" in caplog.text


class _FakeConfig(dict):
    def update(self, values, allow_val_change=False):
        super().update(values)


class _FakeRun:
    def __init__(self):
        self.logged: list[tuple[dict, int]] = []
        self.finished = False
        self.config = _FakeConfig()

    def log(self, values, step=None):
        self.logged.append((values, step))

    def finish(self):
        self.finished = True


def _fake_wandb(monkeypatch) -> types.SimpleNamespace:
    state = types.SimpleNamespace(run=_FakeRun(), init_kwargs=None)

    def init(**kwargs):
        state.init_kwargs = kwargs
        return state.run

    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # accelerate looks for the package
    module.init = init
    module.config = state.run.config  # accelerate's WandBTracker stores the configuration through wandb.config
    module.Histogram = lambda values: ("histogram", len(values))
    module.Image = lambda array, caption=None: ("image", array.shape, caption)
    module.Video = lambda array, fps, format: ("video", array.shape, fps, format)
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setattr(logs, "_wandb_available", lambda: True)
    return state


def test_all_with_wandb_logs_to_both(tmp_path, monkeypatch):
    wandb = _fake_wandb(monkeypatch)
    with TrainingLog(tmp_path, "all", "network_train", config={"training": {"lr": 0.5}},
                     tracker_kwargs={"wandb": {"name": "my-run"}}) as tl:
        assert tl.backends == ("tensorboard", "wandb")
        tl.scalars({"loss/current": 0.5}, step=4)
        tl.histogram("timesteps", [0.1, 0.2, 0.3], step=4)
        tl.images("sample", [np.zeros((2, 3, 3), np.uint8)], step=4, captions=["x"])
        tl.video("video", _frames(4), step=4, fps=16.0)
    assert wandb.init_kwargs == {"project": "network_train", "name": "my-run", "dir": str(tmp_path)}
    assert wandb.run.config == {"training.lr": 0.5}
    assert wandb.run.logged == [({"loss/current": 0.5}, 4), ({"timesteps": ("histogram", 3)}, 4),
                                ({"sample": [("image", (2, 3, 3), "x")]}, 4),
                                ({"video": ("video", (4, 3, 8, 8), 16, "mp4")}, 4)]
    assert wandb.run.finished
    assert read_scalars(tmp_path)["loss/current"] == [(4, 0.5)]


def test_wandb_start_failure_is_a_config_error(tmp_path, monkeypatch):
    _fake_wandb(monkeypatch)

    def refuse(**kwargs):
        raise RuntimeError("api key not configured")

    monkeypatch.setattr(sys.modules["wandb"], "init", refuse)
    with pytest.raises(UserError, match="wandb login"):
        TrainingLog(tmp_path, "wandb", "run")


def test_failing_writer_warns_once_and_goes_on(tmp_path, caplog):
    tl = TrainingLog(tmp_path, "tensorboard", "run")

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    tl._tensorboard.writer.add_scalar = broken
    with caplog.at_level(logging.WARNING, logger="musubi_pipe"):
        for step in range(3):
            tl.scalars({"loss/current": 1.0}, step=step)
        tl.histogram("timesteps", torch.rand(8), step=3)  # other kinds still work
        tl.close()
        tl.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "No space left" in w]) == 1
    assert "step 0" in warnings[0]
    assert any("tensorboard scalars: 3" in w for w in warnings)  # the summary at close
    assert "timesteps" in _accumulator(tmp_path / "run").Tags()["histograms"]


def test_bad_values_are_skipped_not_raised(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="musubi_pipe"):
        with TrainingLog(tmp_path, "tensorboard", "run") as tl:
            tl.scalars({"loss/current": "not a number", "grad_norm": 1.5}, step=1)
            tl.images("sample", [np.zeros((2, 2, 3), np.float32)], step=1)
            tl.video("video", np.zeros((2, 4, 4), np.uint8), step=1, fps=8)
    assert read_scalars(tmp_path) == {"grad_norm": [(1, 1.5)]}
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 3


def test_video_goes_to_add_video_when_moviepy_can_encode(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "tensorboard_video_supported", lambda: True)
    calls = []
    with TrainingLog(tmp_path, "tensorboard", "run") as tl:
        monkeypatch.setattr(tl._tensorboard.writer, "add_video",
                            lambda tag, video, global_step, fps: calls.append((tag, video.shape, global_step, fps)))
        tl.video("sample_video", _frames(5), step=7, fps=16)
    assert calls == [("sample_video", (1, 5, 3, 8, 8), 7, 16)]
