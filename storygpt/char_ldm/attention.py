"""Capturing the UNet's cross-attention probabilities on the blocks L_reg supervises.

SDPA (``AttnProcessor2_0``) never materialises the probabilities, so the supervised ``attn2``
layers get :class:`CrossAttentionCapture`, which computes them the plain way
(``attn.get_attention_scores``) and hands them to an :class:`AttentionStore`. Every other layer
keeps SDPA. The capturing processors stay installed: with ``store.capture`` off they run SDPA
too, so switching L_reg on and off costs nothing and never touches the processor dict.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

SUFFIX = ".processor"  # diffusers names processors "<attention module path>.processor"


class AttentionStore:
    """Per captured layer, the probabilities of the last UNet call: (B·heads, h·w, L)."""

    def __init__(self) -> None:
        self.capture = False
        self.maps: dict[str, torch.Tensor] = {}

    @contextmanager
    def capturing(self, on: bool = True) -> Iterator[AttentionStore]:
        """Capture (or not) inside the block; read ``maps`` there. On exit the maps are dropped
        (they hold the autograd graph) and the previous switch comes back."""
        before, self.capture, self.maps = self.capture, on, {}
        try:
            yield self
        finally:
            self.capture, self.maps = before, {}


class CrossAttentionCapture:
    """``AttnProcessor``'s maths for a Transformer2D block's ``attn2``, recording the softmax."""

    def __init__(self, store: AttentionStore, name: str):
        self.store, self.name = store, name
        self.sdpa = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if not self.store.capture:
            return self.sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        batch, length = context.shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.store.maps[self.name] = probs
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def install_attention_store(unet: UNet2DConditionModel, blocks: list[str]) -> AttentionStore:
    """Give the ``attn2`` layers under ``blocks`` (e.g. ``down_blocks.1``) a capturing processor,
    every other layer SDPA; capture starts off. Raises if a block has no cross-attention."""
    store = AttentionStore()
    processors: dict[str, object] = {}
    found = {block: 0 for block in blocks}
    modules = dict(unet.named_modules())
    for key in unet.attn_processors:
        name = key.removesuffix(SUFFIX)
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        if block is not None and name.endswith(".attn2"):
            _check_plain_cross_attention(modules[name], name)
            processors[key] = CrossAttentionCapture(store, name)
            found[block] += 1
        else:
            processors[key] = AttnProcessor2_0()
    missing = [b for b, n in found.items() if n == 0]
    if missing:
        raise ValueError(f"lreg_blocks: no cross-attention (attn2) layers under {missing} in this UNet")
    unet.set_attn_processor(processors)
    return store


def remove_attention_store(unet: UNet2DConditionModel) -> None:
    """SDPA everywhere again (a full dict: ``set_default_attn_processor`` refuses custom ones)."""
    unet.set_attn_processor({key: AttnProcessor2_0() for key in unet.attn_processors})


def _check_plain_cross_attention(attn: Attention, name: str) -> None:
    # CrossAttentionCapture leaves out the branches a Transformer2D attn2 never takes.
    if attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
        raise ValueError(f"{name}: not a plain cross-attention layer; cannot capture it")


def character_attention(
    probs: torch.Tensor, token_idx: torch.Tensor, aspect: float = 1.0
) -> torch.Tensor:
    """(B·heads, h·w, L) probabilities → (B, K, h, w): each character token's map, head-averaged.

    ``token_idx`` (B, K) picks the tokens; ``aspect`` = height / width of the latent grid.
    """
    batch, chars = token_idx.shape
    heads, pixels = probs.shape[0] // batch, probs.shape[1]
    h = round(math.sqrt(pixels * aspect))
    w = pixels // h
    mean = probs.view(batch, heads, pixels, -1).mean(dim=1)  # linear in A: average heads first
    picked = mean.gather(2, token_idx[:, None, :].expand(batch, pixels, chars))  # (B, h·w, K)
    return picked.transpose(1, 2).reshape(batch, chars, h, w)

