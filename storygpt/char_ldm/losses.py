"""L_reg (paper eq. 2–3): pull each character token's cross-attention onto its mask.

For character k with token i_k and mask M_k, on a captured layer with attention A_k (head mean):
``A_k⁺ = Σ A_k·M_k / Σ M_k`` (mean attention inside), ``A_k⁻ = Σ A_k·(1−M_k) / Σ (1−M_k)``
(outside), and ``L_reg = 1/K Σ_k (A_k⁻ − A_k⁺)`` per frame; frames are averaged, then layers.
Masks are resized to each layer's h×w bilinearly *with antialiasing* (an area average when
shrinking): without it a 24 px character, sampled at 4 points of a 64 px frame on an 8×8 map,
vanished from the map most of the time and its term pushed its token's attention down everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from storygpt.char_ldm.attention import character_attention

EPS = 1e-6  # a mask that is empty (or full) at a coarse layer contributes 0 on that side


def mask_attention(
    maps: dict[str, torch.Tensor], token_idx: torch.Tensor, masks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inside, outside): mean attention of each character token in / out of its mask,
    each (layers, B, K), from captured (B·heads, h·w, L) maps and (B, K, H, W) float masks."""
    aspect = masks.shape[-2] / masks.shape[-1]
    inside, outside = [], []
    resized: dict[tuple[int, int], torch.Tensor] = {}  # layers share resolutions: resize once each
    for probs in maps.values():
        attn = character_attention(probs, token_idx, aspect).float()  # (B, K, h, w)
        size = tuple(attn.shape[-2:])
        if size not in resized:
            resized[size] = F.interpolate(masks.float(), size=size, mode="bilinear", align_corners=False,
                                          antialias=True)
        m = resized[size]
        inside.append((attn * m).sum((-2, -1)) / m.sum((-2, -1)).clamp_min(EPS))
        outside.append((attn * (1 - m)).sum((-2, -1)) / (1 - m).sum((-2, -1)).clamp_min(EPS))
    return torch.stack(inside), torch.stack(outside)


def lreg_loss(inside: torch.Tensor, outside: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """Eq. 2 averaged over frames and layers; ``supervised`` (B, K) bool marks the characters
    with a mask and a token. 0 (still in the graph) when nothing is supervised."""
    weight = supervised.to(inside.dtype)
    per_frame = ((outside - inside) * weight).sum(-1) / weight.sum(-1).clamp_min(1)  # (layers, B)
    frames = supervised.any(-1).to(inside.dtype)
    return ((per_frame * frames).sum(-1) / frames.sum().clamp_min(1)).mean()


@torch.no_grad()
def attention_in_mask_ratio(inside: torch.Tensor, outside: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """Mean attention inside the masks ÷ mean attention outside (1 = no preference; a metric).
    NaN when nothing is supervised."""
    if not supervised.any():
        return torch.tensor(float("nan"), device=inside.device)
    return inside[:, supervised].mean() / outside[:, supervised].mean().clamp_min(EPS)
