"""Pretraining for the tiny zoo's parts that must know something before the method starts: the
VAE as an autoencoder on rendered world frames (SD's VAE has seen images before the UNet learns
its latents) and the language models by next token on the corpus (a frozen LLM has read its
language before stage 2). Called by :mod:`storygpt.zoo.build`."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from diffusers import AutoencoderKL
from diffusers.models.resnet import ResnetBlock2D

from storygpt.training import torch_threads
from storygpt.world.cast import LOOKS
from storygpt.world.render import random_frame


# Reconstruction steps on rendered frames. Each batch is one crop centred on each character (so
# every colour is seen every step: with random crops, similar hues stayed merged on some seeds)
# and one crop anywhere (backgrounds, empty frames); character pixels weigh VAE_CHARACTER_WEIGHT.
# 20 px crops: ~0.07 s a step on one core (24 px: 0.1 s, no better). At 64 px 300 steps were needed
# (after 200, 84-87% of casts were detected on 1 seed of 2); at 32 px, where a character is 7-11 px
# wide, 600 (after 300: 65%; 450: 93%; 600: 99-100% on 2 seeds).
VAE_PRETRAIN_LR, VAE_WARMUP_STEPS, VAE_CROP, VAE_RANDOM_CROPS = 2e-3, 20, 20, 1
VAE_CHARACTER_WEIGHT = 3.0
VAE_KL_WEIGHT = 1e-6  # SD's (LDM's kl_weight), against the per-image sum of the L1 error
VAE_SCALE_FRAMES = 64


def pretrain_vae(vae: AutoencoderKL, steps: int, resolution: int, seed: int) -> None:
    """L1 + KL on posterior samples, as the Char-LDM encodes (``latent_dist.sample()``): the
    decoder learns to decode the noisy latents the UNet is taught to produce, not only the mean.
    ~42 s on one CPU core with the tiny sizes (600 steps of 8 crops of 20 px)."""
    # Residual branches start at zero, a near-linear autoencoder: on 2 seeds, casts were then
    # detected in 97-100% of reconstructions, 93-95% with diffusers' initialisation.
    for block in vae.modules():
        if isinstance(block, ResnetBlock2D):
            torch.nn.init.zeros_(block.conv2.weight)
            torch.nn.init.zeros_(block.conv2.bias)
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_PRETRAIN_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / VAE_WARMUP_STEPS)
                                                 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    vae.train()
    for _ in range(steps):
        pixels, weights = _vae_batch(rng, resolution)
        posterior = vae.encode(pixels).latent_dist
        error = (vae.decode(posterior.sample(generator)).sample - pixels).abs()
        reconstruction = (error * weights).sum() / (weights.sum() * error.shape[1])
        kl = posterior.kl().mean() / pixels[0].numel()  # per pixel, like the reconstruction
        (reconstruction + VAE_KL_WEIGHT * kl).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    vae.eval()


def _vae_batch(rng: np.random.Generator, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, crop, crop) pixels in [-1, 1] and their loss weights."""
    crop = min(VAE_CROP, resolution)
    images, weights = [], []
    for name in [*LOOKS, *[None] * VAE_RANDOM_CROPS]:
        image, segments, cast = world_frame(rng, resolution, include=name)
        if name is None:
            y0, x0 = (int(v) for v in rng.integers(0, resolution - crop + 1, size=2))
        else:  # centred on one of its pixels, give or take a few
            ys, xs = np.nonzero(segments == cast.index(name) + 1)
            pick = int(rng.integers(len(ys)))
            y0, x0 = (int(np.clip(v - crop // 2 + rng.integers(-4, 5), 0, resolution - crop))
                      for v in (ys[pick], xs[pick]))
        images.append(image[y0 : y0 + crop, x0 : x0 + crop])
        weights.append(segments[y0 : y0 + crop, x0 : x0 + crop] > 0)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    mask = torch.from_numpy(np.stack(weights))[:, None].float()
    return pixels, 1 + (VAE_CHARACTER_WEIGHT - 1) * mask


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, resolution: int, seed: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the latents of fresh whole frames, sampled from the posterior
    as the Char-LDM encodes. SD's single 0.18215 gives its latents ~unit variance; this VAE's
    channels differ too much in scale and centre for one factor (std 0.23 to 1.47)."""
    rng, generator = np.random.default_rng(seed + 1), torch.Generator().manual_seed(seed + 1)
    images = np.stack([world_frame(rng, resolution)[0] for _ in range(VAE_SCALE_FRAMES)])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    latents = vae.encode(pixels).latent_dist.sample(generator)
    mean, std = latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))
    return [round(v, 5) for v in mean.tolist()], [round(v, 5) for v in std.tolist()]


def world_frame(
    rng: np.random.Generator, resolution: int, include: str | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A random world frame as the tiny preset trains on it: drawn at twice ``resolution`` (the
    world's 128 px for 64) and resized with Lanczos (``preprocess.super_resolution.backend:
    resize``). Returns the (H, W, 3) uint8 image, its (H, W) segment map (k + 1 = the k-th of the
    cast) and the cast; ``include``: a character it must show (:func:`random_frame`)."""
    frame, cast = random_frame(rng, 2 * resolution, include=include)
    image = Image.fromarray(frame.image).resize((resolution, resolution), Image.Resampling.LANCZOS)
    return np.asarray(image), frame.segments[::2, ::2], cast


LM_PRETRAIN_LR, LM_PRETRAIN_BATCH, LM_WARMUP_STEPS = 2e-3, 16, 100


def pretrain_lm(model, tokenizer, stories: list[list[str]], steps: int, seed: int) -> None:
    """Next-token training on the texts after BOS, each sentence tokenized on its own exactly as
    the aligner tokenizes captions (so mid-story captions start with the tokens the aligner feeds),
    cut to the LM's positions."""
    if steps == 0:
        return
    limit = model.config.max_position_embeddings
    texts = [([tokenizer.bos_token_id] + [i for sentence in text for i in tokenizer(sentence, add_special_tokens=False)
                                          .input_ids])[:limit] for text in stories]
    rng = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LM_PRETRAIN_LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / LM_WARMUP_STEPS)
                                                 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    with torch_threads(1):  # tiny matrices: one thread is fastest, and 10x faster on a busy machine
        _next_token_steps(model, tokenizer, texts, optimizer, schedule, steps, rng)
    model.eval()


def _next_token_steps(model, tokenizer, texts: list[list[int]], optimizer, schedule, steps: int,
                      rng: torch.Generator) -> None:
    for _ in range(steps):
        batch = [texts[i] for i in torch.randint(len(texts), (LM_PRETRAIN_BATCH,), generator=rng).tolist()]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.eos_token_id)
        labels = torch.full_like(ids, -100)  # padding is not predicted
        for row, seq in enumerate(batch):
            ids[row, :len(seq)] = labels[row, :len(seq)] = torch.tensor(seq)
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
