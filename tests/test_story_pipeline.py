"""StoryGPTPipeline, the one assembly of the story loop and the Char-LDM: the reference-image
policy (a caption naming a character with a reference is drawn from the Char-LDM's fused
conditioning, every other frame from the LM's), the draw settings, and a remote draw. Tiny zoo,
untrained aligner and Char-LDM, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storygpt.aligner.model import StoryAligner
from storygpt.char_ldm.model import CharLDM
from storygpt.char_ldm.pipeline import CharLDMPipeline
from storygpt.config import load_config
from storygpt.data.characters import get_table
from storygpt.pipeline import StoryGPTPipeline, referenced

CAPTIONS = ["Ada waves hello at the beach.", "She sits down.", "Bruno and Ada are talking."]


class RecordingCharLDM(CharLDMPipeline):
    """The real sampler, remembering what each frame was drawn from."""

    calls: list[dict]

    def __call__(self, **call):
        self.calls.append(call)
        return super().__call__(**call)


@pytest.fixture(scope="module")
def story(repo, tiny_work):
    cfg = load_config(repo / "configs" / "tiny.yaml", [f"work_dir={tiny_work}"])  # the session's zoo
    torch.manual_seed(0)
    char_ldm = RecordingCharLDM(CharLDM.from_config(cfg).eval(), cfg)
    return StoryGPTPipeline(cfg, StoryAligner.from_config(cfg).eval(), char_ldm)


def test_referenced_names_the_characters_with_a_reference_once_in_caption_order():
    table = get_table("world")
    refs = {"Ada": 0, "Bruno": 0}
    assert referenced("Bruno and Ada wave. Ada laughs; Cleo too.", refs, table) == ["Bruno", "Ada"]
    assert referenced("She sits down.", refs, table) == [] and referenced("Ada waves.", {}, table) == []


def test_named_captions_with_a_reference_are_drawn_from_the_fused_conditioning(story):
    look = np.full((32, 32, 3), 200, dtype=np.uint8)
    story.char_ldm.calls = []
    frames = list(story.stream(CAPTIONS, seed=4, steps=2, guidance=2.0, references={"Ada": look}))
    calls = story.char_ldm.calls
    assert len(frames) == len(calls) == 3
    assert [c["seed"] for c in calls] == [4, 5, 6] and all(c["steps"] == 2 and c["guidance_scale"] == 2.0
                                                            for c in calls)
    assert [c["plain_captions"] for c in calls] == [[c] for c in CAPTIONS]
    fused_ada = story.char_ldm.encode([CAPTIONS[0]], [["Ada"]], {"Ada": look})
    assert torch.allclose(calls[0]["conditioning"], fused_ada)  # named, with a reference: the Char-LDM's own
    assert torch.allclose(calls[1]["conditioning"][0], frames[1].conditioning)  # a pronoun: the LM's
    fused_both = story.char_ldm.encode([CAPTIONS[2]], [["Ada"]], {"Ada": look})  # Bruno has no reference
    assert torch.allclose(calls[2]["conditioning"], fused_both)

    story.char_ldm.calls = []
    plain = list(story.stream(CAPTIONS, seed=4, steps=2, guidance=2.0))  # no references: every frame the LM's
    assert all(torch.allclose(c["conditioning"][0], f.conditioning) for c, f in zip(story.char_ldm.calls, plain))


def test_first_frame_references_draw_frame_one_alone_from_the_char_ldm(story):
    """The official evaluation's frame 1: the Char-LDM's fused conditioning with the references;
    a later frame that names the same character stays the LM's."""
    look = np.full((32, 32, 3), 90, dtype=np.uint8)
    story.char_ldm.calls = []
    frames = list(story.stream(CAPTIONS, seed=0, steps=2, guidance=2.0, first_frame_references={"Ada": look}))
    calls = story.char_ldm.calls
    assert torch.allclose(calls[0]["conditioning"], story.char_ldm.encode([CAPTIONS[0]], [["Ada"]], {"Ada": look}))
    assert not torch.allclose(calls[0]["conditioning"][0], frames[0].conditioning)
    assert all(torch.allclose(c["conditioning"][0], f.conditioning) for c, f in zip(calls[1:], frames[1:]))


def test_a_remote_draw_replaces_the_local_char_ldm(story):
    seen = []

    def draw(conditioning, seed, caption):
        seen.append((seed, caption))
        return np.zeros((8, 8, 3), dtype=np.uint8)

    remote = StoryGPTPipeline(story.cfg, story.aligner, draw=draw)
    assert [f.image.shape for f in remote.stream(CAPTIONS[:2], seed=1)] == [(8, 8, 3)] * 2
    assert seen == [(1, CAPTIONS[0]), (2, CAPTIONS[1])]
    with pytest.raises(ValueError, match="its own reference policy"):  # the remote side holds the references
        list(remote.stream(CAPTIONS[:1], first_frame_references={"Ada": np.zeros((8, 8, 3), np.uint8)}))
    with pytest.raises(ValueError, match="not both"):
        StoryGPTPipeline(story.cfg, story.aligner, story.char_ldm, draw=draw)
