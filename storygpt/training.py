"""What every training and inference loop shares, in one place: the learning-rate factor, the
device, the thread count. The diffusion-specific maths (L_noise, min-SNR, targets) is
``storygpt.char_ldm.training``; the stage-2 losses are ``storygpt.aligner.losses``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


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


def pick_device(num_gpus: float | None = None) -> str:
    """"cuda" where one is visible and the caller reserved a GPU (``num_gpus`` > 0; None: any
    caller that did not reserve resources), else "cpu"."""
    wants = num_gpus is None or num_gpus > 0
    return "cuda" if wants and torch.cuda.is_available() else "cpu"


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the previous count. Tiny matrices
    are fastest on one thread, and a process that reserved k CPUs should not use the machine's."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
