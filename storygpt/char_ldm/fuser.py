"""The fuser (paper eq. 1): a character's name token gains the look of its reference image.

``c_k = MLP(concat(ψ(S)[i_k], φ(I_k)))`` in FastComposer's shape, which the official code uses:
``mlp1`` maps the concatenation back to the text width and its output is *added* to the text
token; ``mlp2`` refines it with a residual; a final LayerNorm. Every other token keeps its plain
CLIP embedding, so a caption without characters conditions the UNet exactly as SD would.
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """LayerNorm → Linear → GELU → Linear, with an optional residual."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, residual: bool):
        super().__init__()
        if residual and in_dim != out_dim:
            raise ValueError(f"a residual MLP needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.act = nn.GELU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act(self.fc1(self.layernorm(x))))
        return out + x if self.residual else out


class CharacterFuser(nn.Module):
    def __init__(self, text_dim: int, vision_dim: int):
        super().__init__()
        self.text_dim, self.vision_dim = text_dim, vision_dim
        self.mlp1 = MLP(text_dim + vision_dim, text_dim, text_dim, residual=False)
        self.mlp2 = MLP(text_dim, text_dim, text_dim, residual=True)
        self.layer_norm = nn.LayerNorm(text_dim)

    def forward(
        self,
        text_states: torch.Tensor,  # (B, L, d_text): the text encoder's last hidden state
        char_embeds: torch.Tensor,  # (B, K, d_vision): projected CLIP image embeddings
        char_token_idx: torch.Tensor,  # (B, K) long: i_k, the token each character fuses into
        char_valid: torch.Tensor,  # (B, K) bool: which slots to fuse (others are padding)
    ) -> torch.Tensor:
        tokens = torch.gather(text_states, 1, char_token_idx[..., None].expand(-1, -1, text_states.shape[-1]))
        fused = self.mlp1(torch.cat([tokens, char_embeds.to(tokens.dtype)], dim=-1)) + tokens
        fused = self.layer_norm(self.mlp2(fused)).to(text_states.dtype)  # (B, K, d_text)
        # Place each valid slot's fused token by a one-hot product rather than indexing only the valid
        # ones: every parameter then stays in the graph (zero gradient when nothing is fused), which
        # data-parallel training needs: DeepSpeed ZeRO reduces the same gradients on every rank.
        # The product is exact (x·1 + y·0); the text states are left as they are. Slots that land on
        # one token (a character listed twice) are averaged: it is fused once, not summed twice.
        place = nn.functional.one_hot(char_token_idx, text_states.shape[1]).to(text_states.dtype)
        place = place * char_valid[..., None].to(text_states.dtype)  # (B, K, L)
        count = place.sum(1)[..., None]  # (B, L, 1)
        placed = torch.einsum("bkl,bkd->bld", place, fused) / count.clamp(min=1)
        return torch.where(count > 0, placed, text_states)
