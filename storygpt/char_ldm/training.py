"""Training maths both stages share (diffusers ``training_utils`` style): one home, no copies."""

from __future__ import annotations

import math
from collections.abc import Callable

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


def warmup_lambda(warmup_steps: int, decay_steps: int | None = None) -> Callable[[int], float]:
    """``LambdaLR`` factor: linear warm-up over ``warmup_steps`` optimizer steps, then constant,
    or with ``decay_steps`` (the run's last step) a cosine decay to 0 there. The first step
    already moves (1 / warmup_steps of the rate), so no step is wasted at 0."""

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if decay_steps is None or step < warmup_steps:
            return warm
        done = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
        return warm * 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


def stage_lr_lambda(stage) -> Callable[[int], float]:
    """The ``LambdaLR`` factor a stage config asks for (``lr_schedule``, ``warmup_steps``, ``max_steps``)."""
    return warmup_lambda(stage.warmup_steps, stage.max_steps if stage.lr_schedule == "cosine" else None)
