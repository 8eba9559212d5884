"""The real-size models on a GPU: SD-1.5's UNet / VAE / CLIP text, CLIP ViT-L/14 and OPT-6.7B,
random weights (none can be downloaded here), written as local weight directories in the layout
``configs/flintstones.yaml`` names and loaded through the same ``from_config`` calls the Serve
deployments make, the frozen parts in the preset's ``models.frozen_dtype`` (``--frozen-dtype``
overrides it). With no GPU it prints "not measured" unless ``--size smoke`` (small widths, CPU:
the code path only).

Figures, all in-process on one device (no Ray Serve: the lent GPU machine has no Ray):
- a 5-frame story through :class:`~storygpt.aligner.generation.StoryGenerator` drawing with the
  Char-LDM (512 px, the preset's 50 DDIM steps, guidance 5): time to first frame, per-frame
  latency; a 50-frame story's wall time;
- GPU memory by part: each part's weights, the story's KV cache, the activations of one LM
  prefill over the story's context, one guided UNet step and one VAE decode, and the peak of
  each phase (the story, batched drawing, the LM loop) with what it held above the weights;
- Char-LDM frames/s for 1 vs 8 conditionings in one batched sample (``batching_gain``), what
  ``@serve.batch`` buys on a GPU;
- the story loop's LM time per frame at frame 2 vs 50 with the KV cache and recomputing
  (``benchmarks.story``'s measure, on OPT-6.7B).

The lent GPU machine has torch and transformers but not diffusers, pydantic or segment-anything:
``--wheels DIR`` (here, with the registry) downloads the wheels of those at the versions installed
here; ``--install-from DIR`` (there, offline) installs the missing ones before anything imports them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from benchmarks.char_ldm import SD15_UNET
from benchmarks.story import CAPTIONS, _growth, _lm_timing

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
# what the lent GPU machine lacks: (import name, distribution); pydantic-core is compiled, the rest pure
CARRIED = (("diffusers", "diffusers"), ("pydantic", "pydantic"), ("pydantic_core", "pydantic-core"),
           ("annotated_types", "annotated-types"), ("typing_inspection", "typing-inspection"),
           ("typing_extensions", "typing-extensions"), ("importlib_metadata", "importlib-metadata"),
           ("zipp", "zipp"), ("segment_anything", "segment-anything"))
COMPILED = {"pydantic-core"}
PYTHONS = ("3.10", "3.11", "3.12", "3.13")  # the GPU machine's Python is not known in advance
WRITTEN = ".written.json"  # in the weights dir: a rerun with --work reuses what is there

SIZES = {
    "real": {
        "clip_text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          projection_dim=768, vocab_size=49408),
        "clip_vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=224, patch_size=14, projection_dim=768),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                    scaling_factor=0.18215),
        "unet": SD15_UNET,
        "lm": dict(hidden_size=4096, word_embed_proj_dim=4096, ffn_dim=16384, num_hidden_layers=32,
                   num_attention_heads=32, vocab_size=50272, max_position_embeddings=2048),
        "resolution": 512,
        "long_story": 50,
    },
    "smoke": {
        "clip_text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          projection_dim=64, vocab_size=49408),
        "clip_vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=56, patch_size=14, projection_dim=64),
        "vae": dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=64, scaling_factor=0.18215),
        "unet": dict(sample_size=8, cross_attention_dim=64, attention_head_dim=8, layers_per_block=1,
                     block_out_channels=(32, 32, 64, 64)),
        "lm": dict(hidden_size=64, word_embed_proj_dim=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                   vocab_size=50272, max_position_embeddings=2048),
        "resolution": 64,
        "long_story": 3,
        "sample_steps": 10,  # the code path only
    },
}
VAE_BLOCKS = 4  # SD's VAE: four blocks, x8 down


def write_weights(out: Path, size: dict, device: str) -> dict[str, str]:
    """Random weights (bf16 safetensors) in SD-1.5 / CLIP / OPT directory layouts; tokenizers are
    BPEs trained on the benchmark captions (real vocab sizes in the models, so their ids fit).
    Returns the ``models.*`` config overrides that point at them."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                              CLIPVisionModelWithProjection, OPTConfig, OPTForCausalLM)

    from storygpt.zoo.tokenizers import train_clip_tokenizer, train_opt_tokenizer
    from storygpt.zoo.build import SD15_SCHEDULE

    corpus = CAPTIONS * 4
    sd, vision_dir, lm_dir = out / "stable-diffusion-v1-5", out / "clip-vit-large-patch14", out / "opt-6.7b"
    clip_tokenizer = train_clip_tokenizer(corpus, 600)
    lm_tokenizer = train_opt_tokenizer(corpus, 600, size["lm"]["max_position_embeddings"])

    def save(model, directory: Path) -> None:
        model.to(torch.bfloat16).save_pretrained(directory)

    with torch.device(device):
        save(CLIPTextModel(CLIPTextConfig(**size["clip_text"], hidden_act="quick_gelu", max_position_embeddings=77,
                                          bos_token_id=clip_tokenizer.bos_token_id,
                                          eos_token_id=clip_tokenizer.eos_token_id,
                                          pad_token_id=clip_tokenizer.pad_token_id)), sd / "text_encoder")
        save(CLIPVisionModelWithProjection(CLIPVisionConfig(**size["clip_vision"], hidden_act="quick_gelu")),
             vision_dir)
        save(AutoencoderKL(**size["vae"], down_block_types=("DownEncoderBlock2D",) * VAE_BLOCKS,
                           up_block_types=("UpDecoderBlock2D",) * VAE_BLOCKS, latent_channels=4), sd / "vae")
        save(UNet2DConditionModel(**size["unet"]), sd / "unet")
        save(OPTForCausalLM(OPTConfig(**size["lm"], bos_token_id=lm_tokenizer.bos_token_id,
                                      eos_token_id=lm_tokenizer.eos_token_id,
                                      pad_token_id=lm_tokenizer.pad_token_id)), lm_dir)
    clip_tokenizer.save_pretrained(sd / "tokenizer")
    lm_tokenizer.save_pretrained(lm_dir)
    image = size["clip_vision"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image}).save_pretrained(vision_dir)
    DDPMScheduler(**SD15_SCHEDULE).save_pretrained(sd / "scheduler")
    return {"models.clip_text": str(sd / "text_encoder"), "models.vae": str(sd / "vae"),
            "models.unet": str(sd / "unet"), "models.scheduler": str(sd / "scheduler"),
            "models.clip_vision": str(vision_dir), "models.lm": str(lm_dir)}



def fetch_wheels(directory: Path) -> None:
    """Download the wheels of :data:`CARRIED` at this environment's versions (the compiled ones
    for each of :data:`PYTHONS`), for ``--install-from`` on a machine without a registry."""
    pins = {dist: f"{dist}=={metadata.version(dist)}" for _, dist in CARRIED}
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(directory)]
    subprocess.run([*pip, *(pin for dist, pin in pins.items() if dist not in COMPILED)], check=True)
    for python in PYTHONS:
        subprocess.run([*pip, "--python-version", python, "--platform", "manylinux2014_x86_64",
                        "--platform", "manylinux_2_17_x86_64", *(pins[d] for d in sorted(COMPILED))], check=True)


def install_missing(directory: Path) -> list[str]:
    """Install, offline from ``directory``, those of :data:`CARRIED` that do not import here."""
    import importlib.util

    missing = [dist for module, dist in CARRIED if importlib.util.find_spec(module) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links",
                        str(directory), *missing], check=True)
    return missing


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _gib(n: int) -> float:
    return round(n / GIB, 3)


def _mib(n: int) -> float:
    return round(n / 2**20, 3)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cache_bytes(cache) -> int:
    """Bytes of a transformers ``DynamicCache``'s keys and values."""
    layers = getattr(cache, "layers", None) or []
    return tensor_bytes(t for layer in layers for t in (layer.keys, layer.values) if t is not None and t.numel())


def held(device: str, run) -> tuple[object, dict]:
    """``run()``'s result and, on CUDA, the most GPU memory allocated while it ran: in all
    (``peak_gib``) and beyond what was allocated before it (``above_gib``)."""
    import torch

    if device != "cuda":
        return run(), {}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return out, {"peak_gib": _gib(peak), "above_gib": _gib(peak - before)}


def weights_by_part(pipeline, aligner) -> dict[str, float]:
    """GiB of each loaded part's parameters and buffers (at the dtype each is kept in)."""
    model = pipeline.model
    parts = {"unet": model.unet, "vae": model.vae, "clip_text": model.text_encoder,
             "clip_vision_char_ldm": model.vision, "fuser": model.fuser, "lm": aligner.lm,
             "clip_vision_aligner": aligner.vision}
    out = {name: _gib(tensor_bytes([*m.parameters(), *m.buffers()])) for name, m in parts.items()}
    out["aligner_new_parts"] = _gib(tensor_bytes(aligner.trainable_parameters()))
    out["total"] = round(sum(out.values()), 3)
    return out


def activations(pipeline, aligner, device: str, context_tokens: int) -> dict:
    """Memory each kind of step holds beyond the weights: one LM prefill over ``context_tokens``
    (its KV cache included), one guided UNet step (batch 2, the preset's autocast), one VAE decode."""
    import torch
    from transformers import DynamicCache

    model, cfg = pipeline.model, pipeline.cfg
    latent = cfg.resolution // 2 ** (len(model.vae.config.block_out_channels) - 1)
    bf16 = cfg.mixed_precision == "bf16" and device == "cuda"
    unet_in = torch.randn(2, model.unet.config.in_channels, latent, latent, device=device, dtype=model.unet.dtype)
    text = torch.randn(2, 77, model.unet.config.cross_attention_dim, device=device, dtype=model.unet.dtype)
    vae_in = torch.randn(1, model.vae.config.latent_channels, latent, latent, device=device, dtype=model.vae.dtype)
    lm_in = 0.02 * torch.randn(1, context_tokens, aligner.embed_dim, device=device, dtype=aligner.lm.dtype)

    @torch.no_grad()
    def unet_step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            return model.unet(unet_in, 999, text).sample

    @torch.no_grad()
    def prefill():
        cache = DynamicCache(config=aligner.lm.config)
        aligner.hidden(lm_in, cache=cache)
        return cache_bytes(cache)

    kv, lm = held(device, prefill)
    _, unet = held(device, unet_step)
    _, vae = held(device, torch.no_grad()(lambda: model.vae.decode(vae_in).sample))
    return {"lm_prefill_tokens": context_tokens, "lm_prefill_kv_cache_mib": _mib(kv),
            "lm_prefill_gib": lm.get("above_gib"), "unet_step_gib": unet.get("above_gib"),
            "vae_decode_gib": vae.get("above_gib")}


def story_captions(frames: int) -> list[str]:
    return [CAPTIONS[i % len(CAPTIONS)] for i in range(frames)]


def story_latency(story, device: str, frames: int = 5, warm_up: bool = True) -> dict:
    """Seconds to each frame of one story (a ``StoryGPTPipeline``): the LM loop plus a full
    Char-LDM sample per frame; the story's KV cache and the GPU memory it held."""
    sync = _sync(device)
    if warm_up:
        list(story.stream(CAPTIONS[:2]))  # kernels, allocator
        sync()
    generator = story.generator()

    def run() -> list[float]:
        start, at = time.perf_counter(), []
        for _frame in generator.stream(story_captions(frames)):
            sync()
            at.append(time.perf_counter() - start)
        return at

    at, memory = held(device, run)
    gaps = [b - a for a, b in zip(at, at[1:])]
    return {"frames": frames, "time_to_first_frame_s": round(at[0], 3),
            "per_frame_s_median": round(statistics.median(gaps), 3), "story_s": round(at[-1], 3),
            "context_tokens": generator.longest_context, "kv_cache_mib": _mib(cache_bytes(generator.story.cache)),
            **memory}


def batched_drawing(pipeline, device: str, batch: int = 8) -> dict:
    """Frames/s of one sample call over 1 vs ``batch`` conditionings (guided, the preset's steps)."""
    sync = _sync(device)
    conditioning = pipeline.encode([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)])
    out = {}
    for rows in (1, batch):
        pipeline.sample(conditioning[:rows], list(range(rows)))  # warm-up at this shape
        sync()
        start = time.perf_counter()
        pipeline.sample(conditioning[:rows], list(range(rows)))
        sync()
        out[rows] = rows / (time.perf_counter() - start)
    return {"frames_per_s_1": round(out[1], 3), f"frames_per_s_{batch}": round(out[batch], 3),
            "batching_gain": round(out[batch] / out[1], 2)}


def lm_loop(cfg, aligner, device: str, frames: int = 60) -> dict:
    sync = _sync(device)
    hidden = aligner.hidden

    def synced(*args, **kwargs):  # time the GPU work, not the launch
        out = hidden(*args, **kwargs)
        sync()
        return out

    def timed(use_cache: bool, frames: int) -> list[float]:
        aligner.hidden = synced  # _lm_timing wraps it, then deletes the instance attribute
        return _lm_timing(cfg, aligner, use_cache, frames, 1)[0]

    timed(True, 3)  # warm-up
    cached, full = timed(True, frames), timed(False, frames)
    return {"lm_ms_frame2_cache": round(1e3 * statistics.median(cached[0:3]), 2),
            "lm_ms_frame50_cache": round(1e3 * statistics.median(cached[47:52]), 2),
            "lm_ms_frame50_recompute": round(1e3 * statistics.median(full[47:52]), 2),
            "cache_growth": round(_growth(cached)["frame50"], 3),
            "recompute_growth": round(_growth(full)["frame50"], 3)}


def figures(size_name: str, device: str, work: Path, frozen_dtype: str | None = None) -> dict:
    import torch

    from storygpt.aligner.model import StoryAligner
    from storygpt.char_ldm.pipeline import CharLDMPipeline
    from storygpt.config import load_config
    from storygpt.pipeline import StoryGPTPipeline

    size = SIZES[size_name]
    start = time.perf_counter()
    models = write_weights_once(work / "weights", size_name, device)
    written_s = time.perf_counter() - start
    overrides = [f"work_dir={work}", f"char_ldm.resolution={size['resolution']}",
                 *([f"char_ldm.sample_steps={size['sample_steps']}"] if "sample_steps" in size else []),
                 *(f"{k}={v}" for k, v in models.items()),
                 *([f"models.frozen_dtype={frozen_dtype}"] if frozen_dtype else [])]
    cfg = load_config(REPO / "configs" / "flintstones.yaml", overrides)
    if device == "cuda":
        torch.cuda.empty_cache()
    start = time.perf_counter()
    # as the Serve deployments load them
    (pipeline, aligner), loading = held(device, lambda: (CharLDMPipeline.from_config(cfg, None, device=device),
                                                         StoryAligner.from_config(cfg).to(device).eval()))
    load_s = time.perf_counter() - start
    story = StoryGPTPipeline(cfg, aligner, pipeline)
    five = story_latency(story, device)
    memory = {"weights_gib": weights_by_part(pipeline, aligner), "loading": loading,
              "activations": activations(pipeline, aligner, device, five["context_tokens"])}
    long = story_latency(story, device, frames=size["long_story"], warm_up=False)  # warm since the first
    drawing, memory["drawing"] = held(device, lambda: batched_drawing(pipeline, device))
    lm, memory["lm_loop"] = held(device, lambda: lm_loop(cfg, aligner, device))
    out = {"models": f"SD-1.5 UNet/VAE/CLIP-L text, CLIP ViT-L/14, OPT-6.7B ({size_name} widths, random "
                     f"weights), frozen parts in {cfg.models.frozen_dtype} (the whole Char-LDM but its fuser, "
                     f"the LM, CLIP vision), {cfg.char_ldm.mixed_precision} autocast",
           "frozen_dtype": cfg.models.frozen_dtype, "resolution": size["resolution"],
           "sample_steps": cfg.char_ldm.sample_steps, "guidance_scale": cfg.char_ldm.guidance_scale,
           "weights_written_s": round(written_s, 1), "load_s": round(load_s, 1), "story": five,
           "long_story": {k: long[k] for k in ("frames", "story_s", "per_frame_s_median", "context_tokens",
                                               "kv_cache_mib", "peak_gib") if k in long},
           "drawing": drawing, "lm_loop": lm, "memory": memory}
    if device == "cuda":
        phases = [five, long, loading, memory["drawing"], memory["lm_loop"]]
        out["peak_memory_gib"] = max(p["peak_gib"] for p in phases)
    return out


def write_weights_once(out: Path, size_name: str, device: str) -> dict[str, str]:
    """:func:`write_weights`, or what an earlier run with the same ``--work`` and size wrote."""
    marker = out / WRITTEN
    if marker.is_file() and json.loads(marker.read_text())["size"] == size_name:
        return json.loads(marker.read_text())["models"]
    models = write_weights(out, SIZES[size_name], device)
    marker.write_text(json.dumps({"size": size_name, "models": models}))
    return models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="accepted for make bench; the run is already short")
    parser.add_argument("--size", choices=sorted(SIZES), default="real")
    parser.add_argument("--device", help="default: cuda when there is one")
    parser.add_argument("--work", help="where the weights go (default: a temp dir); a rerun reuses them")
    parser.add_argument("--frozen-dtype", choices=["fp32", "bf16", "fp16"],
                        help="models.frozen_dtype (default: the preset's, bf16)")
    parser.add_argument("--out", help="also write the result JSON to this file")
    parser.add_argument("--wheels", metavar="DIR", help="only download the wheels the GPU machine lacks into DIR")
    parser.add_argument("--install-from", metavar="DIR", help="first install, offline from DIR, what does not import")
    args = parser.parse_args(argv)
    if args.wheels:
        fetch_wheels(Path(args.wheels))
        return
    if args.install_from:
        print(json.dumps({"installed": install_missing(Path(args.install_from))}), flush=True)

    import torch

    import storygpt  # noqa: F401  (the torchvision shim, before diffusers/transformers)
    from benchmarks.common import emit

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.size == "real" and device != "cuda":
        emit({"benchmark": "real_size", "gpu": "not measured: no GPU on this machine"})
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-real-size-"))
    result = figures(args.size, device, work, args.frozen_dtype)
    print(json.dumps({"story": result["story"], "long_story": result["long_story"]}))
    record = {"benchmark": "real_size", "device": device, "gpu" if device == "cuda" else "smoke": result}
    emit(record)
    if args.out:
        from benchmarks.common import machine

        Path(args.out).write_text(json.dumps({**record, "machine": machine()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
