"""Training maths both stages share (diffusers ``training_utils`` style): one home, no copies."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def noise_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The diffusion objective: MSE between predicted and true ε, in fp32 whatever the autocast."""
    return F.mse_loss(pred.float(), target.float())


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """``LambdaLR`` factor: linear warm-up over ``warmup_steps`` optimizer steps, then constant.
    The first step already moves (1 / warmup_steps of the rate), so no step is wasted at 0."""

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0

    return factor
