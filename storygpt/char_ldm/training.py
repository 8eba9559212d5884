"""The diffusion training maths (diffusers ``training_utils`` style): L_noise, min-SNR weights, the
prediction target. What every loop shares (LR schedule, device) is ``storygpt.training``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


def noise_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The diffusion objective: MSE between the UNet's prediction and :func:`diffusion_target`
    (ε in the paper), in fp32 whatever the autocast;
    ``weights``: one per sample (:func:`min_snr_weights`), else every sample counts the same."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    return (per_sample * weights).mean()


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ (Hang et al., 2023; diffusers' ``train_text_to_image --snr_gamma``): min(SNR, γ) / SNR
    for ε-prediction. Low-noise steps, which only sharpen detail, stop dominating the gradient, so
    layout and colour (the high-noise steps) are learned sooner. For v-prediction SNR + 1 stands
    for SNR, as in diffusers' SDXL scripts: the weight stays 1 at zero terminal SNR, where
    min(SNR, γ) / (SNR + 1) would drop exactly the step that must read the caption."""
    snr = compute_snr(scheduler, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        snr = snr + 1
    return torch.clamp(snr, max=gamma) / snr


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict at ``timesteps``: ε, or v = √ᾱ·ε − √(1−ᾱ)·x₀ (Salimans & Ho,
    2022), which stays informative where ᾱ → 0 (ε at zero SNR is just x_T)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise
