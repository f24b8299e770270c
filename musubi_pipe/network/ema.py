"""Post-hoc EMA of LoRA checkpoints: average the intermediate files of one training run into one LoRA.

musubi-tuner's `lora_post_hoc_ema.py`, with the same arithmetic; `python -m musubi_pipe.tools ema`
is its command line, `post_hoc_ema()` + `save_lora_file()` its Python form.

The files c_0, c_1, ..., c_{N-1} (in training order) are folded into one state:

    state_0 = c_0                                   (floating-point tensors upcast to float32)
    state_i = β_i · state_{i-1} + (1 − β_i) · c_i   for i = 1 .. N−1

so file k ends up with weight w_k = (1 − β_k) · Π_{j>k} β_j (β_0 := 0), and the weights sum to 1
(`ema_weights`). The decays β_i come from one of two schedules (`ema_betas`):

- constant / linear: β_i = beta + (beta2 − beta) · (i − 1)/(N − 2), from beta at the first merge to
  beta2 at the last (beta2 defaults to beta: constant; with a single merge, β_1 = beta).
  A higher β keeps more of the earlier checkpoints.
- power-function EMA (Karras et al. 2023, "Analyzing and Improving the Training Dynamics of
  Diffusion Models", arXiv 2312.02696, Algorithm 2), chosen by sigma_rel, the width of the
  averaging profile relative to the run's length: γ is the largest non-negative real root of

      γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0          (`power_ema_gamma`)

  and β_i = (1 − 1/t)^(γ+1) with t = i, the 1-based index of the merge, exactly as musubi-tuner
  counts. So β_1 = 0: the first file is replaced outright by the second and gets weight 0; it only
  supplies the layout (keys, `.alpha`, non-float tensors, dtypes). The average runs over files
  2..N with weights growing like t^γ (γ = 0: plain mean of files 2..N). sigma_rel must lie in
  (0, 1/√12 ≈ 0.2887]: beyond that the cubic has no non-negative root (1/√12 is the uniform
  average). Smaller sigma_rel = narrower average, closer to the last file: 0.2 → γ ≈ 1.83,
  0.1 → γ ≈ 6.94.

Rules:
- Order: by the training step in each file's metadata (`ss_steps`; when some file lacks it, by
  `ss_epoch` if every file has that). musubi-tuner sorts by file modification time instead, which
  is wrong after copying or downloading files. Two files at the same step are an error (two runs,
  or the two experts of a Wan2.2 run). `sort=False` (`--no_sort`) keeps the given order.
- All files must hold the same tensor names and shapes, `.alpha` tensors must be equal (they are
  copied, not averaged), and the files must come from the same kind of network (`ss_network_module`,
  `ss_base_model_version`), the same Wan2.2 expert(s) (`ss_experts`) and the same LORAID ids and
  allocation (`ss_loraid`). Non-float tensors come from the first file; every tensor gets back the
  first file's dtype (bf16 in -> bf16 out).
- Metadata: the last file's, plus `ss_ema` (JSON: method, beta/beta2 or sigma_rel and gamma, the
  order, steps, file names, betas and weights) and `ss_steps` = the last step; `save_lora_file`
  recomputes the `sshs_*` hashes.
"""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from musubi_pipe.errors import UserError
from musubi_pipe.models.files import safetensors_header
from musubi_pipe.network.lora_file import load_lora_file

# The widest power-function profile: sigma_rel of a uniform average (γ = 0).
SIGMA_REL_MAX = 12 ** -0.5
# Metadata that must agree across the averaged files: (key, what it names, whether "absent" is a value of its own).
IDENTITY_KEYS = (
    ("ss_network_module", "network kinds", False),
    ("ss_base_model_version", "architectures", False),
    ("ss_experts", "Wan2.2 experts", True),
    ("ss_loraid", "LORAID ids or allocations", True),
)


@dataclass
class Checkpoint:
    """One LoRA file as its header describes it: metadata and {tensor name: shape}."""

    path: Path
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]


# -- schedules ---------------------------------------------------------------------------------
def power_ema_gamma(sigma_rel: float) -> float:
    """Return γ for `sigma_rel`: the largest non-negative real root of the Algorithm 2 cubic.

    Raises UserError unless 0 < sigma_rel <= 1/√12 (≈ 0.2887), the range with such a root.
    """
    import numpy as np

    if not 0 < sigma_rel <= SIGMA_REL_MAX + 1e-12:
        raise UserError(f"sigma_rel={sigma_rel} is outside (0, {SIGMA_REL_MAX:.4f}]: the power-function EMA has no "
                        "γ >= 0 there (1/√12 is already a uniform average); typical values are 0.1-0.25")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    real = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real >= -1e-9]
    return max(0.0, max(real))


def ema_betas(n: int, beta: float = 0.95, beta2: float | None = None, sigma_rel: float | None = None) -> list[float]:
    """Return β_1 .. β_{n−1}, the decay of each merge when averaging `n` checkpoint files.

    sigma_rel (power-function EMA) overrides beta/beta2; otherwise β goes linearly from beta to
    beta2 (default: beta, constant). Raises UserError for n < 2 or a beta outside [0, 1].
    """
    if n < 2:
        raise UserError(f"post-hoc EMA needs at least two checkpoint files, got {n}")
    merges = n - 1
    if sigma_rel is not None:
        gamma = power_ema_gamma(sigma_rel)
        return [(1 - 1 / t) ** (gamma + 1) for t in range(1, merges + 1)]
    beta2 = beta if beta2 is None else beta2
    for name, value in (("beta", beta), ("beta2", beta2)):
        if not 0 <= value <= 1:
            raise UserError(f"{name}={value} must lie in [0, 1] (the share of the running average kept at each merge)")
    if merges == 1:
        return [beta]
    return [beta + (beta2 - beta) * i / (merges - 1) for i in range(merges)]


def ema_weights(betas: Sequence[float]) -> list[float]:
    """Return the weight of each of the len(betas) + 1 files in the final average (they sum to 1)."""
    weights = [1.0]
    for beta in betas:
        weights = [w * beta for w in weights] + [1 - beta]
    return weights


# -- files and order ---------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read the header of the LoRA file `path` (no tensor data). Raises UserError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: LoRA file not found")
    try:
        header = safetensors_header(path)
    except (OSError, ValueError, struct.error) as e:
        raise UserError(f"{path}: not a readable .safetensors LoRA file ({e})") from e
    metadata = dict(header.pop("__metadata__", None) or {})
    return Checkpoint(path, metadata, {name: tuple(info["shape"]) for name, info in header.items()})


def _int_metadata(ckpt: Checkpoint, key: str) -> int | None:
    value = ckpt.metadata.get(key)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{ckpt.path}: metadata {key}={value!r} is not an integer; "
                        "pass the files in training order with --no_sort") from None


def _sort_key(ckpts: Sequence[Checkpoint]) -> str:
    """"ss_steps" if every file records it, else "ss_epoch" if every file records that; else UserError."""
    lacking = {key: [c.path.name for c in ckpts if _int_metadata(c, key) is None] for key in ("ss_steps", "ss_epoch")}
    for key in ("ss_steps", "ss_epoch"):
        if not lacking[key]:
            return key
    raise UserError(f"cannot order the files by training step: {', '.join(lacking['ss_steps'])} record no ss_steps "
                    f"and {', '.join(lacking['ss_epoch'])} no ss_epoch metadata; pass the files oldest first "
                    "with --no_sort (sort=False)")


def _ordered(ckpts: Sequence[Checkpoint]) -> tuple[list[tuple[Checkpoint, int]], str]:
    key = _sort_key(ckpts)
    order = sorted(((c, _int_metadata(c, key)) for c in ckpts), key=lambda item: item[1])
    for (a, step_a), (b, step_b) in zip(order, order[1:]):
        if step_a == step_b:
            raise UserError(f"{a.path} and {b.path} both record {key}={step_a}: files of two runs, or the final "
                            "LoRA next to the checkpoint of its last step? Pass each checkpoint of one run once")
    return order, key


def order_checkpoints(paths: Sequence[str | Path]) -> list[tuple[Path, int]]:
    """Return [(path, step)] in training order, by each file's `ss_steps` metadata (`ss_epoch` as fallback).

    Unlike musubi-tuner (file modification time) the order survives copying. Raises UserError for
    a file without either key (naming it; use --no_sort), or two files at the same step.
    """
    order, _ = _ordered([read_checkpoint(p) for p in paths])
    return [(c.path, step) for c, step in order]


def collect_checkpoints(args: Sequence[str | Path], exclude: Sequence[str | Path] = ()) -> tuple[list[Path], list[str]]:
    """Expand the command-line arguments into LoRA files; return (files, notes on what a folder skipped).

    A file is taken as given. A run folder stands for its lora_checkpoints/ and lora/ folders, and a run's
    lora_checkpoints/ brings its lora/ along (the final LoRA). A folder stands for its `*.safetensors` files
    (not recursive) except:
    files without `ss_steps` metadata (final or converted LoRAs of unknown step), earlier EMA results
    (`ss_ema`), the paths in `exclude` (the output), and a second file with the same step and the
    same tensors (`sshs_model_hash`) as another, as when the last step's checkpoint equals the final LoRA.
    """
    excluded = {Path(p).resolve() for p in exclude}
    files: list[Path] = []
    notes: list[str] = []
    seen: dict[tuple[str, str], Path] = {}
    for arg, implied in _run_folders(map(Path, args), notes):
        if not arg.is_dir():
            files.append(arg)
            continue
        found = 0
        for path in sorted(arg.glob("*.safetensors")):
            meta = read_checkpoint(path).metadata
            twin_key = (meta.get("ss_steps"), meta.get("sshs_model_hash", path.name))
            if path.resolve() in excluded:
                reason = "the output file"
            elif "ss_steps" not in meta:
                reason = "no ss_steps metadata"
            elif "ss_ema" in meta:
                reason = "an earlier EMA result (ss_ema)"
            elif twin_key in seen:
                reason = f"same step and tensors as {seen[twin_key].name}"
            else:
                seen[twin_key] = path
                files.append(path)
                found += 1
                continue
            notes.append(f"skipped {path} ({reason})")
        if not found and not implied:
            raise UserError(f"{arg}: no LoRA file with ss_steps metadata in this folder; name the files instead")
    return files, notes


def _run_folders(args, notes: list[str]):
    """(path, implied) pairs: a musubi_pipe run folder (it holds run.json) stands for its lora_checkpoints/ and
    lora/ folders, and a run's lora_checkpoints/ brings the final LoRA of lora/ along (implied: True), so the
    last steps of training are never left out of the average."""
    for arg in args:
        run = arg if (arg / "run.json").is_file() else arg.parent if arg.name == "lora_checkpoints" and \
            (arg.parent / "run.json").is_file() else None
        if run is None:
            yield arg, False
            continue
        if arg == run:
            yield from ((run / name, name == "lora") for name in ("lora_checkpoints", "lora") if (run / name).is_dir())
        else:
            yield arg, False
            if (run / "lora").is_dir():
                notes.append(f"added the run's final LoRA from {run / 'lora'} (name the files to leave it out)")
                yield run / "lora", True


# -- checks ------------------------------------------------------------------------------------
def _check_same_files(ckpts: Sequence[Checkpoint]) -> None:
    """Raise UserError unless every file has the same identity metadata, tensor names and shapes."""
    for key, what, absent_counts in IDENTITY_KEYS:
        values = [(c.path.name, c.metadata.get(key)) for c in ckpts]
        distinct = {v for _, v in values if absent_counts or v is not None}
        if len(distinct) > 1:
            listing = "; ".join(f"{name}: {value if value is not None else '(none)'}" for name, value in values)
            raise UserError(f"files of different {what} cannot be averaged ({key} differs: {listing}); "
                            "pass the checkpoints of one training run")
    first = ckpts[0]
    for other in ckpts[1:]:
        only_first = sorted(first.shapes.keys() - other.shapes.keys())
        only_other = sorted(other.shapes.keys() - first.shapes.keys())
        if only_first or only_other:
            raise UserError(f"{first.path.name} and {other.path.name} hold different tensors (another network kind, "
                            f"dim layout or target set?): only in {first.path.name}: {_few(only_first)}; only in "
                            f"{other.path.name}: {_few(only_other)}")
        for key, shape in first.shapes.items():
            if other.shapes[key] != shape:
                raise UserError(f"{key} has shape {list(shape)} in {first.path.name} but {list(other.shapes[key])} in "
                                f"{other.path.name} (another network_dim?); pass the checkpoints of one training run")
    fingerprints = {c.metadata.get("ss_training_fingerprint") for c in ckpts} - {None}
    if len(fingerprints) > 1:
        warnings.warn("the files come from different training runs (ss_training_fingerprint differs); averaging anyway",
                      stacklevel=3)


def _few(names: list[str], limit: int = 5) -> str:
    if not names:
        return "(none)"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _same_alpha(kept: torch.Tensor, value: torch.Tensor) -> bool:
    if kept.is_floating_point() and value.is_floating_point():
        return torch.equal(kept, value.to(torch.float32))
    return torch.equal(kept, value)


# -- the average -------------------------------------------------------------------------------
def post_hoc_ema(
    paths: Sequence[str | Path],
    *,
    beta: float = 0.95,
    beta2: float | None = None,
    sigma_rel: float | None = None,
    sort: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Average the LoRA files `paths` with post-hoc EMA; return (tensors, metadata) for save_lora_file.

    sort=True orders the files by their ss_steps (ss_epoch) metadata, sort=False keeps `paths` as
    given (oldest first). `log`, when given, receives the order and betas line by line. Raises
    UserError for fewer than two files, a file given twice, files that cannot be ordered (sort=True)
    or that differ in tensors, `.alpha` values, network kind, Wan2.2 expert or LORAID allocation.
    """
    ckpts = [read_checkpoint(p) for p in paths]
    resolved = [c.path.resolve() for c in ckpts]
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            raise UserError(f"{ckpts[i].path} is given twice; pass each checkpoint once")
    betas = ema_betas(len(ckpts), beta, beta2, sigma_rel)
    _check_same_files(ckpts)
    if sort:
        order, order_by = _ordered(ckpts)
    else:
        order, order_by = [(c, _int_metadata(c, "ss_steps")) for c in ckpts], "arguments"
    description = _describe(order, order_by, betas, beta, beta2, sigma_rel)
    if log is not None:
        _log_plan(log, description, [c.path for c, _ in order])
    tensors = _average([c.path for c, _ in order], betas)
    metadata = {k: v for k, v in order[-1][0].metadata.items() if not k.startswith("sshs_")}
    metadata["ss_ema"] = json.dumps(description)
    if order[-1][1] is not None and order_by != "ss_epoch":
        metadata["ss_steps"] = str(order[-1][1])
    return tensors, metadata


def _average(paths: Sequence[Path], betas: Sequence[float]) -> dict[str, torch.Tensor]:
    """state ← β·state + (1 − β)·ckpt over the files in order (float32); dtypes restored to the first file's."""
    first, _ = load_lora_file(paths[0])
    dtypes = {key: value.dtype for key, value in first.items()}
    state = {key: value.to(torch.float32) if value.is_floating_point() else value for key, value in first.items()}
    for path, beta in zip(paths[1:], betas):
        tensors, _ = load_lora_file(path)
        for key, value in tensors.items():
            if key.endswith(".alpha"):
                if not _same_alpha(state[key], value):
                    raise UserError(f"{key} is {state[key].tolist()} in {paths[0].name} but {value.tolist()} in "
                                    f"{path.name}: files trained with another network_alpha cannot be averaged")
            elif value.is_floating_point():
                # musubi-tuner's expression, in this order, so the result is bit for bit the same
                state[key] = state[key] * beta + value.to(torch.float32) * (1 - beta)
    return {key: value.to(dtypes[key]) for key, value in state.items()}


def _describe(order, order_by: str, betas: Sequence[float], beta: float, beta2: float | None,
              sigma_rel: float | None) -> dict:
    """The `ss_ema` metadata: how the average was made, from which files."""
    if sigma_rel is not None:
        method = {"method": "power", "sigma_rel": sigma_rel, "gamma": power_ema_gamma(sigma_rel)}
    elif beta2 is None or beta2 == beta:
        method = {"method": "constant", "beta": beta}
    else:
        method = {"method": "linear", "beta": beta, "beta2": beta2}
    return {
        **method,
        "order_by": order_by,
        "steps": [step for _, step in order],
        "files": [c.path.name for c, _ in order],
        "betas": list(betas),
        "weights": ema_weights(betas),
    }


def _log_plan(log: Callable[[str], None], description: dict, paths: Sequence[Path]) -> None:
    method = description["method"]
    if method == "power":
        how = f"power-function EMA, sigma_rel={description['sigma_rel']:g}, gamma={description['gamma']:.4f}"
    elif method == "linear":
        how = f"beta {description['beta']:g} -> {description['beta2']:g}"
    else:
        how = f"beta {description['beta']:g}"
    order_by = "as given (--no_sort)" if description["order_by"] == "arguments" else f"by {description['order_by']}"
    log(f"post-hoc EMA of {len(paths)} files ({how}), ordered {order_by}:")
    log(f"  {'step':>9}  {'beta':>6}  {'weight':>6}  file")
    betas = [None, *description["betas"]]
    for path, step, b, weight in zip(paths, description["steps"], betas, description["weights"]):
        step_text = "?" if step is None else str(step)
        beta_text = "start" if b is None else f"{b:.4f}"
        log(f"  {step_text:>9}  {beta_text:>6}  {weight:6.4f}  {path}")
    if method == "power":
        log("  (β_1 = 0 as in musubi-tuner: the first file only provides the layout and gets weight 0)")
