"""Stage 2's losses (paper §3.3): L_gen (eq. 4) and L_align (eq. 6), loss = λ·L_gen + L_align.

Both are normalised so that λ = 1, the paper's value, trains an aligner that resolves
references (measured: ``benchmarks/stage2_learning.py``):

* **L_align** is eq. 6's squared L2 distance per conditioning token, summed over the d
  channels and averaged over the L = 77 tokens (and the batch). A per-element mean (÷ L·d)
  would shrink it d-fold (768 at real size) beside L_gen; the official code's GILL ``l2_loss``
  (the unsquared per-token norm) sits at the same scale as this one.
* **L_gen** is eq. 4's cross-entropy of the R [IMG] tokens averaged over R (the official code's
  mean), not summed: with the sum, L_gen's pull on the parameters both losses share (the [IMG]
  rows, W_v2t) was won by growing the [IMG] rows until their states drowned the story, and
  reference accuracy stayed at chance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def generation_loss(img_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Eq. 4 averaged over R: ``img_logits`` (B, R, V + R) are the logits at the positions just
    before each [IMG_r]; [IMG_r]'s id is ``vocab_size + r``."""
    batch, r = img_logits.shape[:2]
    targets = (vocab_size + torch.arange(r, device=img_logits.device)).expand(batch, -1)
    return F.cross_entropy(img_logits.flatten(0, 1).float(), targets.flatten())


def alignment_loss(conditioning: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 6 per token: ‖Mapper(h)_t − c_t‖² summed over channels, averaged over tokens and batch."""
    return (conditioning.float() - target.float()).pow(2).sum(-1).mean()
