"""`storygpt evaluate`: which stories it draws, the metrics it feeds to torchmetrics and
pycocoevalcap, the Table-1 layout, and (slow) the whole Ray Data job on the tiny preset."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from storygpt.evaluation.metrics import caption_scores, frechet_distance
from storygpt.evaluation.report import markdown, summarize
from storygpt.evaluation.stories import split_stories


def _records(stories: int, frames: int, split: str = "test") -> pa.Table:
    rows = [{"id": f"s{s}f{f}", "story_id": f"s{s}", "frame_index": f, "split": split, "caption": f"c{s}{f}",
             "referential_caption": f"r{s}{f}", "characters": ["Ada"], "setting": "beach"}
            for s in range(stories) for f in reversed(range(frames))]  # frames out of order on purpose
    return pa.Table.from_pylist(rows)


def test_split_stories_orders_frames_cuts_and_limits():
    table = pa.concat_tables([_records(3, 5), _records(2, 5, "train").set_column(
        1, "story_id", pa.array([f"t{i // 5}" for i in range(10)]))])
    stories = split_stories(table, "test", frames=4, limit=2)
    assert [s[0]["story_id"] for s in stories] == ["s0", "s1"]
    assert [f["frame_index"] for f in stories[0]] == [0, 1, 2, 3]
    assert split_stories(table, "test", frames=6) == []  # no test story is that long
    spread = split_stories(_records(10, 5), "test", limit=3)  # a limit samples the whole split
    assert [s[0]["story_id"] for s in spread] == ["s0", "s3", "s6"]


def test_caption_scores_reward_the_right_caption():
    refs = {"a": ["Ada and Bruno are in the kitchen."], "b": ["Cleo waves on the beach."]}
    same = caption_scores(refs, {"a": "ada and bruno are in the kitchen", "b": "Cleo waves on the beach!"})
    wrong = caption_scores(refs, {"a": "cleo sits in the forest", "b": "bruno eats in the cave"})
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-6) and wrong["bleu4"] < 0.1
    assert same["cider"] > 1.0 > wrong["cider"]


def test_bleu_and_cider_take_the_captioners_captions_of_the_real_frames_as_references():
    """Paper appendix C.1: a generated frame's caption against the captioner's captions (five
    beams) of the ground-truth frame; the human caption gives the named extra columns."""
    frames = [{"id": i, "characters": ["Ada"], "setting": "beach", "pred_characters": ["Ada"], "pred_setting": None,
               "detected_characters": None, "caption": human, "generated_caption": said}
              for i, human, said in (("a", "Ada waves hello on the beach.", "ada is standing on the beach"),
                                     ("b", "Bruno reads a book in the kitchen.", "bruno is standing in the kitchen"))]
    truth = {"a": ["ada is standing on the beach"], "b": ["bruno is standing in the kitchen"]}
    figures = summarize(frames, None, truth)
    assert figures["bleu4"] == pytest.approx(1.0, abs=1e-6) and figures["bleu4_human"] < 0.5
    assert figures["cider"] > figures["cider_human"]
    # every reference counts, not only the best beam: the match here is each frame's second caption
    several = {"a": ["cleo sits in the forest", "ada is standing on the beach"],
               "b": ["gus eats lunch in a cave", "bruno is standing in the kitchen"]}
    best_only = {i: refs[:1] for i, refs in several.items()}
    assert summarize(frames, None, several)["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert summarize(frames, None, best_only)["bleu4"] < 0.1
    assert "bleu4" not in summarize(frames, None)  # the ground-truth row: human captions only


def test_frechet_distance_is_zero_for_the_same_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 16))
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    near, far = frechet_distance(real, real + 0.1), frechet_distance(real, real + 1.0)
    assert 0 < near < far and far == pytest.approx(16.0, rel=0.05)  # |mu1 - mu2|^2 = 16 * 1.0^2
    with pytest.raises(ValueError, match="FID needs >= 2"):
        frechet_distance(real[:1], real)


def test_table_one_has_the_papers_columns_and_a_long_story_table():
    figures = {"char_acc": 0.9036, "char_f1": 0.9576, "bg_acc": 0.5836, "bg_f1": 0.6392, "fid": 21.13,
               "bleu4": 0.526, "cider": 1.8361, "det_char_acc": 0.5}
    text = markdown({"char_ldm/original": figures, "ground_truth": {"char_acc": 1.0}},
                    {"storygpt/referential": {5: {"char_acc": 0.8, "fid": 30.0}, 10: {"char_acc": 0.7, "fid": 41.5}}},
                    5, detector=True)
    header, _, row, truth, *rest = text.splitlines()
    assert header.startswith("| Method | Captions | Char-Acc ↑ | Char-F1 ↑ | BG-Acc ↑ | BG-F1 ↑ | FID ↓ | BLEU4 ↑ "
                             "| CIDEr ↑ | BLEU4 (human) ↑ | CIDEr (human) ↑ | Det. Char-Acc ↑")
    assert row.startswith("| Char-LDM | original | 90.36 | 95.76 | 58.36 | 63.92 | 21.13 | 0.5260 | 1.8361 | – | – "
                          "| 50.00")
    assert truth.startswith("| Ground truth | – | 100.00 | – |")
    assert "| StoryGPT-V | referential | 80.00 | 70.00 |" in rest  # Table 5: Char-Acc ...
    assert "| StoryGPT-V | referential | 30.00 | 41.50 |" in rest  # ... and FID by story length


def test_referential_verdict_names_the_winner_only_beyond_two_standard_errors():
    from storygpt.evaluation.report import referential_verdict

    row = lambda acc, n=150: {"det_char_acc": acc, "frames": n}  # noqa: E731
    results = {"char_ldm/original": row(0.5), "char_ldm/referential": row(0.2), "storygpt/referential": row(0.45)}
    assert referential_verdict(results).endswith("StoryGPT-V wins")
    assert "Char-LDM on named captions 50.0 %" in referential_verdict(results)
    results["storygpt/referential"] = row(0.1)
    assert referential_verdict(results).endswith("the Char-LDM alone wins")
    results["storygpt/referential"] = row(0.24, 60)  # 4 points on 60 frames: noise
    assert "no clear winner" in referential_verdict(results)
    assert referential_verdict({"char_ldm/original": row(0.5)}) is None


# ----------------------------------------------------------------------------- the Ray Data job
@pytest.mark.slow
def test_evaluate_job_draws_every_row_scores_it_and_writes_table_one(ray_local, records, repo, tiny_work, tmp_path,
                                                                      monkeypatch):
    """Untrained exports, classifier and captioner (the figures mean nothing here; the quickstart's
    are in the README): the job must draw every story of every row, score ground truth and
    generated frames alike, and report them in the table, scores.json and MLflow."""
    import json
    from pathlib import Path

    import mlflow
    import torch

    from ray_jobs.evaluate import evaluate
    from ray_jobs.tracking import tracking_uri
    from storygpt.aligner.model import StoryAligner
    from storygpt.char_ldm.model import CharLDM
    from storygpt.config import load_config
    from storygpt.data.characters import get_table
    from storygpt.evaluation.captioner import build_tiny_captioner
    from storygpt.evaluation.classifier import FrameClassifier

    zoo, work = tiny_work / "zoo", tmp_path / "work"
    cfg = load_config(repo / "configs" / "tiny.yaml", [
        f"work_dir={work}", f"preprocess.output={records}", f"models.lm={zoo / 'opt'}", "evaluate.sample_steps=2", "evaluate.max_stories=2",
        "evaluate.long_story_frames=[6]", "evaluate.long_stories=1", "evaluate.captioner.max_new_tokens=4",
        *[f"models.{p}={zoo / p}" for p in ("clip_text", "clip_vision", "vae", "unet", "scheduler")]])
    torch.manual_seed(0)
    CharLDM.from_config(cfg).save_trained(work / "char_ldm" / "char_ldm-1")
    StoryAligner.from_config(cfg).save_trained(work / "aligner" / "aligner-1")
    FrameClassifier(get_table("world").names, ["beach", "forest"], image_size=75).save_pretrained(work / "classifier")
    build_tiny_captioner(cfg.resolved(), work / "captioner")

    # the job logs to MLflow from this process, and mlflow.set_tracking_uri also exports
    # MLFLOW_TRACKING_URI: scope it to this test, or Ray nodes started later inherit this db
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(cfg.resolved()))
    out = evaluate(cfg)
    assert json.loads((Path(out["output"]) / "scores.json").read_text())["results"] == out["results"]
    stories, frames = out["stories"], out["story_frames"]
    assert stories == 2 and out["long_story_frames"] == [6]  # max_stories; the long run spans two stories
    for row in cfg.evaluate.rows:  # every story of every row drawn, saved, scored
        saved = list((work / "evaluation").glob(f"*/frames/{row.replace('/', '-')}/{frames}/*.png"))
        assert len(saved) == stories * frames
        assert out["results"][row]["frames"] == stories * frames and "fid" in out["results"][row]
        assert 0 <= out["results"][row]["det_char_acc"] <= 1 and "6" in out["long_results"][row]
    # every drawn frame carries its referential caption, so Det. Char-Acc splits by frame kind
    kinds = {row: out["results"][row]["pronoun_frames"] for row in cfg.evaluate.rows}
    assert len(set(kinds.values())) == 1 and 0 < kinds["storygpt/referential"] < stories * frames, kinds
    assert "det_char_acc_pronoun" in out["results"]["char_ldm/referential"]
    truth = out["results"]["ground_truth"]
    assert truth["det_char_acc"] >= 0.9 and truth["det_bg_acc"] >= 0.9  # the exact detector on real frames
    assert truth["frames"] >= stories * frames
    references = json.loads((Path(out["output"]) / "reference_captions.json").read_text())
    assert len(references) == truth["frames"]  # every real frame: its captioner's best beams
    assert {len(r) for r in references.values()} == {cfg.evaluate.captioner.references}
    table = (work / "evaluation").glob("*/table.md").__next__().read_text()
    assert "| StoryGPT-V | referential |" in table and "| Ground truth |" in table and "by story length" in table
    mlflow.set_tracking_uri(tracking_uri(cfg.resolved()))
    metrics = mlflow.get_run(out["run_id"]).data.metrics
    assert metrics["storygpt.referential.char_acc"] == pytest.approx(out["results"]["storygpt/referential"]["char_acc"])
    assert metrics["ground_truth.det_char_acc"] == pytest.approx(truth["det_char_acc"])


def test_detected_accuracy_is_split_into_pronoun_and_named_frames():
    def frame(caption, referential, drawn):
        return {"id": caption, "characters": ["Ada"], "setting": "beach", "pred_characters": ["Ada"],
                "pred_setting": None, "detected_characters": drawn, "detected_setting": "beach",
                "caption": caption, "referential_caption": referential, "generated_caption": "ada"}

    frames = [frame("Ada waves.", "She waves.", ["Ada"]), frame("Ada sits.", "She sits.", ["Bruno"]),
              frame("Ada runs.", "Ada runs.", ["Ada"])]
    frames[1]["detected_setting"] = "kitchen"
    figures = summarize(frames, None)
    assert figures["det_char_acc_pronoun"] == 0.5 and figures["det_char_acc_named"] == 1.0
    assert figures["det_bg_acc_pronoun"] == 0.5 and figures["det_bg_acc_named"] == 1.0
    assert figures["det_char_acc"] == pytest.approx(2 / 3)


def test_caption_scores_survive_references_without_words():
    """An untrained captioner's captions of the real frames are empty: the paper's references are
    then wordless, and the scores are 0, not an error."""
    scores = caption_scores({"a": [""], "b": [""]}, {"a": "ada waves", "b": ""})
    assert scores["cider"] == 0.0 and scores["bleu4"] < 1e-6
