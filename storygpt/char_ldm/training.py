"""Training maths both stages share (diffusers ``training_utils`` style): one home, no copies."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


def noise_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The diffusion objective: MSE between predicted and true ε, in fp32 whatever the autocast;
    ``weights``: one per sample (:func:`min_snr_weights`), else every sample counts the same."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    return (per_sample * weights).mean()


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ for ε-prediction (Hang et al., 2023; diffusers' ``train_text_to_image --snr_gamma``):
    min(SNR(t), γ) / SNR(t). Low-noise steps, which only sharpen detail, stop dominating the
    gradient, so layout and colour (the high-noise steps) are learned sooner."""
    snr = compute_snr(scheduler, timesteps)
    return torch.clamp(snr, max=gamma) / snr


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """``LambdaLR`` factor: linear warm-up over ``warmup_steps`` optimizer steps, then constant.
    The first step already moves (1 / warmup_steps of the rate), so no step is wasted at 0."""

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0

    return factor
