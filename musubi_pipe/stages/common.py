"""Plan-time helpers the stages share: the dataset scan, item keys, devices and dtypes, item files.

Item keys are content addresses: the sha256 of everything that determines an item entry (the
media file's digest, clip start and length, bucket, fps conversion, the encoder's identity, file
digests and dtype). Entries live in the store's `items/` folder, shared by every run and recipe.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict

from musubi_pipe.errors import ConfigError
from musubi_pipe.models import get_family
from musubi_pipe.pipeline.fingerprint import fingerprint
from musubi_pipe.pipeline.stage import Job

log = logging.getLogger("musubi_pipe")

LATENT_FORMAT = 1  # bump when the stored latent layout changes
TEXT_FORMAT = 1
TEXT_KIND = "text"  # the store's item kind of text embeddings
TEXT_BATCH = 8  # texts per text-encoder call


def family(job: Job):
    return get_family(job.cfg["model"]["arch"])


def model_cfg(job: Job) -> dict:
    return job.cfg["model"]


def dataset_scan(job: Job):
    """Return (items, skips) of every dataset, scanned once per run (headers only, no decoding)."""
    return job.cached("dataset_scan", lambda: _scan(job))


def _scan(job: Job):
    from musubi_pipe.data.dataset_config import entry_where
    from musubi_pipe.data.sources import scan_dataset

    dataset = job.cfg["dataset"]
    general = dataset.get("general") or {}
    if not dataset.get("datasets"):
        raise ConfigError([("dataset.datasets", "is empty; add an image_directory or video_directory entry")])
    items, skips, problems = [], [], []
    geometry = family(job).geometry(model_cfg(job))
    for index, entry in enumerate(dataset["datasets"]):
        merged = {**general, **{key: value for key, value in entry.items() if value is not None}}
        try:
            found, skipped = scan_dataset(merged, index, geometry.fps, entry_where(dataset, index),
                                          bucket_step=geometry.pixel_multiple)
        except ConfigError as err:
            problems.extend(err.problems)
            continue
        items.extend(found)
        skips.extend(skipped)
        _log_dataset(entry_where(dataset, index), found, skipped)
    if problems:
        raise ConfigError(problems)
    if skips and dataset.get("strict"):
        raise ConfigError([(s.path, f"{s.reason} (dataset.strict=true; set it to false to skip such items)")
                           for s in skips])
    if not items:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in skips[:5])
        raise ConfigError([("dataset.datasets", f"no usable items ({len(skips)} skipped: {reasons})")])
    for skip in skips:
        log.warning("skipping %s: %s", skip.path, skip.reason)
    with_controls = sum(1 for item in items if item.controls)
    if with_controls and not uses_controls(job):
        log.warning("%d item(s) have control media, but model.task=%s does not train with controls: they are "
                    "not encoded", with_controls, model_cfg(job).get("task"))
    return items, skips


def _log_dataset(where: str, items, skips) -> None:
    """One line per dataset: how many items and skips, and the items per bucket (w x h x frames)."""
    from collections import Counter

    buckets = Counter(f"{i.bucket[0]}x{i.bucket[1]}x{i.frames}" for i in items)
    shown = ", ".join(f"{name}: {n}" for name, n in sorted(buckets.items()))
    log.info("%s: %d item(s), %d skipped; buckets %s", where, len(items), len(skips), shown or "none")


def resolve_device(job: Job) -> str:
    """Return the device named by runtime.device (auto: cuda when available, else cpu).

    With several processes on GPUs, `cuda` means this process's own GPU (cuda:<local rank>).
    """
    wanted = job.cfg.get("runtime", {}).get("device", "auto")
    device = _probe(job)["device"] if wanted == "auto" else wanted
    if device == "cuda" and job.dist.active:
        return f"cuda:{job.dist.local_rank}"
    return device


def resolve_dtype(job: Job, key: str) -> str:
    """Return the dtype name for a `model.*_dtype` key (auto: bfloat16 on a bf16 GPU, else float32).

    The resolved name, not "auto", enters fingerprints: it changes the numbers.
    """
    value = job.cfg["model"].get(key, "auto")
    if value != "auto":
        return value
    device = resolve_device(job)
    return "bfloat16" if device.startswith("cuda") and _probe(job)["bf16"] else "float32"


def _probe(job: Job) -> dict:
    """What the machine offers: {"device": "cuda"|"cpu", "bf16": bool}.

    Asking torch costs a 1.5 s import, which would dominate a fully cached run, so the answer is
    remembered per machine boot and CUDA_VISIBLE_DEVICES (GPUs do not change without a reboot).
    """
    return job.cached("device_probe", lambda: _remembered_probe(job.store.root / "device_probe.json"))


def _remembered_probe(path) -> dict:
    import json
    import socket

    try:
        boot_id = open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        boot_id = None  # no boot id: never trust a remembered answer
    key = [socket.gethostname(), boot_id, os.environ.get("CUDA_VISIBLE_DEVICES")]
    try:
        known = json.loads(path.read_text())
        if boot_id and known["key"] == key:
            return known["probe"]
    except (OSError, ValueError, KeyError):
        pass
    import torch

    cuda = torch.cuda.is_available()
    probe = {"device": "cuda" if cuda else "cpu", "bf16": bool(cuda and torch.cuda.is_bf16_supported())}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "probe": probe}))
    os.replace(tmp, path)
    return probe


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def weight_digests(job: Job, part: str, expert: str = "") -> list[str]:
    """Return the content digests of the files that determine `part` ("vae", "text", "dit" of `expert`)."""
    files = family(job).weight_files(model_cfg(job), part, expert)
    return [job.digests.digest(path) for path in files]


def encoder_document(job: Job, part: str, dtype_key: str) -> dict:
    """Return what identifies an encoder: its settings, file digests and resolved dtype."""
    return {
        "identity": family(job).encoder_identity(model_cfg(job), part),
        "files": weight_digests(job, part),
        "dtype": resolve_dtype(job, dtype_key),
    }


def dit_document(job: Job, experts) -> dict:
    """What identifies the DiT weights a stage computes with: each expert's file digests, the dtype and,
    only when set (older fingerprints stay valid), how memory.fp8_base stores them."""
    doc = {
        "files": {e.name: weight_digests(job, "dit", e.name) for e in experts},
        "dtype": resolve_dtype(job, "dit_dtype"),
    }
    memory = job.cfg["memory"]
    if memory.get("fp8_base"):
        doc["fp8"] = "scaled" if memory.get("fp8_scaled") else "plain"
    return doc


def text_fp8(job: Job) -> bool:
    """Whether the text encoder is stored in fp8: memory.fp8_text_encoder, or the family's musubi-tuner name for it
    (memory.fp8_t5 for Wan, fp8_llm for HunyuanVideo). Either gives the same text-cache keys."""
    from musubi_pipe.memory.settings import text_encoder_fp8

    return text_encoder_fp8(job.cfg["memory"], family(job))


def latent_key(job: Job, item) -> str:
    """Return the content address of an item's latent entry.

    Control media enter the key only for a task that encodes them (Family.uses_controls).
    """
    doc = {
        "format": LATENT_FORMAT,
        "media": media_digest(job, item.media_path),
        "start": item.start,
        "frames": item.frames,
        "bucket": list(item.bucket),
        "source_fps": item.source_fps,
        "target_fps": item.target_fps,
        "vae": job.cached("vae_doc", lambda: encoder_document(job, "vae", "vae_dtype")),
    }
    if item.controls and uses_controls(job):
        doc["controls"] = [[media_digest(job, c), list(b)] for c, b in zip(item.controls, item.control_buckets)]
    return fingerprint(doc)


def uses_controls(job: Job) -> bool:
    return family(job).uses_controls(model_cfg(job))


def media_digest(job: Job, path: str) -> str:
    """Content digest of a media file, or of a folder of frame images (a video given as frames)."""
    if os.path.isfile(path):
        return job.digests.digest(path)
    names = sorted(os.listdir(path))
    return fingerprint([[n, job.digests.digest(os.path.join(path, n))] for n in names])


def text_key(job: Job, text: str) -> str:
    """Return the content address of a text's embedding entry."""
    doc = {
        "format": TEXT_FORMAT,
        "text": text,
        "encoder": text_document(job),
    }
    return fingerprint(doc)


def text_dtype_key(job: Job) -> str:
    """The model.* key holding the text encoders' dtype (Family.text_dtype_key, e.g. Wan's t5_dtype)."""
    return family(job).text_dtype_key


def text_document(job: Job) -> dict:
    """What identifies the text encoders (encoder_document of part "text"), computed once per job."""
    def document():
        doc = encoder_document(job, "text", text_dtype_key(job))
        return dict(doc, fp8=True) if text_fp8(job) else doc  # only when set: older entries stay valid

    return job.cached("text_doc", document)


def text_entry(job: Job, key: str, device=None, dtype=None) -> dict:
    """A text's cached embedding tensors ({name: tensor}, as TextEncoder.encode made them), floating ones
    moved to `device` and cast to `dtype` when given."""
    from safetensors.torch import load_file

    tensors = load_file(str(job.store.item_path(TEXT_KIND, key)))
    if device is None and dtype is None:
        return tensors
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in tensors.items()}


def item_record(item) -> dict:
    """Return an item as JSON-ready data for stage indexes."""
    record = asdict(item)
    record["bucket"] = list(item.bucket)
    record["source_size"] = list(item.source_size)
    record["controls"] = list(item.controls)
    record["control_buckets"] = [list(b) for b in item.control_buckets]
    record["key"] = item.key
    return record


def unusable_items(job: Job, kind: str, keys) -> str | None:
    """Why an item index cannot be used: some of its entries are gone from the store (e.g. removed by gc) or
    were found corrupt (Store.has_item moves those aside, so the stage recomputes exactly them)."""
    keys = set(keys)
    present = {key for key in keys if job.store.item_path(kind, key).is_file()}
    corrupt = sum(1 for key in present if not job.store.has_item(kind, key))
    missing = len(keys) - len(present)
    parts = ([f"{corrupt} cached {kind} item(s) corrupt (moved aside)"] if corrupt else []) + \
            ([f"{missing} cached {kind} item(s) missing from the store"] if missing else [])
    return "; ".join(parts) or None


def upstream_stats(ctx, name: str) -> dict:
    """The stats an upstream stage recorded in its manifest (e.g. train's outputs and lora_experts)."""
    import json

    return json.loads((ctx.upstream_dirs[name] / "manifest.json").read_text())["stats"]


def sample_texts(job: Job) -> list[str]:
    """Return the sampling prompts and negative prompts (the task's default where unset) that cache_text must encode."""
    from musubi_pipe.sampling.settings import prompt_settings

    texts = []
    for prompt in prompt_settings(job.cfg["sampling"], sampling_defaults(job)):
        texts += [prompt["prompt"], prompt["negative_prompt"]]
    return texts


def sampling_defaults(job: Job) -> dict:
    return family(job).sampling_defaults(model_cfg(job))


def sampling_inputs(job: Job) -> dict:
    """What sampled media depend on besides the LoRA and the prompts' text entries: the DiT weights, the model
    settings, the task's sampling defaults, the VAE and the conditioning media (sample and generate stages)."""
    from musubi_pipe.sampling.settings import prompt_settings

    fam, model = family(job), model_cfg(job)
    return {
        "dit": dit_document(job, fam.experts(model)),
        "model": fam.training_identity(model),
        "defaults": sampling_defaults(job),
        "vae": job.cached("vae_doc", lambda: encoder_document(job, "vae", "vae_dtype")),
        **conditioning_media(job, prompt_settings(job.cfg["sampling"])),
    }


def conditioning_media(job: Job, prompts: list[dict]) -> dict:
    """Digests of the prompts' start images and video-to-video inputs (part of what their samples depend on)."""
    images = sorted({p["image"] for p in prompts if p["image"]})
    videos = sorted({p["video"] for p in prompts if p.get("video")})
    media = {"images": {path: job.digests.digest(path) for path in images}}
    if videos:  # only when used: a run without video-to-video keeps the fingerprints it had before the feature
        media["videos"] = {path: media_digest(job, path) for path in videos}
    return media


def encode_texts(job: Job, texts: list[str], force: bool = False, progress: bool = True) -> tuple[dict[str, str], int]:
    """Make sure every text has its entry in the store (this process's share, with several); return
    ({text: entry key}, how many were encoded here and elsewhere). Used by cache_text and generate."""
    import torch

    from musubi_pipe.progress import progress_bar

    keys = {text: text_key(job, text) for text in texts}
    todo = [t for t in texts if force or not job.store.has_item(TEXT_KIND, keys[t])]
    mine = job.dist.shard(todo)  # several processes: each encodes its share
    if mine:
        device = resolve_device(job)
        dtype = torch_dtype(resolve_dtype(job, text_dtype_key(job)))
        encoder = family(job).load_text_encoder(model_cfg(job), device, dtype, fp8=text_fp8(job))
        batches = [mine[i : i + TEXT_BATCH] for i in range(0, len(mine), TEXT_BATCH)]
        with torch.no_grad():
            for batch in progress_bar(batches, desc="text encoder", disable=not (progress and job.dist.main)):
                for text, tensors in zip(batch, encoder.encode(batch)):
                    stored = {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in tensors.items()}
                    job.store.save_item(TEXT_KIND, keys[text], stored)
        del encoder
    return keys, len(todo)
