"""The aligner's (stage 2) train step: FLOPs (``FlopCounterMode``), TFLOP/s and MFU, and the
speed options timed on vs off in one run (:mod:`benchmarks.flops`).

One step = the job's: L_gen + L_align forward through the frozen LM, backward into the new parts
(W_v2t, the [IMG] rows, the mapper: the gradient runs back through the LM's activations, not its
weights), AdamW on the new parts. The batch is one story's examples (frames 1..B, precomputed
frame features and fused targets, random), so sequences of every length up to ``max_length``.

Options: ``sdpa`` (the LM's attention: SDPA vs transformers' eager), ``compile``
(``torch.compile`` of the LM's decoder), ``fused_adamw``. Channels-last does not apply: no
convolution runs in this step (the frame features are precomputed).

CPU: the tiny preset's aligner. ``--gpu-only``: an OPT-6.7B-shaped LM and CLIP ViT-L/14 (random
weights, :mod:`benchmarks.real_size`'s shapes, built in memory) with ``configs/flintstones.yaml``'s
aligner, bf16.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.flops import adamw_variants, compare_options, count_flops, device_peak, step_report

REPO = Path(__file__).resolve().parents[1]
OPTIONS = ("sdpa", "compile", "fused_adamw")
BASELINE = {"sdpa": True, "compile": False, "fused_adamw": False}  # what the job runs today


def story_batch(aligner, frames: int, seed: int = 0) -> dict:
    """A collated batch of one ``frames``-frame story's examples, random features and targets."""
    import torch

    from benchmarks.story import _story
    from storygpt.aligner.data import collate, story_examples

    g = torch.Generator().manual_seed(seed)
    size = aligner.config.mapper_queries * aligner.out_dim
    rows = [{"id": f"s-{i}", "story_id": "s", "frame_index": i, "caption": c, "referential_caption": c,
             "characters": [], "fused": torch.randn(size, generator=g).tolist(),
             "frame_feature": torch.randn(aligner.clip_dim, generator=g).tolist()}
            for i, c in enumerate(_story(frames))]
    return collate(story_examples(rows), aligner)


def aligner_switches(aligner, options: tuple[str, ...]):
    """({option: switch(on)}, optimiser getter) for ``aligner``'s LM and its new parts."""
    import torch

    lm, eager, knobs, compiled = aligner.lm, aligner.lm.model, dict(BASELINE), {}
    stage = aligner.config

    def sdpa(on: bool) -> None:
        lm.set_attn_implementation("sdpa" if on else "eager")

    def compile_(on: bool) -> None:
        if on and "lm" not in compiled:
            compiled["lm"] = torch.compile(eager)
        lm.model = compiled["lm"] if on else eager

    def fused(on: bool) -> None:
        knobs["fused_adamw"] = on

    switches = {"sdpa": sdpa, "compile": compile_, "fused_adamw": fused}
    optimiser = adamw_variants(aligner.trainable_parameters(), stage.learning_rate, stage.weight_decay, knobs)
    return {name: switches[name] for name in options}, optimiser


def step_figures(aligner, batch: dict, device: str, quick: bool, peak_tflops: float | None,
                 options: tuple[str, ...] = OPTIONS) -> dict:
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    switches, optimiser = aligner_switches(aligner, options)
    aligner.train()

    def train_step() -> None:
        aligner(batch)["loss"].backward()
        optimiser().step()
        optimiser().zero_grad(set_to_none=True)

    flops = count_flops(train_step, device)
    peak, source = device_peak(device, peak_tflops)
    timing = {"warmup": 3, "steps": 5 if quick else 20, "sync": sync}
    figures = compare_options(train_step, switches, BASELINE, flops, peak, **timing)
    out = {"batch": len(batch["codes"]), "tokens": int(batch["attention_mask"].sum()),
           "padded_length": batch["codes"].shape[1], "lm_attention": aligner.lm.config._attn_implementation,
           "train_step": step_report(flops, figures.pop("baseline")["s_per_step"], peak, source), "options": figures}
    if device == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return out


def tiny_aligner():
    import torch

    from storygpt.aligner.model import StoryAligner
    from storygpt.commands.zoo import build_zoo_quietly
    from storygpt.config import load_config

    work = Path(tempfile.mkdtemp(prefix="bench-aligner-"))
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"work_dir={work}"])
    build_zoo_quietly(cfg, work / "zoo")
    torch.manual_seed(0)
    return StoryAligner.from_config(cfg), cfg.aligner.batch_size


def real_size_aligner(device: str, size_name: str = "real"):
    """OPT-6.7B and CLIP ViT-L/14 shapes (random weights, bf16, on ``device``) under
    ``configs/flintstones.yaml``'s aligner; the output width is SD-1.5's CLIP text width.
    ``size_name`` "smoke": :mod:`benchmarks.real_size`'s small widths (the code path on CPU)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection, OPTConfig, OPTForCausalLM

    from benchmarks.real_size import SIZES
    from benchmarks.story import CAPTIONS
    from storygpt.aligner.model import StoryAligner
    from storygpt.config import load_config
    from storygpt.zoo.tokenizers import train_opt_tokenizer

    cfg = load_config(REPO / "configs" / "flintstones.yaml", [f"work_dir={tempfile.mkdtemp(prefix='bench-aligner-')}"])
    size = SIZES[size_name]
    tokenizer = train_opt_tokenizer(CAPTIONS * 4, 600, size["lm"]["max_position_embeddings"])
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: no fp32 copy of 6.7B weights
    try:
        with torch.device(device):
            lm = OPTForCausalLM(OPTConfig(**size["lm"], bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
            vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**size["clip_vision"], hidden_act="quick_gelu"))
    finally:
        torch.set_default_dtype(default)
    aligner = StoryAligner(cfg.aligner, tokenizer, lm, CLIPImageProcessor(), vision, size["clip_text"]["hidden_size"])
    return aligner.to(device, torch.bfloat16), cfg.aligner.batch_size


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--gpu-only", action="store_true", help="only the real-size aligner, on the GPU")
    parser.add_argument("--batch", type=int, help="examples per step (default: the preset's aligner.batch_size "
                                                  "on CPU; 16 on the GPU, one worker's share of 64)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU")
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated, of {list(OPTIONS)}")
    args = parser.parse_args(argv)
    options = tuple(o for o in args.options.split(",") if o)
    if unknown := [o for o in options if o not in OPTIONS]:
        parser.error(f"--options: unknown {unknown}; expected some of {list(OPTIONS)}")

    import torch

    import storygpt  # noqa: F401  (the torchvision shim, before transformers)
    from benchmarks.common import emit

    if args.gpu_only:
        if not torch.cuda.is_available():
            parser.error("--gpu-only: no GPU on this machine")
        aligner, _ = real_size_aligner("cuda")
        batch = story_batch(aligner, args.batch or 16)
        result = {"benchmark": "aligner_step", "model": "OPT-6.7B shapes, random weights, bf16, flintstones aligner",
                  "gpu": step_figures(aligner, batch, "cuda", args.quick, args.peak_tflops, options)}
    else:
        torch.set_num_threads(2)
        aligner, preset_batch = tiny_aligner()
        batch = story_batch(aligner, args.batch or preset_batch)
        result = {"benchmark": "aligner_step", "device": "cpu", "models": "tiny preset",
                  **step_figures(aligner, batch, "cpu", args.quick, args.peak_tflops, options),
                  "gpu": "not measured here: --gpu-only on a GPU machine"}
    emit(result)
    return result


if __name__ == "__main__":
    main()
