"""Delayed conditioning (``char_ldm.delayed_conditioning``): the first share of the sampling steps
sees the plain caption's CLIP states, the rest the fused or the LM's conditioning; 0 leaves
sampling as it was. Tiny zoo, random UNet, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storygpt.char_ldm.model import CharLDM
from storygpt.char_ldm.pipeline import CharLDMPipeline
from storygpt.config import load_config

CAPTIONS = ["Ada and Bruno are at the beach.", "Gus sits down."]


@pytest.fixture(scope="module")
def model_and_cfg(repo, tiny_work):
    cfg = load_config(repo / "configs" / "tiny.yaml", [f"work_dir={tiny_work}"])  # the session's zoo
    torch.manual_seed(0)
    return CharLDM.from_config(cfg).eval(), cfg


def _pipeline(model_and_cfg, share: float) -> CharLDMPipeline:
    model, cfg = model_and_cfg
    return CharLDMPipeline(model, cfg.model_copy(update={
        "char_ldm": cfg.char_ldm.model_copy(update={"delayed_conditioning": share})}))


def _conditionings_seen(pipe: CharLDMPipeline, **call) -> list[torch.Tensor]:
    """The conditional half of the encoder states of every UNet call of one sampling run."""
    seen = []
    hook = pipe.model.unet.register_forward_pre_hook(
        lambda module, args: seen.append(args[2][len(args[2]) // 2:].clone()))
    try:
        frames = pipe(steps=4, guidance_scale=3.0, seed=1, **call)
    finally:
        hook.remove()
    assert len(frames) == len(CAPTIONS)
    return seen


def test_the_first_share_of_the_steps_sees_the_plain_caption(model_and_cfg):
    pipe = _pipeline(model_and_cfg, 0.5)
    given = torch.randn(len(CAPTIONS), 77, pipe.model.text_encoder.config.hidden_size)
    plain = pipe.encode_plain(CAPTIONS)
    seen = _conditionings_seen(pipe, conditioning=given, plain_captions=CAPTIONS)
    assert len(seen) == 4
    assert all(torch.allclose(s, plain) for s in seen[:2])  # round(0.5 * 4) = 2 steps of plain text
    assert all(torch.allclose(s, given) for s in seen[2:])


def test_off_by_default_and_without_captions(model_and_cfg):
    given = torch.randn(len(CAPTIONS), 77, 64)
    for pipe, call in ((_pipeline(model_and_cfg, 0.0), {"plain_captions": CAPTIONS}),  # the share is 0
                       (_pipeline(model_and_cfg, 0.5), {})):  # no text to delay with
        assert all(torch.allclose(s, given) for s in _conditionings_seen(pipe, conditioning=given, **call))


def test_char_ldm_rows_delay_with_their_own_caption_and_batches_match_single_calls(model_and_cfg):
    pipe = _pipeline(model_and_cfg, 0.5)
    seen = _conditionings_seen(pipe, captions=CAPTIONS)
    assert torch.allclose(seen[0], pipe.encode_plain(CAPTIONS)) and torch.allclose(seen[-1], pipe.encode(CAPTIONS))
    given = torch.randn(len(CAPTIONS), 77, 64)
    batched = pipe.sample(given, seeds=[3, 4], steps=4, guidance_scales=3.0, plain_captions=CAPTIONS)
    alone = [pipe(conditioning=given[b:b + 1], steps=4, guidance_scale=3.0, seed=s, plain_captions=[CAPTIONS[b]])[0]
             for b, s in enumerate([3, 4])]
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 2 for a, b in zip(batched, alone))
    plain_only = pipe.sample(given, seeds=[3, 4], steps=4, guidance_scales=3.0)
    assert any(not np.array_equal(a, b) for a, b in zip(batched, plain_only))  # the delay changed the frames
