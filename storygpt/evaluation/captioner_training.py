"""Fine-tuning the BLIP-2 captioner of :mod:`storygpt.evaluation.captioner` on the train split's
frames and original captions (``storygpt train-captioner``).

Tiny presets train all of the small BLIP-2 (built first by
:func:`~storygpt.evaluation.captioner.build_tiny_captioner` when the dir does not exist); a real
BLIP-2 is fine-tuned BLIP-2's way (frozen ViT and LLM). Sequences are
``<image> x Q, BOS, caption, EOS`` with labels on caption + EOS (:func:`caption_batch`); AdamW,
linear warm-up then cosine to zero. The result is saved back in place, atomically, with the run's
figures beside it (``TRAINING_FILE``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from storygpt.config import ConfigError, StoryConfig
from storygpt.training import pick_device, torch_threads, warmup_lambda
from storygpt.evaluation.captioner import (
    _MISSING_HINT,
    _pixels,
    _rgb,
    _save_atomically,
    build_tiny_captioner,
    load_blip2,
    prompt_ids,
)

WEIGHT_DECAY = 0.05  # BLIP-2's fine-tuning recipe
WARMUP_FRACTION = 0.05  # linear warm-up over this share of the steps, then cosine to zero
TRAINING_FILE = "captioner_training.json"  # figures of the last train_captioner run, beside the weights


def train_captioner(
    cfg: StoryConfig, records_dir: str | Path | None = None, device: str | torch.device | None = None
) -> dict:
    """Fine-tune the captioner at ``evaluate.captioner.model`` on the train split's frames and
    original captions and save it back in place (atomically); returns the run's figures.

    Tiny presets (``zoo:`` set) build the captioner first if the dir does not exist and train all
    of it; a real BLIP-2 is fine-tuned BLIP-2's way (frozen ViT and LLM: Q-Former, query tokens
    and projection train). ``device`` None: CUDA when there is one and ``train.use_gpu``.
    """
    cap = cfg.evaluate.captioner
    directory = cfg.path(cap.model)
    records_dir = Path(records_dir) if records_dir is not None else cfg.path(cfg.preprocess.output)
    if not directory.is_dir() and cfg.zoo is None:
        raise ConfigError(
            f"evaluate.captioner.model: expected an existing directory, got '{directory}' ({_MISSING_HINT})")
    frames, captions = train_frames(records_dir)
    built = False
    if not directory.is_dir():
        build_tiny_captioner(cfg, directory)
        built = True
    if device is None:
        device = pick_device(1 if cfg.train.use_gpu else 0)
    device = torch.device(device)
    train_everything = cfg.zoo is not None
    dtype = torch.float32 if train_everything or device.type == "cpu" else torch.bfloat16

    # tiny matrices on a shared machine: one CPU thread is fastest
    with torch_threads(1 if device.type == "cpu" else torch.get_num_threads()):
        started = time.perf_counter()
        model, processor = load_blip2(directory, device, dtype)
        params, frozen = _trainable(model, train_everything)
        losses = _fit(model, processor, frames, captions, params, frozen, cap, cfg.seed, device)
        seconds = time.perf_counter() - started
    tail = losses[-min(10, len(losses)):]
    summary = {
        "captioner": str(directory),
        "built": built,
        "frames": len(frames),
        "steps": len(losses),
        "batch_size": cap.batch_size,
        "trained": "all" if train_everything else "qformer+queries+projection",
        "trainable_parameters": sum(p.numel() for p in params),
        "first_loss": round(losses[0], 4),
        "last_loss": round(float(np.mean(tail)), 4),  # the mean of the last 10 steps
        "seconds": round(seconds, 1),
        "device": str(device),
    }
    model.eval()
    _save_atomically(directory, model, processor, {TRAINING_FILE: json.dumps(summary, indent=1)})
    return summary


def train_frames(records_dir: str | Path, split: str = "train") -> tuple[list[bytes], list[str]]:
    """(PNG bytes, original caption) of a split's records; raises naming the dir if there are none."""
    from storygpt.data.record_schema import read_table

    rows = read_table(records_dir, columns=["caption", "image"], filters=[("split", "=", split)]).to_pylist()
    if not rows:
        raise ConfigError(f"--records: no '{split}' records in '{Path(records_dir) / 'records'}' "
                          "(run `storygpt preprocess` first, or pass --records DIR)")
    return [r["image"] for r in rows], [r["caption"] for r in rows]


def _trainable(model, everything: bool) -> tuple[list[torch.nn.Parameter], list[torch.nn.Module]]:
    """(parameters to train, modules kept frozen and in eval mode)."""
    frozen = []
    if not everything:
        frozen = [model.vision_model, model.language_model]
        model.requires_grad_(False)
        for module in (model.qformer, model.language_projection):
            module.requires_grad_(True)
        model.query_tokens.requires_grad_(True)
        model.language_projection.float()  # the one trainable part outside transformers' fp32 list
    return [p for p in model.parameters() if p.requires_grad], frozen


def caption_batch(model, tokenizer, captions: list[str]) -> dict[str, torch.Tensor]:
    """``<image> x Q, BOS, caption, EOS`` right-padded, with labels on caption + EOS only."""
    prompt = prompt_ids(model, tokenizer, 1)[0].tolist()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    texts = [tokenizer(c, add_special_tokens=False).input_ids + [eos] for c in captions]
    width = len(prompt) + max(map(len, texts))
    ids = torch.full((len(texts), width), pad, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, text in enumerate(texts):
        seq = prompt + text
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        labels[row, len(prompt):len(seq)] = torch.tensor(text)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _fit(
    model, processor, frames: list[bytes], captions: list[str], params, frozen, cap, seed: int, device
) -> list[float]:
    from storygpt.data.record_schema import decode_png

    optimizer = torch.optim.AdamW(params, lr=cap.learning_rate, weight_decay=WEIGHT_DECAY)
    warmup = max(1, int(WARMUP_FRACTION * cap.max_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(warmup, cap.max_steps))  # cosine to zero
    rng = np.random.default_rng(seed)
    images: dict[int, np.ndarray] = {}  # decoded frames, kept while they fit CACHE_BYTES
    order: list[int] = []
    losses: list[float] = []
    model.train()
    for module in frozen:
        module.eval()
    for _ in range(cap.max_steps):
        if len(order) < cap.batch_size:  # epochs of shuffled frames
            order += rng.permutation(len(frames)).tolist()
        picked, order = order[:cap.batch_size], order[cap.batch_size:]
        batch = [_decoded(images, frames, i, decode_png) for i in picked]
        pixels = _pixels(processor, batch, device, model.dtype)
        text = caption_batch(model, processor.tokenizer, [captions[i] for i in picked])
        text = {k: v.to(device) for k, v in text.items()}
        loss = model(pixel_values=pixels, **text).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


CACHE_BYTES = 1 << 30  # decoded frames kept in memory (the tiny world's 240 at 64 px: 3 MB)


def _decoded(cache: dict[int, np.ndarray], frames: list[bytes], i: int, decode) -> np.ndarray:
    if i in cache:
        return cache[i]
    image = _rgb(decode(frames[i]))
    if image.nbytes * len(frames) <= CACHE_BYTES:
        cache[i] = image
    return image
