"""The real-size models on a GPU: SD-1.5's UNet / VAE / CLIP text, CLIP ViT-L/14 and OPT-6.7B,
random weights (none can be downloaded here), written as local weight directories in the layout
``configs/flintstones.yaml`` names and loaded through the same ``from_config`` calls the Serve
deployments make. With no GPU it prints "not measured" unless ``--size smoke`` (small widths, CPU:
the code path only).

Figures, all in-process on one device (no Ray Serve: the lent GPU machine has no Ray):
- a 5-frame story through :class:`~storygpt.aligner.generation.StoryGenerator` drawing with the
  Char-LDM (512 px, the preset's 50 DDIM steps, guidance 5): time to first frame, per-frame latency;
- Char-LDM frames/s for 1 vs 8 conditionings in one batched sample (``batching_gain``), what
  ``@serve.batch`` buys on a GPU;
- the story loop's LM time per frame at frame 2 vs 50 with the KV cache and recomputing
  (``benchmarks.story``'s measure, on OPT-6.7B).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.char_ldm import SD15_UNET
from benchmarks.story import CAPTIONS, _growth, _lm_timing

REPO = Path(__file__).resolve().parents[1]

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


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def story_latency(story, device: str, frames: int = 5) -> dict:
    """Seconds to each frame of one story (a ``StoryGPTPipeline``): the LM loop plus a full
    Char-LDM sample per frame."""
    sync = _sync(device)
    list(story.stream(CAPTIONS[:2]))  # warm-up: kernels, allocator
    sync()
    start, at = time.perf_counter(), []
    for _frame in story.stream(CAPTIONS[:frames]):
        sync()
        at.append(time.perf_counter() - start)
    gaps = [b - a for a, b in zip(at, at[1:])]
    return {"frames": frames, "time_to_first_frame_s": round(at[0], 3),
            "per_frame_s_median": round(statistics.median(gaps), 3), "story_s": round(at[-1], 3)}


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


def figures(size_name: str, device: str, work: Path) -> dict:
    import torch

    from storygpt.aligner.model import StoryAligner
    from storygpt.char_ldm.pipeline import CharLDMPipeline
    from storygpt.config import load_config
    from storygpt.pipeline import StoryGPTPipeline

    size = SIZES[size_name]
    start = time.perf_counter()
    models = write_weights(work / "weights", size, device)
    written_s = time.perf_counter() - start
    overrides = [f"work_dir={work}", f"char_ldm.resolution={size['resolution']}",
                 *(f"{k}={v}" for k, v in models.items())]
    cfg = load_config(REPO / "configs" / "flintstones.yaml", overrides)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pipeline = CharLDMPipeline.from_config(cfg, None, device=device)  # as the Serve deployments load them
    aligner = StoryAligner.from_config(cfg).to(device).eval()
    load_s = time.perf_counter() - start
    out = {"models": f"SD-1.5 UNet/VAE/CLIP-L text, CLIP ViT-L/14, OPT-6.7B ({size_name} widths, random "
                     f"weights), fp32 weights, {cfg.char_ldm.mixed_precision} autocast",
           "resolution": size["resolution"], "sample_steps": cfg.char_ldm.sample_steps,
           "guidance_scale": cfg.char_ldm.guidance_scale, "weights_written_s": round(written_s, 1),
           "load_s": round(load_s, 1), "story": story_latency(StoryGPTPipeline(cfg, aligner, pipeline), device),
           "drawing": batched_drawing(pipeline, device), "lm_loop": lm_loop(cfg, aligner, device)}
    if device == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="accepted for make bench; the run is already short")
    parser.add_argument("--size", choices=sorted(SIZES), default="real")
    parser.add_argument("--device", help="default: cuda when there is one")
    parser.add_argument("--work", help="where the weights go (default: a temp dir)")
    args = parser.parse_args(argv)

    import torch

    import storygpt  # noqa: F401  (the torchvision shim, before diffusers/transformers)
    from benchmarks.common import emit

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.size == "real" and device != "cuda":
        emit({"benchmark": "real_size", "gpu": "not measured: no GPU on this machine"})
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-real-size-"))
    result = figures(args.size, device, work)
    print(json.dumps(result["story"]))
    emit({"benchmark": "real_size", "device": device, "gpu" if device == "cuda" else "smoke": result})


if __name__ == "__main__":
    main()
