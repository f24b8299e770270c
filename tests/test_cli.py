"""The command line as users type it: --cfg job without torch, errors, multirun sharing caches, a real kill."""

import json
import os
import signal
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.pipeline

REPO = Path(__file__).resolve().parents[1]
FAST = ["training.max_train_steps=6", "sampling.steps=2", "runtime.progress=false"]


def _cli(*args, cwd=REPO, **kwargs):
    env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "musubi_pipe", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def test_cfg_job_does_not_import_torch():
    code = (
        "import sys; sys.argv = ['musubi_pipe', '+recipe=demo', '--cfg', 'job'];"
        "from musubi_pipe.__main__ import entry; entry();"
        "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "network_dim: 32" in out.stdout and "task: tiny-t2v" in out.stdout
    assert out.stdout.strip().endswith("NO_TORCH")


RECIPE_REQUIRED = {
    "demo": set(),
    "wan21_t2v_1_3b": {"model.dit", "model.vae", "model.t5", "model.t5_tokenizer", "dataset.datasets"},
    "wan21_t2v_14b": {"model.dit", "model.vae", "model.t5", "model.t5_tokenizer", "dataset.datasets"},
    "wan21_i2v_14b": {"model.dit", "model.vae", "model.t5", "model.t5_tokenizer", "model.clip", "dataset.datasets"},
    "wan22_t2v": {"model.dit", "model.dit_high_noise", "model.vae", "model.t5", "model.t5_tokenizer", "dataset.datasets"},
    "wan22_i2v": {"model.dit", "model.dit_high_noise", "model.vae", "model.t5", "model.t5_tokenizer", "dataset.datasets"},
    "wan22_ti2v_5b": {"model.dit", "model.vae", "model.t5", "model.t5_tokenizer", "dataset.datasets"},
    "hunyuan_video_t2v": {"model.dit", "model.vae", "model.text_encoder1", "model.text_encoder2", "dataset.datasets"},
    "hunyuan_video_tiny": set(),
    "zimage_base": {"model.dit", "model.vae", "model.text_encoder", "dataset.datasets"},
    "zimage_turbo": {"model.dit", "model.vae", "model.text_encoder", "dataset.datasets"},
    "zimage_tiny": set(),
}


def _recipe_command(text: str) -> list[str]:
    """The overrides of the command a recipe's header comment gives (after `python -m musubi_pipe`)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Command:"))
    command = [lines[start].removeprefix("# Command:").strip()]
    for line in lines[start + 1 :]:
        if not line.startswith("#   "):
            break
        command.append(line[4:].rstrip("\\ ").strip())
    words = shlex.split(" ".join(command))
    assert words[:3] == ["python", "-m", "musubi_pipe"]
    return words[3:]


def test_every_recipe_composes_and_requires_exactly_its_files():
    from musubi_pipe.config import compose, recipes_dir
    from musubi_pipe.config.validate import check_structure
    from musubi_pipe.runner import resolve

    names = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
    assert names == sorted(RECIPE_REQUIRED)
    for name in names:
        text = (recipes_dir() / f"{name}.yaml").read_text()
        assert text.splitlines()[1].startswith("# ") and "Command:" in text
        problems = check_structure(resolve(compose([f"+recipe={name}"])))
        assert {key for key, _ in problems} == RECIPE_REQUIRED[name], name
        assert all("is required (???)" in message or "is empty" in message for _, message in problems)
        # the command in the header sets every required value
        assert check_structure(resolve(compose(_recipe_command(text)))) == [], name


def test_bad_input_exits_2_with_the_key(tmp_path):
    out = _cli("+recipe=demo", f"paths.root={tmp_path}", "model=wan21_t2v_14b", "+network.network_dimm=4")
    assert out.returncode == 2
    assert "model.dit: is required" in out.stderr and "network.network_dimm: unknown key" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "cache" / "train").exists()


def test_multirun_shares_caches(tmp_path):
    out = _cli("-m", "+recipe=demo", f"paths.root={tmp_path}", "network.network_dim=4,8", *FAST)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("runs/*_sweep/*/run.json"))]
    assert len(records) == 2
    first, second = ({s["name"]: s for s in r["stages"]} for r in records)
    assert first["train"]["status"] == "ran" and second["train"]["status"] == "ran"
    assert second["cache_latents"]["status"] == "cached" and second["cache_text"]["status"] == "cached"
    assert first["train"]["fingerprint"] != second["train"]["fingerprint"]

    # a fully cached run does not import torch (it would cost more than the whole run)
    argv = ["musubi_pipe", "+recipe=demo", f"paths.root={tmp_path}", "network.network_dim=4", *FAST]
    code = (f"import sys; sys.argv = {argv!r};"
            "from musubi_pipe.__main__ import entry; entry();"
            "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH')")
    warm = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert "train: cached" in warm.stdout and warm.stdout.strip().endswith("NO_TORCH")


def test_loraid_sweep_trains_one_id_per_slice_on_shared_caches(tmp_path):
    out = _cli("-m", "+recipe=demo", f"paths.root={tmp_path}", "network.loraid=1,2", "network.loraid_unit=submodule",
               "network.loraid_units_per_id=3", "dataset.num_slices=2", "dataset.slice=${network.loraid}",
               "pipeline.stages=[cache_latents,cache_text,train]", *FAST)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("runs/*_sweep/*/run.json"))]
    stages = [{s["name"]: s for s in r["stages"]} for r in records]
    assert [s["cache_latents"]["items_total"] for s in stages] == [5, 5]  # every slice uses the whole cache
    assert stages[1]["cache_latents"]["status"] == "cached"
    loras = [r["lora"][0] for r in records]
    from safetensors import safe_open

    allocations = []
    for path in loras:
        with safe_open(path, "pt") as f:
            allocations.append(set(json.loads(f.metadata()["ss_loraid_allocation"])["modules"]))
    assert allocations[0] and allocations[1] and not allocations[0] & allocations[1]


def test_sigterm_records_the_run_as_interrupted(tmp_path):
    """SLURM and `kill` send SIGTERM: the run writes run.json (interrupted, the stage it was in) and exits 143."""
    args = ["+recipe=demo", f"paths.root={tmp_path}", "training.max_train_steps=400", "training.save_every_n_steps=10",
            "pipeline.stages=[cache_latents,cache_text,train]", "runtime.progress=false"]
    proc = subprocess.Popen([sys.executable, "-m", "musubi_pipe", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "cache" / "train" / ".partial"
    try:
        while not list(partial.glob("*/step_*/COMPLETE")) and proc.poll() is None:
            try:
                proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    record = json.loads(next(tmp_path.glob("runs/*/run.json")).read_text())
    assert record["status"] == "interrupted" and "SIGTERM" in record["error"]
    assert [(s["name"], s["status"]) for s in record["stages"]] == [
        ("cache_latents", "ran"), ("cache_text", "ran"), ("train", "failed")]
    log = Path(record["log"]).read_text()
    assert "plan (" in log and "cache_text: ran" in log and "run interrupted" in log


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    import time

    now = time.time()
    taken = []
    for second in range(0, 60):  # every folder this run could claim in the next minute is someone else's
        folder = tmp_path / "runs" / f"{time.strftime('%Y%m%d_%H%M%S', time.localtime(now + second))}_demo"
        folder.mkdir(parents=True)
        (folder / "run.json").write_text('{"mine": true}')
        taken.append(folder)
    out = _cli("+recipe=demo", f"paths.root={tmp_path}", "pipeline.dry_run=true")
    assert out.returncode == 0, out.stderr[-3000:]
    new = [p for p in (tmp_path / "runs").iterdir() if p not in taken]
    assert len(new) == 1 and new[0].name.endswith("_demo_2")
    assert json.loads((new[0] / "run.json").read_text())["status"] == "dry_run"
    assert all(json.loads((p / "run.json").read_text()) == {"mine": True} for p in taken)
    assert [p.name for p in taken[0].iterdir()] == ["run.json"]


def test_typos_on_the_command_line_are_named_with_every_other_problem(tmp_path):
    out = _cli("+recipe=demo", f"paths.root={tmp_path}", "training.max_train_step=5", "model=wan/tiny_i2v_a14",
               "optimizer.lr=abc", "training.max_train_steps=-5")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "not in struct" not in out.stderr
    assert "training.max_train_step: is not a config key; did you mean training.max_train_steps?" in out.stderr
    assert "model: has no option 'wan/tiny_i2v_a14'; did you mean 'wan/tiny_i2v_a14b'?" in out.stderr
    assert "optimizer.lr: must be a float, got str 'abc'" in out.stderr
    assert "training.max_train_steps: the run needs at least 1 step, got -5" in out.stderr
    assert not (tmp_path / "runs").exists()
