import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_and_says_what_it_did(tmp_path, repo):
    """The quickstart end to end on a 12-story world, with short schedules (CI time)."""
    work = tmp_path / "demo"
    short = ["data.world.stories=12", "char_ldm.max_steps=6", "char_ldm.sample_every=6", "char_ldm.log_every=2",
             "aligner.max_steps=6", "aligner.log_every=2", "train.checkpoint_every=6", "char_ldm.sample_steps=2",
             "evaluate.classifier.max_steps=2", "evaluate.captioner.max_steps=2", "evaluate.sample_steps=2"]
    out = subprocess.run(
        [sys.executable, "-m", "storygpt.cli", "demo", "--work-dir", str(work), *[a for o in short for a in ("--set", o)]],
        cwd=repo, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[11/11] serve, and draw a story over HTTP (Ray Serve)" in out.stdout and "demo finished" in out.stdout
    lines = out.stdout.splitlines()
    assert len(lines) <= 80, out.stdout  # the eleven steps and their results fit two 40-line screens
    assert not [line for line in lines if "Running Dataset" in line or "INFO" in line or "it/s]" in line], out.stdout
    assert "serve it: storygpt serve --model-uri models:/storygpt-tiny-aligner/1 --tracking-uri sqlite:///" in out.stdout
    tables = list((work / "evaluation").glob("*/table.md"))
    assert len(tables) == 1 and "| StoryGPT-V | referential |" in tables[0].read_text()
    assert tables[0].read_text().splitlines()[0] in out.stdout  # the table is printed too
    grid = work / "story" / "story.png"
    assert f"story:    {grid}" in out.stdout
    assert "(Char-LDM, exact detector: Char-Acc" in out.stdout  # the closing verdict, from the scores
    from PIL import Image

    width, height = Image.open(grid).size  # four 32 px frames upscaled to 192 px, captions under them
    assert width == 8 + 4 * (192 + 8) and height > 8 + 192 + 8
    assert len(list((work / "char_ldm").iterdir())) == len(list((work / "aligner").iterdir())) == 1
    assert (work / "mlflow.db").is_file()
    summary = json.loads((work / "dataset_summary.json").read_text())
    assert sum(summary[s]["stories"] for s in ("train", "val", "test")) == 12
    assert summary["train"]["pronoun_frames"] > 0 and summary["train"]["with_masks"] == summary["train"]["frames"]
    for part in ("clip_text", "clip_vision", "vae", "unet", "scheduler", "opt", "llama", "sam", "super_resolution"):
        assert (work / "zoo" / part).is_dir()
    manifest = json.loads((work / "records" / "manifest.json").read_text())
    assert manifest["counts"]["records_out"] == 60 and manifest["counts"]["errors"] == 0
    from storygpt.models.loading import load_unet

    assert load_unet(work / "zoo" / "unet").config.cross_attention_dim == 64


def test_demo_verdict_says_learned_only_when_both_scores_reach_twice_chance():
    from ray_jobs.demo import _verdict

    chance = {"char_acc": 0.05, "bg_acc": 0.10}
    learned = _verdict({"char_ldm/original": {"det_char_acc": 0.55, "det_bg_acc": 0.58}, "most_frequent": chance})
    assert "Char-Acc 55.0 % (chance 5.0 %), BG-Acc 58.0 % (chance 10.0 %)" in learned
    assert "twice chance)" in learned and "prove the pipeline" not in learned
    settings_missed = _verdict({"char_ldm/original": {"det_char_acc": 0.55, "det_bg_acc": 0.15},
                                "most_frequent": chance})
    assert "prove the pipeline, not the method" in settings_missed
    nothing = _verdict({"char_ldm/original": {"det_char_acc": 0.0, "det_bg_acc": 0.0},
                        "most_frequent": {"char_acc": 0.0, "bg_acc": 0.0}})
    assert "prove the pipeline, not the method" in nothing  # 0 % is not twice a chance of 0 %
