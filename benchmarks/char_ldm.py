"""Char-LDM training step: what L_reg's attention capture costs.

``lreg_overhead`` = median train-step time (forward + backward) with L_reg (the supervised
``attn2`` layers computed the plain way, their probabilities kept for the loss) ÷ without
(SDPA everywhere), on the tiny preset, a fixed batch, CPU, after warm-up; the two kinds of step
alternate so drift hits both alike. Target <= 1.15. With a GPU it also times the real-size
SD-1.5 UNet (random weights) at 512 px in bf16, the same way, in samples/s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.15


def _median_step_times(step, switch, warmup: int, steps: int, sync=lambda: None) -> dict[bool, float]:
    """Median seconds of ``step()`` with ``switch(True)`` and ``switch(False)``, interleaved."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(warmup + steps):
        for on in (True, False):
            switch(on)
            sync()
            start = time.perf_counter()
            step()
            sync()
            if i >= warmup:
                times[on].append(time.perf_counter() - start)
    return {on: statistics.median(t) for on, t in times.items()}


def cpu_figures(quick: bool) -> dict:
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

    t = _median_step_times(step, switch, warmup=3, steps=5 if quick else 20)
    return {"batch": batch_size, "resolution": cfg.char_ldm.resolution, "steps": 5 if quick else 20,
            "s_per_step_lreg": round(t[True], 4), "s_per_step_plain": round(t[False], 4),
            "lreg_overhead": round(t[True] / t[False], 3)}


# SD-1.5's UNet config (diffusers' defaults are its layout); the latents of a 512 px frame are 64x64
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280))
SUPERVISED = ["down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2"]


def unet_figures(quick: bool, device: str = "cuda", bf16: bool = True, unet_config: dict = SD15_UNET,
                 batch: int = 8, resolution: int = 512) -> dict:
    """A UNet built from ``unet_config`` (random weights): a train step on random latents and a
    random conditioning, L_reg on box masks, with vs without capture."""
    import torch
    from diffusers import UNet2DConditionModel

    from storygpt.char_ldm.attention import install_attention_store
    from storygpt.char_ldm.losses import lreg_loss, mask_attention
    from storygpt.char_ldm.training import noise_loss

    chars, dtype = 4, torch.bfloat16 if bf16 else torch.float32
    unet = UNet2DConditionModel(**unet_config).to(device, dtype).train()
    store = install_attention_store(unet, SUPERVISED)
    size, width = unet.config.sample_size, unet.config.cross_attention_dim
    latents = torch.randn(batch, unet.config.in_channels, size, size, device=device, dtype=dtype)
    conditioning = torch.randn(batch, 77, width, device=device, dtype=dtype)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    token_idx = torch.randint(1, 20, (batch, chars), device=device)
    masks = torch.zeros(batch, chars, resolution, resolution, device=device)
    masks[..., resolution // 4:3 * resolution // 4, resolution // 8:resolution // 2] = 1
    supervised = torch.ones(batch, chars, dtype=torch.bool, device=device)
    capture = {"on": False}

    def step() -> None:
        with store.capturing(capture["on"]):
            loss = noise_loss(unet(latents, timesteps, conditioning).sample, latents)
            if capture["on"]:
                loss = loss + 1e-3 * lreg_loss(*mask_attention(store.maps, token_idx, masks), supervised)
        loss.backward()
        unet.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t = _median_step_times(step, lambda on: capture.update(on=on), warmup=3, steps=5 if quick else 20, sync=sync)
    out = {"model": f"UNet {unet_config.get('block_out_channels')} (random weights), {resolution} px, "
                    f"{'bf16' if bf16 else 'fp32'}, {device}", "batch": batch,
           "samples_per_s_lreg": round(batch / t[True], 2), "samples_per_s_plain": round(batch / t[False], 2),
           "lreg_overhead": round(t[True] / t[False], 3)}
    if device == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer timed steps (CI smoke run)")
    parser.add_argument("--gpu-only", action="store_true", help="only the real-size UNet (skips the tiny zoo build)")
    args = parser.parse_args()

    import torch

    import storygpt  # noqa: F401  (the torchvision shim, before diffusers/transformers)
    from benchmarks.common import emit

    if args.gpu_only:
        if not torch.cuda.is_available():
            parser.error("--gpu-only: no GPU on this machine")
        emit({"benchmark": "char_ldm", "gpu": unet_figures(args.quick), "target_lreg_overhead": TARGET})
        return
    cpu = cpu_figures(args.quick)
    print(f"tiny Char-LDM train step on CPU: {cpu['s_per_step_lreg']} s with L_reg, "
          f"{cpu['s_per_step_plain']} s without: overhead x{cpu['lreg_overhead']} (target <= {TARGET})")
    gpu = unet_figures(args.quick) if torch.cuda.is_available() else "not measured: no GPU on this machine"
    emit({"benchmark": "char_ldm", "device": "cpu", "models": "tiny preset", **cpu,
          "target_lreg_overhead": TARGET, "gpu": gpu})


if __name__ == "__main__":
    main()
