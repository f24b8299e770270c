"""Run specs: one YAML or TOML file is a run; --cfg job --save writes one; every run folder holds its own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from musubi_pipe.config import compose
from musubi_pipe.config.spec import read_spec, toml_lines
from musubi_pipe.errors import ConfigError
from musubi_pipe.runner import resolve, run

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, cwd):
    env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "musubi_pipe", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _plan(cfg, run_dir) -> dict:
    record = run(cfg, run_dir)
    return {p["name"]: p["fingerprint"] for p in record["plan"]}


@pytest.mark.pipeline
def test_yaml_and_toml_specs_written_by_cfg_job_compose_and_plan_as_the_recipe(tmp_path, models_dir):
    overrides = ["+recipe=demo", "optimizer.lr=5e-4", "network.network_dim=8", "sampling.negative_prompt=null",
                 "training.save_every_n_steps=null", f"paths.root={tmp_path}", f"paths.models={models_dir}"]
    for suffix in ("toml", "yaml"):
        out = _cli(*overrides, "--cfg", "job", "--save", f"run.{suffix}", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
    toml_text = (tmp_path / "run.toml").read_text()
    assert 'set_null = [\n    "training.save_every_n_steps",' in toml_text  # TOML has no null
    assert 'model = "wan/tiny"' in toml_text and "lr = 0.0005" in toml_text
    expected = resolve(compose(overrides))
    for spec in ("run.toml", "run.yaml"):
        assert resolve(compose([str(tmp_path / spec)])) == expected
    dry = ["pipeline.dry_run=true"]
    plans = [_plan(compose(overrides + dry), tmp_path / "a"),
             _plan(compose([str(tmp_path / "run.toml"), *dry]), tmp_path / "b"),
             _plan(compose([str(tmp_path / "run.yaml"), *dry]), tmp_path / "c")]
    assert plans[0] == plans[1] == plans[2]
    assert all(plans[0][name] for name in ("cache_latents", "cache_text", "train", "sample"))


@pytest.mark.pipeline
def test_a_spec_file_runs_with_overrides_and_sweeps_and_its_run_folder_holds_the_spec(tmp_path, models_dir):
    spec = tmp_path / "my_run.toml"
    spec.write_text(f'''recipe = "demo"
name = "mine"
memory = "none"

[defaults]
optimizer = "adamw"

[paths]
root = "{tmp_path / 'out'}"
models = "{models_dir}"

[network]
network_dim = 4
''')
    out = _cli(str(spec), "pipeline.dry_run=true", "optimizer.lr=1e-3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (run_dir,) = (tmp_path / "out" / "runs").iterdir()
    assert run_dir.name.endswith("_mine")
    config = (run_dir / "config.yaml").read_text()
    assert "network_dim: 4" in config and "lr: 0.001" in config
    written = run_dir / "spec.yaml"
    again = _cli(str(written), "pipeline.dry_run=true", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    second = max((tmp_path / "out" / "runs").iterdir())
    assert second != run_dir and (second / "config.yaml").read_text() == config
    plans = [json.loads((d / "run.json").read_text())["plan"] for d in (run_dir, second)]
    assert plans[0] == plans[1]
    sweep = _cli("-m", str(spec), "pipeline.dry_run=true", "network.network_dim=2,6", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr
    jobs = sorted(p for p in (tmp_path / "out" / "runs").glob("*_mine_sweep/*") if p.is_dir())
    dims = sorted(int(line.split(":")[1]) for job in jobs for line in (job / "config.yaml").read_text().splitlines()
                  if line.strip().startswith("network_dim:"))
    assert dims == [2, 6]


def test_errors_name_the_spec_file_and_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('recipe = "demo"\n\n[paths]\nroot = "/tmp/x"\n\n[training]\nmax_train_stepz = 5\n'
                   'save_every_n_steps = "often"\n')
    out = _cli(str(bad), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "training.max_train_stepz: unknown key; did you mean 'max_train_steps'? (bad.toml line 7)" in out.stderr
    assert "training.save_every_n_steps: must be a int, got str 'often' (bad.toml line 8)" in out.stderr
    assert "Traceback" not in out.stderr

    yaml = tmp_path / "bad.yaml"
    yaml.write_text("recipe: demo\ndefaults:\n  memory: 24gbb\n")
    out = _cli(str(yaml), cwd=tmp_path)
    assert out.returncode == 2
    assert "memory: has no option '24gbb'; did you mean '24gb'?" in out.stderr and "(bad.yaml line 3)" in out.stderr

    broken = tmp_path / "broken.toml"
    broken.write_text('recipe = "demo"\n[training\n')
    out = _cli(str(broken), cwd=tmp_path)
    assert out.returncode == 2 and "is not valid TOML" in out.stderr and "line 2" in out.stderr

    out = _cli(str(bad), "+recipe=demo", cwd=tmp_path)
    assert out.returncode == 2 and "name a base recipe inside it (recipe: NAME)" in out.stderr


def test_group_choices_read_in_every_spelling(tmp_path):
    forms = {
        "a.yaml": "defaults:\n  model: wan/tiny\n  memory: 24gb\n",
        "b.yaml": "defaults:\n  - override /model: wan/tiny\n  - memory: 24gb\n",
        "c.yaml": "model: wan_tiny\nmemory: 24gb\n",  # the old flat model name is rewritten, as on the command line
        "d.toml": 'model = "wan/tiny"\n[defaults]\nmemory = "24gb"\n',
    }
    for name, text in forms.items():
        (tmp_path / name).write_text(text)
        spec = read_spec(tmp_path / name)
        assert spec.choices == {"model": "wan/tiny", "memory": "24gb"}, name
        cfg = compose([str(tmp_path / name)])
        assert cfg.model.task == "tiny-t2v" and cfg.memory.preset == "24gb", name
    (tmp_path / "e.yaml").write_text("defaults:\n  modle: wan/tiny\n")
    with pytest.raises(ConfigError, match="defaults.modle"):
        read_spec(tmp_path / "e.yaml")


def test_toml_lines_finds_tables_keys_and_skips_multiline_values():
    text = '''name = "x"  # a comment
[training]
max_train_steps = 5
prompts = [
  "a = b",
  { x = 1 },
]
seed = 3
[[dataset.datasets]]
image_directory = "/d"
[model]
"dit" = "a.safetensors"
sampling.width = 64
'''
    lines = toml_lines(text)
    assert lines == {"name": 1, "training": 2, "training.max_train_steps": 3, "training.prompts": 4,
                     "training.seed": 8, "dataset.datasets": 9, "dataset.datasets.image_directory": 10,
                     "model": 11, "model.dit": 12, "model.sampling.width": 13}
