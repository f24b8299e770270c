"""Dataset keys and musubi-tuner dataset config files: the TOML/JSON reader, the checks, merging."""

import json
import logging

import pytest

from musubi_pipe.data.dataset_config import (
    DATASET_KEYS,
    GENERAL_KEYS,
    IMAGE_KEYS,
    VIDEO_KEYS,
    check_datasets,
    check_entry,
    dataset_kind,
    defaults,
    load_musubi_config,
    merged_entry,
)
from musubi_pipe.errors import ConfigError

MUSUBI_TOML = """\
# a dataset config written for musubi-tuner
[general]
resolution = [960, 544]
caption_extension = ".txt"
batch_size = 1
enable_bucket = true
bucket_no_upscale = false

[[datasets]]
image_directory = "data/images"
cache_directory = "cache/images"
num_repeats = 2

[[datasets]]
video_directory = "data/videos"
cache_directory = "cache/videos"
target_frames = [1, 25, 45]
frame_extraction = "uniform"
frame_sample = 4
source_fps = 30.0
"""

EXPECTED_GENERAL = {
    "resolution": [960, 544],
    "caption_extension": ".txt",
    "batch_size": 1,
    "enable_bucket": True,
    "bucket_no_upscale": False,
}
EXPECTED_DATASETS = [
    {"image_directory": "data/images", "cache_directory": "cache/images", "num_repeats": 2},
    {
        "video_directory": "data/videos",
        "cache_directory": "cache/videos",
        "target_frames": [1, 25, 45],
        "frame_extraction": "uniform",
        "frame_sample": 4,
        "source_fps": 30.0,
    },
]


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def _problems(general, datasets) -> dict:
    return dict(check_datasets(general, datasets, "dataset"))


def _load_problems(path) -> dict:
    with pytest.raises(ConfigError) as info:
        load_musubi_config(path)
    return dict(info.value.problems)


# --- key tables --------------------------------------------------------------------------------


def test_key_tables_share_general_keys_and_defaults():
    assert set(GENERAL_KEYS) < set(IMAGE_KEYS) and set(GENERAL_KEYS) < set(VIDEO_KEYS)
    assert "target_frames" not in IMAGE_KEYS and "video_directory" not in IMAGE_KEYS
    assert "fp_1f_clean_indices" not in VIDEO_KEYS
    assert defaults("image")["caption_extension"] == ".txt"
    assert defaults("video")["target_frames"] == (1,) and defaults("video")["max_frames"] == 129
    assert DATASET_KEYS["video"]["frame_extraction"] == "head"
    assert DATASET_KEYS["image"]["resolution"] == (960, 544)


def test_dataset_kind():
    assert dataset_kind({"image_directory": "a"}) == "image"
    assert dataset_kind({"video_jsonl_file": "v.jsonl"}) == "video"
    assert dataset_kind({"video_directory": None, "image_directory": "a"}) == "image"
    assert dataset_kind({}) == "image"


# --- reading musubi-tuner files ----------------------------------------------------------------


def test_toml_round_trips_unchanged(tmp_path):
    general, datasets = load_musubi_config(_write(tmp_path, "dataset.toml", MUSUBI_TOML))
    assert general == EXPECTED_GENERAL
    assert datasets == EXPECTED_DATASETS


def test_json_gives_the_same_result(tmp_path):
    path = _write(tmp_path, "dataset.json", json.dumps({"general": EXPECTED_GENERAL, "datasets": EXPECTED_DATASETS}))
    assert load_musubi_config(path) == (EXPECTED_GENERAL, EXPECTED_DATASETS)
    assert load_musubi_config(str(path)) == load_musubi_config(_write(tmp_path, "dataset.toml", MUSUBI_TOML))


def test_toml_merges_to_resolved_entries(tmp_path):
    general, datasets = load_musubi_config(_write(tmp_path, "dataset.toml", MUSUBI_TOML))
    image, video = (merged_entry(general, entry) for entry in datasets)
    assert image["kind"] == "image" and image["resolution"] == (960, 544) and image["num_repeats"] == 2
    assert image["enable_bucket"] is True and image["fp_latent_window_size"] == 9
    assert video["kind"] == "video" and video["target_frames"] == [1, 25, 45]
    assert (video["frame_extraction"], video["frame_sample"], video["source_fps"]) == ("uniform", 4, 30.0)
    assert video["max_frames"] == 129 and video["num_repeats"] == 1


def test_integer_source_fps_is_accepted_as_float(tmp_path):
    path = _write(tmp_path, "fps.toml", '[[datasets]]\nvideo_directory = "v"\nsource_fps = 30\n')
    general, datasets = load_musubi_config(path)
    assert general == {}
    fps = merged_entry(general, datasets[0])["source_fps"]
    assert fps == 30.0 and isinstance(fps, float)


def test_wrong_extension(tmp_path):
    problems = _load_problems(_write(tmp_path, "dataset.yaml", "datasets: []\n"))
    assert "must end in .toml or .json" in problems["dataset.musubi_config"]


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.toml"
    problems = _load_problems(path)
    assert "does not exist" in problems["dataset.musubi_config"]
    assert str(path) in problems["dataset.musubi_config"]


def test_toml_syntax_error_names_the_line(tmp_path):
    path = _write(tmp_path, "bad.toml", '[general]\nresolution = [960, 544]\ncaption_extension = \n')
    message = _load_problems(path)[str(path)]
    assert "not valid TOML" in message and "line 3" in message


def test_json_syntax_error_names_the_line(tmp_path):
    path = _write(tmp_path, "bad.json", '{\n  "datasets": [\n    {"image_directory": "a",}\n  ]\n}\n')
    message = _load_problems(path)[str(path)]
    assert "not valid JSON" in message and "line 3" in message


def test_top_level_keys_and_missing_datasets(tmp_path):
    path = _write(tmp_path, "top.toml", '[genral]\nresolution = 512\n')
    problems = _load_problems(path)
    assert "did you mean 'general'?" in problems[f"{path}: genral"]
    assert "missing or empty" in problems[f"{path}: datasets"]


def test_problems_in_a_file_are_keyed_by_file_and_key_path(tmp_path):
    path = _write(tmp_path, "d.toml", MUSUBI_TOML.replace('"uniform"', '"random"').replace("batch_size = 1",
                                                                                            "batch_size = 0"))
    problems = _load_problems(path)
    assert problems[f"{path}: datasets[1].frame_extraction"] == (
        "must be one of head, chunk, slide, uniform, full, got 'random'")
    assert problems[f"{path}: general.batch_size"] == "must be an integer >= 1, got 0"
    assert len(problems) == 2


def test_deprecated_keys_are_renamed_with_a_warning(tmp_path, caplog):
    path = _write(tmp_path, "old.toml", '[[datasets]]\nimage_directory = "i"\ncontrol_directory = "c"\n'
                  'flux_kontext_no_resize_control = true\n'
                  '[[datasets]]\nimage_directory = "j"\ncontrol_resolution = 1024\n'
                  'qwen_image_edit_control_resolution = [512, 512]\n')
    with caplog.at_level(logging.WARNING, logger="musubi_pipe.data.dataset_config"):
        _, datasets = load_musubi_config(path)
    assert datasets[0] == {"image_directory": "i", "control_directory": "c", "no_resize_control": True}
    assert datasets[1] == {"image_directory": "j", "control_resolution": 1024}
    warnings = caplog.text
    assert "datasets[0].flux_kontext_no_resize_control is deprecated; read as no_resize_control" in warnings
    assert "qwen_image_edit_control_resolution is deprecated and ignored because control_resolution" in warnings


# --- checks ------------------------------------------------------------------------------------


def test_good_yaml_group_has_no_problems():
    assert check_datasets(EXPECTED_GENERAL, EXPECTED_DATASETS, "dataset") == []
    assert check_datasets(None, [], "dataset") == []


def test_unknown_keys_get_did_you_mean():
    problems = _problems({"resolutoin": 512}, [{"video_directory": "v", "target_frame": [1]}])
    assert problems["dataset.general.resolutoin"] == "unknown key; did you mean 'resolution'?"
    assert problems["dataset.datasets[0].target_frame"] == "unknown key; did you mean 'target_frames'?"


def test_per_dataset_key_in_general():
    problems = _problems({"target_frames": [1], "cache_directory": "c"}, [{"image_directory": "i"}])
    assert "is a per-dataset key; move it into each datasets entry" in problems["dataset.general.target_frames"]
    assert "per-dataset key" in problems["dataset.general.cache_directory"]


def test_keys_of_the_other_kind():
    problems = _problems({}, [{"image_directory": "i", "target_frames": [1, 5]},
                              {"video_directory": "v", "fp_1f_target_index": 9, "image_directory": "i"}])
    assert problems["dataset.datasets[0].target_frames"].startswith(
        "is a video-dataset key but this entry is an image dataset (it sets no video_directory or video_jsonl_file)")
    assert problems["dataset.datasets[1].fp_1f_target_index"].startswith(
        "is an image-dataset key but this entry is a video dataset")
    assert "dataset.datasets[1].image_directory" in problems
    # null is unset, so it cannot be of the wrong kind
    assert _problems({}, [{"image_directory": "i", "target_frames": None}]) == {}


def test_entry_needs_a_source_and_directory_wins_over_jsonl(caplog):
    problems = _problems({}, [{"num_repeats": 2}])
    assert "image_directory or image_jsonl_file" in problems["dataset.datasets[0].image_directory"]
    with caplog.at_level(logging.WARNING, logger="musubi_pipe.data.dataset_config"):
        assert _problems({}, [{"video_directory": "v", "video_jsonl_file": "v.jsonl"}]) == {}
    assert "using video_directory" in caplog.text


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("batch_size", True, "must be an integer >= 1, got True"),
        ("num_repeats", 1.5, "must be an integer >= 1, got 1.5"),
        ("frame_stride", 0, "must be an integer >= 1, got 0"),
        ("resolution", [960], "must be an integer or [width, height]"),
        ("resolution", [960, 0], "got [960, 0]"),
        ("target_frames", [], "must be a non-empty list of frame counts >= 1"),
        ("target_frames", [0, 5], "got [0, 5]"),
        ("source_fps", 0, "must be a number > 0"),
        ("source_fps", "30", "got '30'"),
        ("enable_bucket", "yes", "must be true or false, got 'yes'"),
        ("cache_directory", 3, "must be a path"),
        ("caption_extension", "", "caption file suffix"),
    ],
)
def test_bad_values(key, value, fragment):
    problems = _problems({}, [{"video_directory": "v", key: value}])
    assert fragment in problems[f"dataset.datasets[0].{key}"]


def test_bad_image_values():
    problems = _problems({}, [{"image_directory": "i", "control_resolution": "big", "fp_1f_clean_indices": [0, -1],
                               "fp_1f_target_index": -1}])
    assert "[width, height]" in problems["dataset.datasets[0].control_resolution"]
    assert "list of integers >= 0" in problems["dataset.datasets[0].fp_1f_clean_indices"]
    assert "integer >= 0" in problems["dataset.datasets[0].fp_1f_target_index"]


def test_general_problem_is_reported_once():
    problems = check_datasets({"resolution": "hd"}, [{"image_directory": "a"}, {"video_directory": "b"}], "dataset")
    assert problems == [("dataset.general.resolution",
                         "must be an integer or [width, height], each >= 1 (e.g. [960, 544]), got 'hd'")]


def test_several_problems_at_once():
    problems = _problems({"batch_size": 0, "frame_extraction": "head"},
                         [{"video_directory": "v", "frame_extraction": "random", "fp_1f_no_post": True},
                          {"image_directory": "i", "num_repeat": 2}, "not a table"])
    assert set(problems) == {
        "dataset.general.batch_size",
        "dataset.general.frame_extraction",
        "dataset.datasets[0].frame_extraction",
        "dataset.datasets[0].fp_1f_no_post",
        "dataset.datasets[1].num_repeat",
        "dataset.datasets[2]",
    }


def test_check_entry_takes_an_entry_with_general_merged_in():
    entry = {"video_directory": "v", "resolution": 512, "batch_size": 0, "fp_1f_no_post": True}
    assert dict(check_entry(entry, "dataset.datasets[2]")) == {
        "dataset.datasets[2].batch_size": "must be an integer >= 1, got 0",
        "dataset.datasets[2].fp_1f_no_post": ("is an image-dataset key but this entry is a video dataset (it sets "
                                              "video_directory or video_jsonl_file); remove the key or make the "
                                              "entry an image dataset"),
    }


def test_bad_shapes():
    assert "must be a mapping" in _problems(["x"], [])["dataset.general"]
    assert "must be a list" in _problems({}, {"image_directory": "i"})["dataset.datasets"]


# --- merging -----------------------------------------------------------------------------------


def test_merged_entry_precedence_and_defaults():
    general = {"resolution": 512, "batch_size": 4, "num_repeats": 3, "caption_extension": None}
    entry = {"video_directory": "v", "batch_size": 2, "num_repeats": None, "target_frames": (1, 25)}
    merged = merged_entry(general, entry)
    assert merged["kind"] == "video"
    assert merged["resolution"] == (512, 512)  # general, normalised
    assert merged["batch_size"] == 2  # entry wins
    assert merged["num_repeats"] == 3  # null in the entry is unset
    assert merged["caption_extension"] == ".txt"  # default
    assert merged["target_frames"] == [1, 25]
    assert merged["source_fps"] is None and merged["frame_extraction"] == "head"
    assert set(merged) == set(VIDEO_KEYS) | {"kind"}


def test_merged_image_entry_defaults():
    merged = merged_entry(None, {"image_directory": "i", "control_resolution": [1024, 768]})
    assert merged == {**defaults("image"), "kind": "image", "image_directory": "i",
                      "control_resolution": (1024, 768)}
