"""The Char-LDM's conditioning: frozen CLIP text states, CLIP image embeddings of the
characters, fused by :class:`~storygpt.char_ldm.fuser.CharacterFuser` at the name tokens.

One call builds any mix of the three conditionings the training schedule draws per sample:
unconditional (the empty caption), text-only (plain CLIP states) and fused.
"""

from __future__ import annotations

from enum import IntEnum

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPVisionModelWithProjection

from storygpt.char_ldm.fuser import CharacterFuser


class Conditioning(IntEnum):
    UNCONDITIONAL = 0
    TEXT = 1
    FUSED = 2


def sample_conditioning(
    batch: int, p_unconditional: float, p_text_only: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(batch,) long Conditioning per sample: p_unconditional / p_text_only / the rest fused."""
    u = torch.rand(batch, generator=generator, device=generator.device if generator is not None else None)
    mode = torch.full((batch,), int(Conditioning.FUSED), device=u.device)
    mode[u < p_unconditional + p_text_only] = Conditioning.TEXT
    mode[u < p_unconditional] = Conditioning.UNCONDITIONAL
    return mode


def train_last_vision_layers(vision: CLIPVisionModelWithProjection, layers: int) -> None:
    """Freeze the vision tower except its last ``layers`` encoder layers, the post-LayerNorm and
    the projection (the official recipe trains 2 of ViT-L/14's 24). ``layers = 0`` freezes the
    whole tower, projection included: the paper's "freeze vis" ablation."""
    encoder = vision.vision_model.encoder.layers
    if layers > len(encoder):
        raise ValueError(f"trainable_vision_layers={layers}, but the vision tower has {len(encoder)} layers")
    vision.requires_grad_(False)
    if layers == 0:
        return
    trainable = [*encoder[len(encoder) - layers:], vision.vision_model.post_layernorm, vision.visual_projection]
    for module in trainable:
        module.requires_grad_(True)


def keep_frozen_vision_layers_in(vision: CLIPVisionModelWithProjection, layers: int, dtype: torch.dtype) -> None:
    """Cast the vision tower's frozen part (all but what :func:`train_last_vision_layers` trains)
    to ``dtype``; the trained layers keep theirs. The first trained layer casts what enters it to
    its own dtype (read at each call: a wrapper such as DeepSpeed may recast the module)."""
    encoder = vision.vision_model.encoder.layers
    if layers == 0:
        vision.to(dtype)
        return
    vision.vision_model.embeddings.to(dtype)
    vision.vision_model.pre_layrnorm.to(dtype)
    for layer in encoder[:len(encoder) - layers]:
        layer.to(dtype)
    encoder[len(encoder) - layers].register_forward_pre_hook(_cast_input_to_own_dtype, with_kwargs=True)


def _cast_input_to_own_dtype(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    dtype = next(module.parameters()).dtype
    if args:
        return (args[0].to(dtype), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"].to(dtype)}


def character_embeddings(
    vision: CLIPVisionModelWithProjection, pixel_values: torch.Tensor, which: torch.Tensor
) -> torch.Tensor:
    """φ(I_k): (B, K, 3, H, W) → (B, K, d_vision), encoding only the ``which`` (B, K) slots
    (padding and unfused characters stay zero and cost nothing).

    With no slot to encode, one crop still goes through the tower and is multiplied by zero: data-
    parallel ranks must run the same modules (ZeRO-3 gathers each module's weights in its forward)
    and reduce the same gradients, whatever mix of conditionings each rank drew.
    """
    batch, chars = which.shape
    encode = which.clone()
    if not encode.any():
        encode[0, 0] = True  # the stand-in crop
    embeds = vision(pixel_values[encode].to(vision.dtype)).image_embeds  # its dtype follows any autocast
    embeds = embeds * which[encode][:, None].to(embeds.dtype)
    return embeds.new_zeros(batch, chars, embeds.shape[-1]).index_put(encode.nonzero(as_tuple=True), embeds)


def encode_prompts(
    text_encoder: CLIPTextModel,
    vision: CLIPVisionModelWithProjection,
    fuser: CharacterFuser,
    input_ids: torch.Tensor,  # (B, 77)
    empty_ids: torch.Tensor,  # (77,): the empty caption, for unconditional samples
    mode: torch.Tensor,  # (B,) Conditioning
    char_pixel_values: torch.Tensor | None = None,  # (B, K, 3, H, W)
    char_token_idx: torch.Tensor | None = None,  # (B, K) long
    char_valid: torch.Tensor | None = None,  # (B, K) bool
) -> torch.Tensor:
    """(B, 77, d_text) conditioning in the fuser's dtype (whatever the frozen encoders' is);
    fused only where ``mode`` is FUSED and a character is valid."""
    unconditional = (mode == Conditioning.UNCONDITIONAL)[:, None]
    ids = torch.where(unconditional, empty_ids.to(input_ids.device), input_ids)
    dtype = next(fuser.parameters()).dtype
    with torch.no_grad():  # the text encoder is frozen (paper §4, D.3)
        states = text_encoder(ids).last_hidden_state.to(dtype)
    if char_pixel_values is None:
        return states
    fuse = char_valid & (mode == Conditioning.FUSED)[:, None]
    embeds = character_embeddings(vision, char_pixel_values, fuse).to(dtype)
    return fuser(states, embeds, char_token_idx, fuse)
