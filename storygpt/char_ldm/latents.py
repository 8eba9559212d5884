"""The UNet's latent space: VAE latents, normalised as the VAE's own config says.

SD's VAE has one ``scaling_factor`` (0.18215) that gives its latents about unit variance. A VAE
whose channels differ in scale or sit off zero instead carries per-channel ``latents_mean`` and
``latents_std`` in its diffusers config (SDXL-derived VAEs such as Playground v2.5's): we then
standardise each channel, as diffusers' pipelines do for those VAEs. The tiny zoo's VAE is such
a VAE: with one global factor, one of its four channels had std 0.23 against 1.47 for another,
so the noise drowned it, and samples kept a colour cast.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


def _channel_stats(vae: AutoencoderKL, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, len(mean), 1, 1)
    return (torch.tensor(mean, device=like.device, dtype=like.dtype).view(shape),
            torch.tensor(std, device=like.device, dtype=like.dtype).view(shape))


def to_latent_space(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents (a posterior sample) → what the UNet denoises."""
    stats = _channel_stats(vae, latents)
    if stats is None:
        return latents * vae.config.scaling_factor
    mean, std = stats
    return (latents - mean) * vae.config.scaling_factor / std


def from_latent_space(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """What the UNet denoised → raw VAE latents for ``vae.decode`` (the inverse of the above)."""
    stats = _channel_stats(vae, latents)
    if stats is None:
        return latents / vae.config.scaling_factor
    mean, std = stats
    return latents * std / vae.config.scaling_factor + mean
