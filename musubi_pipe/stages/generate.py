"""generate: sample prompts with any LoRA files, no training and no dataset needed.

    python -m musubi_pipe +recipe=wan21_t2v_14b pipeline.stages=[generate] ... \\
        'sampling.loras=[{path: /loras/style.safetensors, multiplier: 0.8}, {path: /loras/char.safetensors}]' \\
        sampling.prompt_file=prompts.txt sampling.output_type=both

Prompts come from `sampling.prompts` and `sampling.prompt_file` (musubi-tuner's inline syntax, see
sampling.prompts), with the same per-prompt settings as the sample stage. Their embeddings use the
store's text entries (the text encoder runs only for texts not encoded before). Each LoRA entry is
`{path, multiplier (1.0), expert (both | high | low; Wan2.2 A14B), include_patterns, exclude_patterns}`;
the patterns pick modules of that file as musubi-tuner's inference filter does (include narrows,
exclude removes; unlike training's rule, where include only re-admits excluded modules; full match on
the official module path). LoRAs are applied as hooks, unmerged; `sampling.merge_loras=true`
merges them into the DiT weights instead (faster steps, same result up to rounding). Two LoRAs that
touch the same modules are reported with a warning listing them.

`sampling.output_type`: video (png for one frame, mp4 for more; the default), images (a folder of
png frames per prompt), latent (the latents only), both (media and latents). `sampling.latents`
(a list of saved `*.safetensors` latents, e.g. from an earlier run) decodes those instead of sampling.
"""

from __future__ import annotations

import logging

from musubi_pipe.pipeline.stage import Job, Stage, StageContext
from musubi_pipe.sampling.settings import prompt_settings
from musubi_pipe.stages import common

log = logging.getLogger("musubi_pipe")


def _prompts(job: Job) -> list[dict]:
    return prompt_settings(job.cfg["sampling"], common.sampling_defaults(job))


def inputs(job: Job) -> dict:
    sampling = job.cfg["sampling"]
    doc = common.sampling_inputs(job)
    doc["loras"] = [dict(entry, path=job.digests.digest(entry["path"])) for entry in sampling.get("loras") or []]
    doc["latents"] = [job.digests.digest(path) for path in sampling.get("latents") or []]
    if not sampling.get("latents"):
        doc["text"] = common.text_document(job)
    return doc


def _lora_network(family, dit, entry: dict, key: str):
    """The network of one sampling.loras entry for one DiT, its modules narrowed by the entry's patterns.

    A file in another layout (ComfyUI, diffusers, diffusion-pipe, ai-toolkit) is read through
    network.formats, as the convert tool reads it."""
    from musubi_pipe.network.factory import network_from_weights
    from musubi_pipe.network.formats import musubi_tensors
    from musubi_pipe.network.lora import lora_name
    from musubi_pipe.network.lora_file import load_lora_file
    from musubi_pipe.network.targets import filter_targets

    tensors, metadata = load_lora_file(entry["path"])
    tensors = musubi_tensors(tensors, metadata, source=entry["path"])
    targets = family.lora_targets(dit)
    if entry.get("include_patterns") or entry.get("exclude_patterns"):
        stems = {k.split(".", 1)[0] for k in tensors}
        in_file = {o: m for o, m in targets.items() if lora_name(o) in stems}
        kept = filter_targets(in_file, entry.get("include_patterns") or [], entry.get("exclude_patterns") or [], where=key)
        names = {lora_name(o) for o in kept}
        tensors = {k: v for k, v in tensors.items() if k.split(".", 1)[0] in names}
    network = network_from_weights(targets, tensors, multiplier=float(entry.get("multiplier", 1.0)), source=entry["path"])
    return network, "ss_loraid" in metadata


def _warn_overlaps(expert: str, loaded: list[tuple[str, set[str], bool]]) -> None:
    """Overlapping LoRAs: a warning; overlapping LORAID files: an error (network.loraid.check_lora_overlaps)."""
    from musubi_pipe.network.loraid import check_lora_overlaps

    for text in check_lora_overlaps(loaded, f" of the {expert} expert" if expert else ""):
        log.warning("LoRAs %s", text)


def _load(job: Job, device, dtype):
    """Every expert's DiT with the sampling.loras applied (hooks) or merged; return (ExpertDits, networks)."""
    from musubi_pipe.memory import load_dit
    from musubi_pipe.models.experts import ExpertDits

    family, model, sampling = common.family(job), common.model_cfg(job), job.cfg["sampling"]
    experts = family.experts(model)
    offload = bool(job.cfg["memory"].get("offload_inactive_dit")) and len(experts) > 1
    dits, networks = {}, []
    for expert in experts:
        hooked = []

        def build_loras(dit, expert=expert):
            """Build this expert's LoRAs on the weights as loaded: merged now (before any fp8 rounding), or
            kept to hook once the DiT is in place."""
            loaded = []
            for i, entry in enumerate(sampling.get("loras") or []):
                wanted = entry.get("expert", "both")
                if wanted != "both" and f"{wanted}_noise" != expert.name:
                    continue
                network, is_loraid = _lora_network(family, dit, entry, f"sampling.loras[{i}]")
                network.to(dit.device)
                loaded.append((entry["path"], set(network.official_names), is_loraid))
                if sampling.get("merge_loras"):
                    network.merge_into_base(float(entry.get("multiplier", 1.0)))
                else:
                    hooked.append(network)
            _warn_overlaps(expert.name, loaded)

        dits[expert.name] = load_dit(family, model, job.cfg["memory"], device, dtype, expert.name, park=offload,
                                     before_quantize=build_loras)
        for network in hooked:
            network.to(device)
            network.apply_to()
            networks.append(network)
    return ExpertDits(dits, device, offload), networks


def _embeddings(job: Job, prompts: list[dict], device, dtype, progress: bool):
    texts = sorted({p["prompt"] for p in prompts} | {p["negative_prompt"] for p in prompts})
    keys, _ = common.encode_texts(job, texts, progress=progress)

    def embedding(text):
        return common.text_entry(job, keys[text], device, dtype)

    return embedding


def run(ctx: StageContext) -> dict:
    from safetensors.torch import load_file

    from musubi_pipe.sampling.render import prompt_conditions, render

    job, sampling = ctx.job, ctx.cfg["sampling"]
    if not job.dist.main:
        return {}
    family, model = common.family(job), common.model_cfg(job)
    device = common.resolve_device(job)
    dit_dtype = common.torch_dtype(common.resolve_dtype(job, "dit_dtype"))
    vae_dtype = common.torch_dtype(common.resolve_dtype(job, "vae_dtype"))
    defaults = family.sampling_defaults(model)
    fps = sampling.get("fps") or defaults["fps"]
    output_type = sampling.get("output_type") or "video"
    progress = ctx.runtime.get("progress", True)
    if sampling.get("latents"):  # decode only
        latents = [_saved_latents(path, load_file) for path in sampling["latents"]]
        prompts = [{"prompt": "", "frames": (t.shape[2] - 1) * family.geometry(model).vae_stride[0] + 1} for t in latents]
    else:
        prompts = _prompts(job)
        embedding = _embeddings(job, prompts, device, dit_dtype, progress)
        conds = prompt_conditions(family, model, prompts, device, vae_dtype)
        dits, networks = _load(job, device, dit_dtype)
        latents = render(family, model, family.experts(model), dits, prompts, conds, embedding, device, progress)
        for network in networks:
            network.restore()
        del dits, networks
    files = _write(family, model, prompts, latents, ctx.out_dir, output_type, fps, device, vae_dtype)
    return {"outputs": {"samples": files}, "prompts": [p["prompt"] for p in prompts], "output_type": output_type}


def _saved_latents(path: str, load_file):
    """A saved latent file's latents as [1, C, F, H, W]; UserError for a file that holds none."""
    from musubi_pipe.errors import UserError

    tensors = load_file(path)
    if "latents" not in tensors or tensors["latents"].dim() != 4:
        raise UserError(f"sampling.latents: {path} holds no 'latents' tensor [C, F, H, W] (keys: {sorted(tensors)}); "
                        "point it at a sample_NN.safetensors written by the sample or generate stage")
    return tensors["latents"][None]


def _write(family, model, prompts, latents, out_dir, output_type: str, fps, device, vae_dtype) -> list[str]:
    """Write what output_type asks for; return the file (or folder) names."""
    from safetensors.torch import save_file

    from musubi_pipe.data.media import write_png
    from musubi_pipe.sampling.render import write_samples

    if output_type == "latent":
        names = []
        for i, value in enumerate(latents):
            save_file({"latents": value[0].contiguous()}, str(out_dir / f"sample_{i:02d}.safetensors"))
            names.append(f"sample_{i:02d}.safetensors")
        return names
    written = write_samples(family, model, prompts, latents, out_dir, "sample", fps, device, vae_dtype)
    names = []
    for i, (path, frames) in enumerate(written):
        if output_type == "images":
            path.unlink()
            folder = out_dir / f"sample_{i:02d}"
            folder.mkdir()
            for j, frame in enumerate(frames):
                write_png(folder / f"{j:05d}.png", frame)
            names.append(folder.name)
        else:
            names.append(path.name)
        latent_file = out_dir / f"sample_{i:02d}.safetensors"
        if output_type == "both":
            names.append(latent_file.name)
        else:
            latent_file.unlink()
    return names


STAGE = Stage(
    name="generate",
    version=1,
    upstream=(),
    keys=("model.arch", "model.task", "sampling"),
    inputs=inputs,
    run=run,
)
