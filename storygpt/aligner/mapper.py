"""Mapper_LDM (paper eq. 6; GILL's "gill_mapper"): the R [IMG] states → L × d conditioning.

The [IMG] states (the LM's last hidden state plus the [IMG] input embeddings) are projected to
``mapper_dim``, encoded by a Transformer whose decoder reads L learnable queries (L = 77, the
CLIP text length, BLIP-2 Q-Former style), and projected to the Char-LDM's width d. No dropout,
as GILL: training and inference compute the same function.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from storygpt.config import AlignerConfig


class Mapper(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, cfg: AlignerConfig):
        super().__init__()
        self.fc = nn.Linear(in_dim, cfg.mapper_dim)
        with warnings.catch_warnings():  # "nested tensors off with norm_first": expected, nothing to do
            warnings.simplefilter("ignore", UserWarning)
            self.transformer = nn.Transformer(
                d_model=cfg.mapper_dim, nhead=cfg.mapper_heads, num_encoder_layers=cfg.mapper_encoder_layers,
                num_decoder_layers=cfg.mapper_decoder_layers, dim_feedforward=cfg.mapper_ffn_dim, dropout=0.0,
                batch_first=True, norm_first=True)
        self.queries = nn.Parameter(torch.randn(cfg.mapper_queries, cfg.mapper_dim) * 0.02)
        self.out = nn.Linear(cfg.mapper_dim, out_dim)

    def forward(self, img_states: torch.Tensor) -> torch.Tensor:
        """(B, R, e) [IMG] states → (B, L, d)."""
        queries = self.queries.expand(len(img_states), -1, -1)
        return self.out(self.transformer(self.fc(img_states), queries))
