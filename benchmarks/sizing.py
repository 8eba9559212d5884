"""Sizing a cluster before renting it: parameter counts of the real-size parts (built on PyTorch's
meta device: no memory, no weights) and, from them, what each data-parallel step moves.

``python -m benchmarks.sizing [--config configs/flintstones.yaml] [--gpus 8 32]`` prints one JSON
object: per stage the trainable and frozen parameters, the bytes of one bf16 gradient all-reduce
and of one ZeRO-3 parameter gather, and the per-GPU traffic of a ring all-reduce on N GPUs
(2 (N-1)/N x the gradient bytes, NCCL's bus-bandwidth formula). Bandwidths and step times to set
them against are in docs/sizing.md; no FLOP counts here (benchmarks.char_ldm measures those).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BF16 = 2  # bytes


def _count(module, trainable=None) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if trainable is None or trainable(n))


def parameter_counts(cfg) -> dict:
    """{part: parameters} of the real-size models (benchmarks.real_size's shapes) and of the new
    parts both stages train, at the preset's sizes."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers import OPTConfig, OPTForCausalLM

    from benchmarks.real_size import SIZES
    from storygpt.aligner.mapper import Mapper
    from storygpt.char_ldm.fuser import CharacterFuser

    size = SIZES["real"]
    a = cfg.aligner
    with torch.device("meta"):
        unet = UNet2DConditionModel(**size["unet"])
        vae = AutoencoderKL(block_out_channels=size["vae"]["block_out_channels"], layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            latent_channels=4)
        text = CLIPTextModel(CLIPTextConfig(**size["clip_text"]))
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**size["clip_vision"]))
        lm = OPTForCausalLM(OPTConfig(**size["lm"]))
        d_text, d_vision, e = text.config.hidden_size, vision.config.projection_dim, lm.config.hidden_size
        fuser = CharacterFuser(d_text, d_vision)
        mapper = Mapper(e, d_text, a)
    layers = vision.vision_model.encoder.layers
    trainable_vision = sum(_count(layer) for layer in layers[len(layers) - cfg.char_ldm.trainable_vision_layers:]) \
        if cfg.char_ldm.trainable_vision_layers else 0
    return {
        "unet": _count(unet), "vae": _count(vae), "clip_text": _count(text), "clip_vision": _count(vision),
        "clip_vision_trainable": trainable_vision, "fuser": _count(fuser), "lm": _count(lm),
        "w_v2t": d_vision * a.visual_tokens * e + a.visual_tokens * e, "img_embeddings": a.img_tokens * e,
        "mapper": _count(mapper),
    }


def step_traffic(trainable: int, frozen: int, gpus: list[int]) -> dict:
    grad = trainable * BF16
    return {
        "trainable": trainable, "frozen": frozen,
        "gradient_bytes": grad, "zero3_gather_bytes": (trainable + frozen) * BF16,
        "allreduce_bytes_per_gpu": {n: round(2 * (n - 1) / n * grad) for n in gpus},
    }


def main() -> None:
    from storygpt.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "flintstones.yaml"))
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 32])
    args = parser.parse_args()
    counts = parameter_counts(load_config(args.config))
    stage1_trainable = counts["unet"] + counts["fuser"] + counts["clip_vision_trainable"]
    stage1_frozen = counts["vae"] + counts["clip_text"] + counts["clip_vision"] - counts["clip_vision_trainable"]
    stage2_trainable = counts["w_v2t"] + counts["img_embeddings"] + counts["mapper"]
    stage2_frozen = counts["lm"] + counts["clip_vision"]
    print(json.dumps({"parameters": counts,
                      "stage1": step_traffic(stage1_trainable, stage1_frozen, args.gpus),
                      "stage2": step_traffic(stage2_trainable, stage2_frozen, args.gpus)}))


if __name__ == "__main__":
    main()
