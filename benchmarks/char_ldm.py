"""Char-LDM training step: what L_reg's attention capture costs, the step's FLOPs and MFU, and
the speed options measured on and off.

``lreg_overhead`` = median train-step time (forward + backward) with L_reg (the supervised
``attn2`` layers computed the plain way, their probabilities kept for the loss) ÷ without
(SDPA everywhere), on the tiny preset, a fixed batch, CPU, after warm-up; the two kinds of step
alternate so drift hits both alike. Target <= 1.15.

FLOPs per step come from ``FlopCounterMode`` (:mod:`benchmarks.flops`); TFLOP/s and MFU from the
median step time. The options, each timed on vs off in one run with the others as the jobs run
them (a full train step: forward, backward, AdamW): ``sdpa`` (SDPA on every attention layer
L_reg does not hook: already so, see storygpt/char_ldm/attention.py; off = diffusers' plain
``AttnProcessor``), ``compile`` (``torch.compile`` of the UNet), ``channels_last`` (the UNet's
memory format), ``fused_adamw`` (``AdamW(fused=True)``; off: the default, foreach).

With a GPU (``--gpu-only``) it times the real-size SD-1.5 UNet (random weights) at 512 px in
bf16, the same way, in samples/s.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from types import SimpleNamespace

from benchmarks.flops import (adamw_variants, compare_options, count_flops, device_peak, median_step_times,
                              step_report)

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.15
TARGET_GPU_MFU = 0.40  # SD-1.5 512 px train step, bf16
# what the jobs run today: SDPA on, eager, contiguous, foreach AdamW
BASELINE = {"sdpa": True, "compile": False, "channels_last": False, "fused_adamw": False}


def unet_switches(owner, params: list, lr: float, weight_decay: float, options: tuple[str, ...]):
    """The options on ``owner.unet`` (the UNet the step calls) and AdamW over ``params``.
    Returns ({option: switch(on)}, optimiser getter: :func:`~benchmarks.flops.adamw_variants`)."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from storygpt.char_ldm.attention import CrossAttentionCapture

    eager, knobs, compiled = owner.unet, dict(BASELINE), {}

    def sdpa(on: bool) -> None:  # the capturing layers keep theirs: they are L_reg's
        eager.set_attn_processor({k: p if isinstance(p, CrossAttentionCapture) else
                                  (AttnProcessor2_0() if on else AttnProcessor())
                                  for k, p in eager.attn_processors.items()})

    def compile_(on: bool) -> None:
        if on and "unet" not in compiled:
            compiled["unet"] = torch.compile(eager)
        owner.unet = compiled["unet"] if on else eager

    def channels_last(on: bool) -> None:
        if knobs["channels_last"] != on:
            eager.to(memory_format=torch.channels_last if on else torch.contiguous_format)
            knobs["channels_last"] = on

    def fused(on: bool) -> None:
        knobs["fused_adamw"] = on

    switches = {"sdpa": sdpa, "compile": compile_, "channels_last": channels_last, "fused_adamw": fused}
    return {name: switches[name] for name in options}, adamw_variants(params, lr, weight_decay, knobs)


def _timing(quick: bool) -> dict:
    return {"warmup": 3, "steps": 5 if quick else 20}


def _train_step_figures(train_step, switches: dict, flops: int, peak: float | None, source: str, timing: dict) -> dict:
    """The job's train step (the options at ``BASELINE``) and each option on vs off."""
    options = compare_options(train_step, switches, BASELINE, flops, peak, **timing)
    return {"train_step": step_report(flops, options.pop("baseline")["s_per_step"], peak, source), "options": options}


def cpu_figures(quick: bool, peak_tflops: float | None = None, options: tuple[str, ...] = tuple(BASELINE)) -> dict:
    import torch

    from storygpt.char_ldm.data import collate
    from storygpt.char_ldm.model import CharLDM
    from storygpt.commands.zoo import build_zoo_quietly
    from storygpt.config import load_config
    from storygpt.vision.prepare import records_in_process
    from storygpt.world.generate import generate_world

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bench-ldm-"))
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"work_dir={work}"])
    build_zoo_quietly(cfg, work / "zoo")
    generate_world(work / "world", stories=2, seed=0, val_fraction=0, test_fraction=0)
    torch.manual_seed(0)
    model = CharLDM.from_config(cfg).train()
    batch_size = cfg.char_ldm.batch_size
    batch = collate(records_in_process(cfg)[:batch_size], model, cfg.char_ldm, torch.Generator().manual_seed(0))
    # every sample fused: L_reg is never skipped for lack of a supervised character
    model.config = cfg.char_ldm.model_copy(update={"p_unconditional": 0.0, "p_text_only": 0.0})

    def step() -> None:
        model(batch, torch.Generator().manual_seed(0))["loss"].backward()
        model.zero_grad(set_to_none=True)

    def switch(on: bool) -> None:
        model.supervise_attention = on

    timing = _timing(quick)
    flops = {on: count_flops(lambda: (switch(on), step()), "cpu") for on in (True, False)}
    t = median_step_times(step, switch, **timing)
    peak, source = device_peak("cpu", peak_tflops)
    switches, optimiser = unet_switches(model, model.trainable_parameters(), cfg.char_ldm.learning_rate,
                                        cfg.char_ldm.weight_decay, options)
    switch(True)

    def train_step() -> None:  # the job's step: forward, backward, AdamW
        model(batch, torch.Generator().manual_seed(0))["loss"].backward()
        optimiser().step()
        optimiser().zero_grad(set_to_none=True)

    train_flops = count_flops(train_step, "cpu")
    return {"batch": len(batch["pixel_values"]), "resolution": cfg.char_ldm.resolution, **timing,
            "s_per_step_lreg": round(t[True], 4), "s_per_step_plain": round(t[False], 4),
            "lreg_overhead": round(t[True] / t[False], 3),
            "forward_backward_lreg": step_report(flops[True], t[True], peak, source),
            "forward_backward_plain": step_report(flops[False], t[False], peak, source),
            **_train_step_figures(train_step, switches, train_flops, peak, source, timing)}


# SD-1.5's UNet config (diffusers' defaults are its layout); the latents of a 512 px frame are 64x64
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280))
SUPERVISED = ["down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2"]


def unet_figures(quick: bool, device: str = "cuda", bf16: bool = True, unet_config: dict = SD15_UNET,
                 batch: int = 8, resolution: int = 512, peak_tflops: float | None = None,
                 options: tuple[str, ...] = tuple(BASELINE), supervised: list[str] = SUPERVISED) -> dict:
    """A UNet built from ``unet_config`` (random weights): a train step on random latents and a
    random conditioning, L_reg on box masks, with vs without capture; its FLOPs and MFU; the
    options on a full train step (AdamW on the UNet's weights, in their dtype)."""
    import torch
    from diffusers import UNet2DConditionModel

    from storygpt.char_ldm.attention import install_attention_store
    from storygpt.char_ldm.losses import lreg_loss, mask_attention
    from storygpt.char_ldm.training import noise_loss

    chars, dtype = 4, torch.bfloat16 if bf16 else torch.float32
    unet = UNet2DConditionModel(**unet_config).to(device, dtype).train()
    store = install_attention_store(unet, supervised)
    size, width = unet.config.sample_size, unet.config.cross_attention_dim
    latents = torch.randn(batch, unet.config.in_channels, size, size, device=device, dtype=dtype)
    conditioning = torch.randn(batch, 77, width, device=device, dtype=dtype)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    token_idx = torch.randint(1, 20, (batch, chars), device=device)
    masks = torch.zeros(batch, chars, resolution, resolution, device=device)
    masks[..., resolution // 4:3 * resolution // 4, resolution // 8:resolution // 2] = 1
    supervised_chars = torch.ones(batch, chars, dtype=torch.bool, device=device)
    capture, owner = {"on": False}, SimpleNamespace(unet=unet)

    def loss() -> torch.Tensor:
        with store.capturing(capture["on"]):
            out = noise_loss(owner.unet(latents, timesteps, conditioning).sample, latents)
            if capture["on"]:
                out = out + 1e-3 * lreg_loss(*mask_attention(store.maps, token_idx, masks), supervised_chars)
        return out

    def step() -> None:
        loss().backward()
        unet.zero_grad(set_to_none=True)

    def switch(on: bool) -> None:
        capture.update(on=on)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    timing = {**_timing(quick), "sync": sync}
    flops = {on: count_flops(lambda: (switch(on), step()), device) for on in (True, False)}
    t = median_step_times(step, switch, **timing)
    peak, source = device_peak(device, peak_tflops)
    switches, optimiser = unet_switches(owner, list(unet.parameters()), 1e-5, 1e-2, options)
    switch(True)

    def train_step() -> None:
        loss().backward()
        optimiser().step()
        optimiser().zero_grad(set_to_none=True)

    train_flops = count_flops(train_step, device)
    out = {"model": f"UNet {unet_config.get('block_out_channels')} (random weights), {resolution} px, "
                    f"{'bf16' if bf16 else 'fp32'}, {device}", "batch": batch,
           "samples_per_s_lreg": round(batch / t[True], 2), "samples_per_s_plain": round(batch / t[False], 2),
           "lreg_overhead": round(t[True] / t[False], 3),
           "forward_backward_lreg": step_report(flops[True], t[True], peak, source),
           "forward_backward_plain": step_report(flops[False], t[False], peak, source),
           **_train_step_figures(train_step, switches, train_flops, peak, source, timing)}
    if device == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return out


def best_mfu(figures: dict) -> float | None:
    """The highest train-step MFU any measured configuration reached (None without a peak)."""
    mfus = [side["mfu"] for option in figures["options"].values() for key, side in option.items()
            if key in ("on", "off")]
    return max(mfus) if None not in mfus else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer timed steps (CI smoke run)")
    parser.add_argument("--gpu-only", action="store_true", help="only the real-size UNet (skips the tiny zoo build)")
    parser.add_argument("--batch", type=int, default=8, help="--gpu-only: samples per step (default 8)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default: "
                        "benchmarks.flops's table on a GPU; none on CPU)")
    parser.add_argument("--options", default=",".join(BASELINE),
                        help=f"comma-separated options to time on vs off, of {list(BASELINE)}")
    args = parser.parse_args(argv)
    options = tuple(o for o in args.options.split(",") if o)
    unknown = [o for o in options if o not in BASELINE]
    if unknown:
        parser.error(f"--options: unknown {unknown}; expected some of {list(BASELINE)}")

    import torch

    import storygpt  # noqa: F401  (the torchvision shim, before diffusers/transformers)
    from benchmarks.common import emit

    if args.gpu_only:
        if not torch.cuda.is_available():
            parser.error("--gpu-only: no GPU on this machine")
        gpu = unet_figures(args.quick, batch=args.batch, peak_tflops=args.peak_tflops, options=options)
        emit({"benchmark": "char_ldm", "gpu": gpu, "mfu_best": best_mfu(gpu), "target_lreg_overhead": TARGET,
              "target_mfu": TARGET_GPU_MFU})
        return
    cpu = cpu_figures(args.quick, args.peak_tflops, options)
    print(f"tiny Char-LDM train step on CPU: {cpu['s_per_step_lreg']} s with L_reg, "
          f"{cpu['s_per_step_plain']} s without: overhead x{cpu['lreg_overhead']} (target <= {TARGET}); "
          f"{cpu['forward_backward_lreg']['tflops_per_s']} TFLOP/s")
    gpu = (unet_figures(args.quick, batch=args.batch, peak_tflops=args.peak_tflops, options=options)
           if torch.cuda.is_available() else "not measured: no GPU on this machine")
    emit({"benchmark": "char_ldm", "device": "cpu", "models": "tiny preset", **cpu,
          "target_lreg_overhead": TARGET, "gpu": gpu})


if __name__ == "__main__":
    main()
