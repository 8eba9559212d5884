"""Stage-2 targets on a real local Ray: one row per record, equal to the in-process encoding,
fused at the names, the pretrained CLIP frame feature; resume; another Char-LDM refused."""

import json
import shutil

import numpy as np
import pytest
import torch

from storygpt.config import ConfigError, load_config

pytestmark = pytest.mark.slow


def _cfg(repo, work, *overrides):
    return load_config(repo / "configs" / "tiny.yaml", [f"work_dir={work}", *overrides])


def _save_char_ldm(cfg, out, seed):
    """A "trained" Char-LDM without training: random fuser; the vision tower's trainable tensors
    moved off the pretrained ones, so using the wrong tower for crops or frames shows."""
    from storygpt.char_ldm.model import CharLDM

    torch.manual_seed(seed)
    model = CharLDM.from_config(cfg)
    with torch.no_grad():
        for p in model.vision.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.save_trained(out)
    return out


@pytest.fixture(scope="module")
def setup(records, tiny_work, repo, tmp_path_factory):
    from preprocessing.precompute import precompute

    root = tmp_path_factory.mktemp("precompute")
    cfg = _cfg(repo, tiny_work, f"preprocess.output={records}", f"precompute.output={root}/fused",
               "preprocess.rows_per_file=16")
    char_ldm = _save_char_ldm(cfg, root / "char_ldm-a", seed=0)
    manifest = precompute(cfg, char_ldm=char_ldm)
    return cfg, root, records, char_ldm, manifest


def test_one_target_per_record_equal_to_the_in_process_encoding(setup):
    from storygpt.char_ldm.data import collate
    from storygpt.char_ldm.encoders import Conditioning
    from storygpt.char_ldm.model import CharLDM
    from storygpt.char_ldm.targets import crop_generator, read_target_info, read_targets, target_arrays
    from storygpt.data.record_schema import read_table

    cfg, root, records_dir, char_ldm, manifest = setup
    records = read_table(records_dir).to_pylist()
    table = read_targets(root / "fused")
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) == len(records) == manifest["counts"]["targets_out"] == 100
    assert set(ids) == {r["id"] for r in records}
    info = read_target_info(root / "fused")
    assert info["char_ldm"] == manifest["char_ldm"] == str(char_ldm.resolve())
    shape = manifest["shape"]
    assert shape == info["shape"] == {"tokens": 77, "dim": 64, "clip_dim": 64}
    fused, frames = target_arrays(table, shape)
    assert fused.shape == (100, 77, 64) and frames.shape == (100, 64) and np.isfinite(fused).all()
    assert read_targets(root / "fused", split="val").num_rows == sum(r["split"] == "val" for r in records)

    by_id = {r["id"]: r for r in records}
    row_of = {i: n for n, i in enumerate(ids)}
    named = [r for r in records if any(s is not None for s in r["token_spans"])]
    sample = named[:3] + [r for r in records if not r["characters"]][:1]
    assert len(sample) == 4
    for r in sample:  # metadata carried over
        t = table.slice(row_of[r["id"]], 1).to_pylist()[0]
        assert {k: t[k] for k in ("story_id", "frame_index", "split", "caption", "referential_caption",
                                  "characters")} == {k: r[k] for k in t if k not in ("id", "fused", "frame_feature")}

    model = CharLDM.from_config(cfg, char_ldm).eval()
    with torch.no_grad():
        for r in sample:
            batch = collate([by_id[r["id"]]], model, cfg.char_ldm, crop_generator(r["id"], cfg.seed))
            args = (batch["char_pixel_values"], batch["char_token_idx"], batch["char_valid"])
            expected = model.encode_prompts(batch["input_ids"], torch.tensor([int(Conditioning.FUSED)]), *args)[0]
            text_only = model.encode_prompts(batch["input_ids"], torch.tensor([int(Conditioning.TEXT)]), *args)[0]
            got = torch.tensor(fused[row_of[r["id"]]])
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
            names = {s[1] - 1 for s in r["token_spans"][: cfg.char_ldm.max_characters] if s is not None}
            differs = {int(i) for i in ((got - text_only).abs().amax(-1) > 1e-4).nonzero()}
            assert differs == names  # fused exactly at the name tokens, plain CLIP states elsewhere


def test_captions_fused_with_reference_crops_match_the_sampling_pipeline(setup):
    """encode_named (the aligner's candidate casts) = CharLDMPipeline.encode (what sampling fuses)."""
    from storygpt.char_ldm.pipeline import CharLDMPipeline
    from storygpt.char_ldm.references import train_reference_crops
    from storygpt.char_ldm.targets import StageTwoTargets
    from storygpt.data.characters import get_table

    cfg, _, records_dir, char_ldm, _ = setup
    table = get_table(cfg.data.dataset)
    references = train_reference_crops(records_dir, table.names, cfg.seed)
    assert len(references) >= 2
    a, b = sorted(references)[:2]
    captions = [f"{a} waves hello in the forest.", f"{a} and {b} eat lunch.", "Nobody is here."]
    characters = [[a], [a, b], []]
    got = StageTwoTargets(cfg, char_ldm).encode_named(captions, characters, references, table)
    expected = CharLDMPipeline.from_config(cfg, char_ldm).encode(captions, characters, references)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got[0], StageTwoTargets(cfg, char_ldm).encode_named(
        [captions[0]], [[a]], {a: references[b]}, table)[0])  # another look, another embedding


def test_frame_feature_is_the_pretrained_clip_image_embedding(setup):
    from storygpt.char_ldm.targets import read_targets
    from storygpt.data.record_schema import decode_png, read_table
    from storygpt.models.loading import load_clip_vision

    cfg, root, records_dir, char_ldm, _ = setup
    records = read_table(records_dir, columns=["id", "image"]).to_pylist()[:4]
    table = read_targets(root / "fused", columns=["id", "frame_feature"]).to_pylist()
    got = {t["id"]: t["frame_feature"] for t in table}
    processor, vision = load_clip_vision(cfg.path(cfg.models.clip_vision))
    with torch.no_grad():
        pixels = processor(images=[decode_png(r["image"]) for r in records], return_tensors="pt").pixel_values
        expected = vision.eval()(pixels).image_embeds
    torch.testing.assert_close(torch.tensor([got[r["id"]] for r in records]), expected, atol=1e-5, rtol=1e-4)


def test_targets_do_not_depend_on_batching(setup):
    from storygpt.char_ldm.targets import StageTwoTargets
    from storygpt.data.record_schema import read_table

    cfg, _, records_dir, char_ldm, _ = setup
    rows = read_table(records_dir).to_pylist()[:5]
    targets = StageTwoTargets(cfg, char_ldm)
    together = targets(rows)
    alone = [targets([r])[0] for r in rows[::-1]][::-1]
    for a, b in zip(together, alone):
        assert a["id"] == b["id"]
        np.testing.assert_allclose(a["fused"], b["fused"], atol=1e-5)
        np.testing.assert_allclose(a["frame_feature"], b["frame_feature"], atol=1e-5)


def test_the_emb_text_ablation_targets_the_plain_caption_and_is_not_mixed_with_fused_targets(setup):
    """``precompute.target: text`` (Table 4's 'Emb text'): the caption's CLIP states, no fusion."""
    from preprocessing.precompute import precompute
    from storygpt.char_ldm.data import tokenize
    from storygpt.char_ldm.targets import StageTwoTargets
    from storygpt.data.record_schema import read_table

    cfg, root, records_dir, char_ldm, _ = setup
    rows = [r for r in read_table(records_dir).to_pylist() if r["characters"]][:3]
    text_cfg = cfg.model_copy(update={"precompute": cfg.precompute.model_copy(update={"target": "text"})})
    fused, _ = StageTwoTargets(cfg, char_ldm).encode(rows)
    plain, _ = StageTwoTargets(text_cfg, char_ldm).encode(rows)
    encoder = StageTwoTargets(text_cfg, char_ldm)
    with torch.no_grad():
        expected = encoder.text_encoder(tokenize(encoder.tokenizer, [r["caption"] for r in rows])).last_hidden_state
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(fused, plain, atol=1e-4)  # the fused names differ
    with pytest.raises(ConfigError, match="precompute.target"):  # the fused output is not extended with text targets
        precompute(text_cfg, char_ldm=char_ldm)


def test_rerun_skips_finished_parts_and_redoes_unfinished_ones(setup, tmp_path):
    import ray

    from preprocessing.precompute import precompute
    from storygpt.char_ldm.targets import read_targets, target_files

    cfg, root, _, char_ldm, first = setup
    out = tmp_path / "fused"
    shutil.copytree(root / "fused", out)
    cfg = cfg.model_copy(update={"precompute": cfg.precompute.model_copy(update={"output": str(out)})})
    again = precompute(cfg, char_ldm=char_ldm)
    assert again["counts"]["computed"] == 0 and again["counts"]["already_done"] == 100
    markers = sorted((out / "done").glob("*.json"))
    assert len(markers) == first["counts"]["parts"] >= 2
    lost = json.loads(markers[0].read_text())["ids"]
    markers[0].unlink()  # as if the run had died before this part's marker
    with pytest.raises(FileNotFoundError, match="precompute has not finished"):
        target_files(out)
    (out / "targets" / ".part-x.parquet.tmp").write_bytes(b"half")
    before = read_targets(root / "fused").sort_by("id")
    resumed = precompute(cfg, char_ldm=char_ldm)
    assert resumed["counts"]["computed"] == len(lost) and resumed["counts"]["already_done"] == 100 - len(lost)
    after = read_targets(out).sort_by("id")
    assert after["id"].to_pylist() == before["id"].to_pylist() and resumed["counts"]["duplicates"] == 0
    assert not list((out / "targets").glob(".*.tmp"))
    assert ray.data.read_parquet(target_files(out)).count() == 100  # what train-aligner reads
    np.testing.assert_allclose(np.asarray(after["fused"].combine_chunks().flatten()),
                               np.asarray(before["fused"].combine_chunks().flatten()), atol=1e-5)


def test_another_char_ldm_is_refused(setup, tmp_path):
    from preprocessing.precompute import precompute

    cfg, root, _, char_ldm, _ = setup
    other = _save_char_ldm(cfg, tmp_path / "char_ldm-b", seed=1)
    with pytest.raises(ConfigError, match="holds targets of the Char-LDM .*char_ldm-a.*not .*char_ldm-b"):
        precompute(cfg, char_ldm=other)
    assert len(list((root / "fused" / "targets").glob("*.parquet"))) == len(list((root / "fused" / "done").iterdir()))


def test_default_char_ldm_is_the_latest_finished_export(tiny_work, repo, tmp_path):
    from preprocessing.precompute import find_char_ldm

    cfg = _cfg(repo, tmp_path)
    with pytest.raises(ConfigError, match="models.char_ldm: not set and no export"):
        find_char_ldm(cfg)
    exports = tmp_path / "char_ldm"
    for name in ("char_ldm-20260101-000000", "char_ldm-20260102-000000"):
        for part in ("fuser", "vision"):
            (exports / name / part).mkdir(parents=True)
            (exports / name / part / "config.json").write_text("{}")
    assert find_char_ldm(cfg) == (exports / "char_ldm-20260102-000000").resolve()
    pinned = _cfg(repo, tmp_path, f"models.char_ldm={exports}/char_ldm-20260101-000000")
    assert find_char_ldm(pinned).name == "char_ldm-20260101-000000"
    assert find_char_ldm(cfg, exports / "char_ldm-20260101-000000").name == "char_ldm-20260101-000000"
    (exports / "char_ldm-20260103-000000" / "fuser").mkdir(parents=True)  # still being written
    with pytest.raises(ConfigError, match="models.char_ldm: .* is not a finished Char-LDM export"):
        find_char_ldm(cfg)
