"""Aligner (stage 2) library: the eq. 5 layout, examples and batches, L_gen + L_align, what
trains, save/load, the cached story loop and its window, continuation and the reference
metric, on the tiny zoo (OPT, and Llama for the forward). No Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from storygpt.aligner.data import collate, story_examples
from storygpt.aligner.generation import StoryGenerator
from storygpt.aligner.metrics import candidate_casts, reference_accuracy, swap_character
from storygpt.aligner.model import StoryAligner
from storygpt.aligner.sequence import IMAGE, IMG, frames_to_keep, story_layout, truncated
from storygpt.config import load_config
from storygpt.data.characters import get_table

CAPTIONS = ["Fred and Barney walk to the quarry.", "He picks up a rock.", "Wilma waves at them.",
            "They eat lunch at the table.", "Barney laughs loudly.", "She reads the paper."]
CHARACTERS = [("Barney", "Fred"), ("Fred",), ("Wilma",), ("Barney", "Fred"), ("Barney",), ("Wilma",)]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models are overhead-bound: one thread is faster, and steady on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cfg(repo, tiny_work):
    return load_config(repo / "configs" / "tiny.yaml", [f"work_dir={tiny_work}"])


@pytest.fixture(scope="module")
def aligner(cfg) -> StoryAligner:
    torch.manual_seed(0)
    return StoryAligner.from_config(cfg)


def _frames(aligner, story="s0", seed=0) -> list[dict]:
    """One story's precomputed rows, shuffled; odd frames have a pronoun caption."""
    g = torch.Generator().manual_seed(seed)
    size = aligner.config.mapper_queries * aligner.out_dim
    rows = []
    for i, (caption, chars) in enumerate(zip(CAPTIONS, CHARACTERS)):
        original = caption.replace("He ", "Fred ").replace("They ", "Fred and Barney ").replace("She ", "Wilma ")
        rows.append({"id": f"{story}-{i}", "story_id": story, "frame_index": i, "split": "train",
                     "caption": original, "referential_caption": caption, "characters": list(chars),
                     "fused": torch.randn(size, generator=g).tolist(),
                     "frame_feature": torch.randn(aligner.clip_dim, generator=g).tolist()})
    return rows[::-1]


@pytest.fixture(scope="module")
def examples(aligner) -> list[dict]:
    return story_examples(_frames(aligner))


def _pattern(conditioning: torch.Tensor, seed: int, caption: str = "") -> np.ndarray:
    """A cheap deterministic 'Char-LDM': the frame depends on the seed only, so cached and
    recomputed runs feed back the very same images."""
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- layout
def test_layout_follows_eq5():
    # (BOS, I_1, S_1, I_2, S_2, S_3, [IMG_1..3]) with m = 2
    x = story_layout([2], [[5, 6], [7], [8, 9, 10]], rows=[0, 1], m=2, img=3)
    assert x.codes.tolist() == [2, IMAGE, IMAGE, 5, 6, IMAGE, IMAGE, 7, 8, 9, 10, IMG, IMG, IMG]
    assert x.slot.tolist() == [0, 0, 1, 0, 0, 2, 3, 0, 0, 0, 0, 0, 1, 2]
    first = story_layout([2], [[8, 9]], rows=[], m=2, img=3)  # frame 1: caption 1 only
    assert first.codes.tolist() == [2, 8, 9, IMG, IMG, IMG]
    with pytest.raises(ValueError, match="3 captions need 2 frames"):
        story_layout([2], [[5], [7], [8]], rows=[0], m=2, img=3)


def test_truncation_drops_the_earliest_frames():
    captions = [[1] * 5, [2] * 5, [3] * 5, [4] * 3]  # frames: m + 5 = 7 tokens each
    # BOS + last caption + R = 1 + 3 + 4 = 8; 8 + 2 frames = 22 <= 23 < 8 + 3 frames
    assert truncated(captions, 23, m=2, img=4, bos=1) == ([1, 2], [4] * 3)
    assert truncated(captions, 100, m=2, img=4, bos=1) == ([0, 1, 2], [4] * 3)
    assert truncated(captions, 7, m=2, img=4, bos=1) == ([], [4, 4])  # the last caption alone is cut
    # the story loop's window keeps frame 1 and drops the oldest middle frames first
    assert frames_to_keep([7, 7, 7, 7], fixed=8, budget=22, keep_first=True) == [0, 3]


def test_story_examples_one_per_frame(examples):
    assert [e["n"] for e in examples] == [1, 2, 3, 4, 5, 6]
    last = examples[-1]
    assert last["captions"] == CAPTIONS  # the referential captions, in story order
    assert len(last["frame_features"]) == 5 and examples[0]["frame_features"] == []
    assert last["id"] == "s0-5" and last["characters"] == ["Wilma"]
    assert [e["pronoun"] for e in examples] == [False, True, False, True, False, True]


def test_collate_truncates_pads_and_shapes(aligner, examples, cfg):
    batch = collate(examples[:3], aligner)
    m, r = cfg.aligner.visual_tokens, cfg.aligner.img_tokens
    assert batch["target"].shape == (3, cfg.aligner.mapper_queries, aligner.out_dim)
    torch.testing.assert_close(batch["target"][2].flatten(), torch.tensor(examples[2]["target"]))
    assert batch["frame_features"].shape == (0 + 1 + 2, aligner.clip_dim)
    assert ((batch["codes"] == IMAGE).sum(1) == torch.tensor([0, m, 2 * m])).all()
    assert ((batch["codes"] == IMG).sum(1) == r).all()
    lengths = batch["attention_mask"].sum(1)
    assert lengths[2] == batch["codes"].shape[1] and lengths[0] < lengths[1] < lengths[2]
    # ids 0..3 index the second example's frame (row 0), then the third's two (rows 1, 2)
    image = batch["slot"][2][batch["codes"][2] == IMAGE]
    assert image.tolist() == list(range(m, 3 * m))
    # a short max_length keeps the latest frame only: its feature, not the first frame's
    short = aligner.config.model_copy(update={"max_length": int(lengths[2]) - 1})
    full, aligner.config = aligner.config, short
    try:
        cut = collate(examples[2:3], aligner)
    finally:
        aligner.config = full
    assert (cut["codes"] == IMAGE).sum() == m
    torch.testing.assert_close(cut["frame_features"][0], torch.tensor(examples[2]["frame_features"][1]))


# ----------------------------------------------------------------------------- the training step
def test_losses_are_eq4_over_all_img_tokens_and_eq6_per_token(aligner, examples):
    assert aligner.config.gen_loss_weight == 1.0  # the preset trains at the paper's λ
    batch = collate(examples[1:4], aligner)
    out = aligner(batch)
    # eq. 4 by hand: -log p([IMG_r] | everything before it) for every r, averaged over R and the batch
    with torch.no_grad():
        hidden = aligner.hidden(aligner.embed(batch["codes"], batch["slot"], batch["frame_features"]),
                                batch["attention_mask"])
        logp = F.log_softmax(aligner.logits(hidden), -1)
    vocab, r = logp.shape[-1] - aligner.config.img_tokens, aligner.config.img_tokens
    terms = torch.stack([torch.stack([-logp[b, p - 1, vocab + k] for k, p in
                                      enumerate((batch["codes"][b] == IMG).nonzero()[:, 0])]) for b in range(3)])
    assert terms.shape == (3, r)
    assert out["gen_loss"].item() == pytest.approx(terms.mean().item(), rel=1e-5)
    assert out["gen_loss"].item() != pytest.approx(terms[:, 0].mean().item(), rel=1e-3)  # not [IMG_1] alone
    # eq. 6: the squared distance per token, summed over the d channels: d times a per-element mean
    per_token = (out["conditioning"] - batch["target"]).pow(2).sum(-1).mean()
    assert out["align_loss"].item() == pytest.approx(per_token.item(), rel=1e-5)
    d = batch["target"].shape[-1]
    assert out["align_loss"].item() == pytest.approx(d * F.mse_loss(out["conditioning"], batch["target"]).item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["gen_loss"].item() + out["align_loss"].item(), rel=1e-6)
    assert out["conditioning"].shape == batch["target"].shape and not out["conditioning"].requires_grad


@pytest.mark.parametrize("weight", [0.0, 0.25])
def test_gen_loss_weight_scales_l_gen_in_the_objective(aligner, examples, monkeypatch, weight):
    monkeypatch.setattr(aligner, "config", aligner.config.model_copy(update={"gen_loss_weight": weight}))
    out = aligner(collate(examples[1:4], aligner))
    assert out["gen_loss"].item() > 0.1  # still computed and logged
    assert out["loss"].item() == pytest.approx(weight * out["gen_loss"].item() + out["align_loss"].item(), rel=1e-6)


def test_training_lowers_both_losses_and_touches_only_the_new_parts(cfg, examples):
    torch.manual_seed(0)
    model = StoryAligner.from_config(cfg).train()
    assert not model.lm.training and model.mapper.training
    frozen = {k: v.clone() for k, v in [*model.lm.state_dict().items(), *model.vision.state_dict().items()]}
    trainable = model.trainable_parameters()
    new = [*model.visual.parameters(), model.img_embeddings, *model.mapper.parameters()]
    assert {id(p) for p in trainable} == {id(p) for p in new}
    assert all(not p.requires_grad for p in [*model.lm.parameters(), *model.vision.parameters()])
    batch = collate(examples, model)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.aligner.learning_rate, weight_decay=0.1)
    history = []
    for _ in range(12):
        out = model(batch)
        out["loss"].backward()
        if not history:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
            assert all(p.grad is None for p in model.lm.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append((out["gen_loss"].item(), out["align_loss"].item()))
    gen, align = zip(*history)
    # Adam's first step may overshoot; from then on L_gen falls every step
    assert all(b < a for a, b in zip(gen[1:], gen[2:])) and gen[-1] < 0.95 * gen[0]
    assert align[-1] < 0.85 * align[0]
    now = {**model.lm.state_dict(), **model.vision.state_dict()}
    assert all(torch.equal(now[k], v) for k, v in frozen.items())


def test_a_batch_of_first_frames_still_reaches_every_new_parameter(aligner, examples):
    """Data-parallel ranks reduce the same gradients: a rank whose micro-batch holds only first
    frames (no image in the context) must still give W_v2t a (zero) gradient."""
    firsts = [e for e in examples if e["n"] == 1]
    batch = collate(firsts, aligner)
    assert batch["frame_features"].shape[0] == 0
    aligner.zero_grad(set_to_none=True)
    aligner(batch)["loss"].backward()
    missing = [n for n, p in aligner.named_parameters() if p.requires_grad and p.grad is None]
    aligner.zero_grad(set_to_none=True)
    assert not missing, missing


def test_saved_new_parts_load_back_exactly(cfg, aligner, examples, tmp_path):
    torch.manual_seed(1)
    with torch.no_grad():  # away from the initial weights
        for p in aligner.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    aligner.save_trained(tmp_path / "aligner")
    assert {p.name for p in (tmp_path / "aligner").iterdir()} == {"model.safetensors", "config.json"}
    torch.manual_seed(2)  # other random initial new parts: the file must overwrite them
    loaded = StoryAligner.from_config(cfg, trained_dir=tmp_path / "aligner")
    batch = collate(examples[2:5], aligner)
    with torch.no_grad():
        mine, theirs = aligner(batch), loaded(batch)
    assert torch.equal(mine["conditioning"], theirs["conditioning"]) and torch.equal(mine["loss"], theirs["loss"])
    other = cfg.model_copy(update={"aligner": cfg.aligner.model_copy(update={"mapper_queries": 7})})
    with pytest.raises(ValueError, match="mapper_queries"):
        StoryAligner.from_config(other, trained_dir=tmp_path / "aligner")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        StoryAligner.from_config(cfg, trained_dir=tmp_path / "nowhere")


def test_the_captions_only_ablation_reads_no_image_in_training_or_in_the_story_loop(cfg, examples, tmp_path):
    """``aligner.interleave: false`` (Table 7's 'Caption-'): no frame's visual tokens in the LM's
    input, and an aligner trained that way refuses to load under an interleaved preset."""
    captions_only = cfg.model_copy(update={"aligner": cfg.aligner.model_copy(update={"interleave": False})})
    torch.manual_seed(0)
    model = StoryAligner.from_config(captions_only)
    batch = collate(examples, model)
    assert not (batch["codes"] == IMAGE).any() and (batch["codes"] == IMG).sum() == len(examples) * model.config.img_tokens
    interleaved = collate(examples, StoryAligner.from_config(cfg))
    assert (interleaved["codes"] == IMAGE).any()
    out = model(batch)
    out["loss"].backward()  # W_v2t stays in the graph (zero gradient): data-parallel ranks reduce the same tensors
    assert torch.isfinite(out["loss"]) and model.visual.weight.grad is not None
    generator = StoryGenerator(model, _pattern)
    seen = []
    embed = model.embed
    model.embed = lambda codes, slot, features: seen.append(codes.clone()) or embed(codes, slot, features)
    list(generator.stream(CAPTIONS[:3]))
    del model.embed
    assert seen and not any((codes == IMAGE).any() for codes in seen)
    model.save_trained(tmp_path / "captions_only")
    with pytest.raises(ValueError, match="interleave"):
        StoryAligner.from_config(cfg, trained_dir=tmp_path / "captions_only")


def test_llama_family_loads_and_trains(repo, tiny_work, examples):
    cfg = load_config(repo / "configs" / "tiny.yaml", [f"work_dir={tiny_work}", f"models.lm={tiny_work}/zoo/llama",
                                                       "aligner.lm_family=llama"])
    model = StoryAligner.from_config(cfg)
    assert model.lm.config.model_type == "llama" and model.bos == [model.tokenizer.bos_token_id]
    out = model(collate(examples[:3], model))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["conditioning"].shape[1:] == (77, model.out_dim)
    assert model.img_embeddings.grad is not None and model.visual.weight.grad.abs().sum() > 0
    wrong = load_config(repo / "configs" / "tiny.yaml", [f"work_dir={tiny_work}", "aligner.lm_family=llama"])
    with pytest.raises(ValueError, match="lm_family"):
        StoryAligner.from_config(wrong)


# ----------------------------------------------------------------------------- the story loop
def _tokens_per_call(aligner, monkeypatch) -> list[int]:
    seen: list[int] = []
    hidden = aligner.hidden

    def counted(embeds, *args, **kwargs):
        seen.append(embeds.shape[1])
        return hidden(embeds, *args, **kwargs)

    monkeypatch.setattr(aligner, "hidden", counted)
    return seen


def test_cached_frames_equal_recomputed_ones_at_constant_work(aligner, monkeypatch):
    captions = CAPTIONS * 2
    seen = _tokens_per_call(aligner, monkeypatch)
    cached = list(StoryGenerator(aligner, _pattern).stream(captions, seed=3))
    cached_tokens, seen[:] = list(seen), []
    full = list(StoryGenerator(aligner, _pattern, use_cache=False).stream(captions, seed=3))
    assert [f.index for f in cached] == list(range(12)) and [f.caption for f in cached] == captions
    for a, b in zip(cached, full):
        torch.testing.assert_close(a.conditioning, b.conditioning, rtol=1e-4, atol=1e-5)
        assert np.array_equal(a.image, b.image)
    assert cached[0].conditioning.shape == (77, aligner.out_dim)
    assert not torch.allclose(cached[0].conditioning, cached[6].conditioning)  # the context matters
    # with the cache each frame reads (I_{i-1}, S_{i-1}, S_i, [IMG]) only; recomputation grows
    ids, m, r = aligner.tokenize(captions), aligner.config.visual_tokens, aligner.config.img_tokens
    assert cached_tokens == [1 + len(ids[0]) + r] + [m + len(a) + len(b) + r for a, b in zip(ids, ids[1:])]
    assert seen[-1] == 1 + sum(m + len(a) for a in ids[:-1]) + len(ids[-1]) + r


def test_a_story_longer_than_the_context_runs_in_a_bounded_window(aligner):
    window = aligner.lm.config.max_position_embeddings  # 256 in the tiny zoo
    captions = [f"{c} Then day {i} ends." for i, c in enumerate(CAPTIONS * 7)]  # 42 frames, ~20 tokens each
    assert sum(len(ids) + 4 for ids in aligner.tokenize(captions)) > 2 * window
    generator = StoryGenerator(aligner, _pattern)
    lengths, count = [], 0
    for frame in generator.stream(captions):
        count += 1
        lengths.append(generator.cache_length)
    assert count == len(captions) and generator.longest_context <= window
    assert max(lengths) <= window and lengths[-1] > 0
    kept = [ids for ids, _ in generator.story.frames]
    assert kept[0] == aligner.tokenize(captions[:1])[0] and len(kept) < len(captions) // 3  # frame 1 stays
    assert kept[-1] == aligner.tokenize(captions[-1:])[0]
    # past the window too, the cache is exactly a recomputation over the kept frames
    full = list(StoryGenerator(aligner, _pattern, use_cache=False).stream(captions))
    torch.testing.assert_close(frame.conditioning, full[-1].conditioning, rtol=1e-4, atol=1e-5)
    small = StoryGenerator(aligner, _pattern, context_window=64)
    assert len(list(small.stream(captions[:8]))) == 8 and small.longest_context <= 64
    with pytest.raises(ValueError, match="exceeds"):
        StoryGenerator(aligner, _pattern, context_window=window + 1)


def test_stream_yields_each_frame_before_computing_the_next(aligner):
    drawn = []

    def draw(conditioning, seed, caption):
        drawn.append(seed)
        assert conditioning.shape == (1, 77, aligner.out_dim)
        return _pattern(conditioning, seed)

    stream = StoryGenerator(aligner, draw).stream(CAPTIONS, seed=10)
    first = next(stream)
    assert first.index == 0 and first.caption == CAPTIONS[0] and not first.written
    assert first.image.dtype == np.uint8 and drawn == [10]
    next(stream)
    assert drawn == [10, 11]


def test_continue_story_writes_k_captions(aligner, cfg, monkeypatch):
    frames = list(StoryGenerator(aligner, _pattern).continue_story(CAPTIONS[:2], k=2))
    assert [f.written for f in frames] == [False, False, True, True] and [f.index for f in frames] == [0, 1, 2, 3]
    assert all(len(aligner.tokenize([f.caption])[0]) <= cfg.aligner.caption_max_tokens + 2 for f in frames[2:])
    # the LM stops writing where [IMG_1] becomes its likeliest next token
    logits, calls = aligner.logits, []

    def img_after_three(hidden):
        out = logits(hidden).clone()
        calls.append(1)
        if len(calls) > 3:
            out[..., -aligner.config.img_tokens] = 1e9
        else:
            out[..., aligner.tokenize(["a"])[0][0]] = 1e9  # write "a"
        return out

    monkeypatch.setattr(aligner, "logits", img_after_three)
    written = list(StoryGenerator(aligner, _pattern).continue_story(CAPTIONS[:1], k=1))[-1]
    assert written.written and written.caption == "aaa"


def test_continuation_over_the_cache_equals_recomputation(aligner):
    """The written captions and every frame's conditioning are the same whether the LM keeps its
    cache across frames and written tokens or re-reads the whole context."""
    cached = list(StoryGenerator(aligner, _pattern).continue_story(CAPTIONS[:3], k=3))
    fresh = list(StoryGenerator(aligner, _pattern, use_cache=False).continue_story(CAPTIONS[:3], k=3))
    assert [f.caption for f in cached] == [f.caption for f in fresh]
    for a, b in zip(cached, fresh):
        torch.testing.assert_close(a.conditioning, b.conditioning, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- reference metric
def test_candidate_casts_swap_one_named_character_at_a_time():
    table = get_table("world")
    caption = "Emma sits down with Bruno in the kitchen."
    assert swap_character(caption, "Emma", "Ada", table) == "Ada sits down with Bruno in the kitchen."
    casts = candidate_casts(caption, ["Emma", "Bruno"], ["Ada", "Bruno", "Cleo", "Emma"], table)
    assert casts[0] == (caption, ["Emma", "Bruno"])  # the right cast first
    assert casts[1:] == [("Ada sits down with Bruno in the kitchen.", ["Ada", "Bruno"]),
                         ("Cleo sits down with Bruno in the kitchen.", ["Cleo", "Bruno"]),
                         ("Emma sits down with Ada in the kitchen.", ["Emma", "Ada"]),
                         ("Emma sits down with Cleo in the kitchen.", ["Emma", "Cleo"])]
    # a character the caption does not name (only in the annotation) is not swapped
    assert candidate_casts("Emma waves.", ["Emma", "Gus"], ["Ada"], table) == [
        ("Emma waves.", ["Emma", "Gus"]), ("Ada waves.", ["Ada", "Gus"])]


def test_reference_accuracy_on_constructed_embeddings():
    g = torch.Generator().manual_seed(0)
    candidates = [torch.randn(k, 4, 3, generator=g) for k in (3, 5, 2)]
    perfect = torch.stack([c[0] * 2 for c in candidates])  # cosine: the scale does not matter
    chance = (1 / 3 + 1 / 5 + 1 / 2) / 3
    assert reference_accuracy(perfect, candidates) == (1.0, pytest.approx(chance))
    wrong = torch.stack([c[1] for c in candidates])  # nearest another cast
    assert reference_accuracy(wrong, candidates)[0] == 0.0
    mixed = torch.stack([candidates[0][0], candidates[1][2], candidates[2][0]])
    assert reference_accuracy(mixed, candidates)[0] == pytest.approx(2 / 3)
    alone = [candidates[0], candidates[1][:1], candidates[2]]  # one candidate: nothing to tell, left out
    assert reference_accuracy(perfect, alone) == (1.0, pytest.approx((1 / 3 + 1 / 2) / 2))
    with pytest.raises(ValueError, match="3 predictions but 2 candidate sets"):
        reference_accuracy(perfect, candidates[:2])


def test_collate_takes_what_ray_data_hands_back(aligner, examples):
    """Arrow rows come back as numpy arrays (of arrays, of str), not lists."""
    as_numpy = [{**e, "captions": np.array(e["captions"]), "target": np.array(e["target"], dtype=np.float32),
                 "frame_features": np.array([np.array(f, dtype=np.float32) for f in e["frame_features"]])}
                for e in examples[:3]]
    mine, theirs = collate(examples[:3], aligner), collate(as_numpy, aligner)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
