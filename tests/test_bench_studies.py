"""The GPU-facing benchmark modules run their whole code path on CPU: the real-size one at
small widths (same weight layout, same loaders as the Serve deployments), the world-learning
study for a few steps."""

from __future__ import annotations

import json

import pytest

from benchmarks import real_size, world_learning


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_real_size_without_a_gpu_says_not_measured(capsys):
    real_size.main(["--device", "cpu"])
    assert _last_json(capsys)["gpu"].startswith("not measured")


@pytest.mark.slow
def test_real_size_smoke_writes_the_flintstones_layout_and_times_a_story(tmp_path, capsys):
    real_size.main(["--size", "smoke", "--device", "cpu", "--work", str(tmp_path)])
    out = _last_json(capsys)["smoke"]
    weights = tmp_path / "weights"
    for part in ("stable-diffusion-v1-5/unet", "stable-diffusion-v1-5/vae", "stable-diffusion-v1-5/text_encoder",
                 "stable-diffusion-v1-5/tokenizer", "clip-vit-large-patch14", "opt-6.7b"):
        assert (weights / part).is_dir(), part
    assert list((weights / "opt-6.7b").glob("*.safetensors"))
    story = out["story"]
    assert story["frames"] == 5 and 0 < story["time_to_first_frame_s"] <= story["story_s"]
    assert out["drawing"]["batching_gain"] > 0 and out["lm_loop"]["lm_ms_frame50_recompute"] > 0
    assert out["resolution"] == real_size.SIZES["smoke"]["resolution"]


@pytest.mark.slow
def test_world_learning_scores_against_the_train_splits_most_frequent_answer(tiny_work, repo, capsys):
    world_learning.main(["--config", str(repo / "configs" / "tiny.yaml"), "--work", str(tiny_work),
                         "--steps", "4", "--eval-every", "2", "--eval-frames", "4", "--device", "cpu",
                         "--set", "char_ldm.batch_size=4"])  # the session world has fewer train frames than 32
    out = _last_json(capsys)
    assert [p["step"] for p in out["curve"]] == [2, 4] and out["frames_scored"] == 4
    for point in out["curve"]:
        guided = [key for key in point if key.startswith("guided_")]
        assert len(guided) == 1, point
        for scores in (point["unguided"], point[guided[0]], out["chance"]):
            assert set(scores) == {"char_acc", "bg_acc"}
            assert all(0 <= v <= 1 for v in scores.values())


def test_sizing_counts_the_real_parts_on_the_meta_device(repo):
    """The published sizes (SD-1.5 UNet 859.5 M, OPT-6.7B 6.66 B, CLIP ViT-L/14 304 M): the
    sizing doc's arithmetic starts from these counts."""
    from benchmarks.sizing import parameter_counts, step_traffic
    from storygpt.config import load_config

    counts = parameter_counts(load_config(repo / "configs" / "flintstones.yaml"))
    assert counts["unet"] == 859_520_964 and round(counts["lm"] / 1e9, 2) == 6.66
    assert round(counts["clip_vision"] / 1e6) == 304 and 0 < counts["clip_vision_trainable"] < counts["clip_vision"] / 10
    traffic = step_traffic(10**9, 0, [8])
    assert traffic["gradient_bytes"] == 2 * 10**9 and traffic["allreduce_bytes_per_gpu"][8] == 3_500_000_000


def test_frame_kinds_splits_an_evaluations_frames_by_kind_and_by_cast_drawn(tmp_path):
    """Every row's saved frames re-scored by the exact detector: a named frame drawn right and a
    pronoun frame drawn with the wrong setting and nobody in it."""
    from types import SimpleNamespace

    from benchmarks.frame_kinds import ROWS, rescore
    from storygpt.world.cast import LOOKS, SETTINGS
    from storygpt.world.render import draw_background

    right, wrong = SETTINGS[0], SETTINGS[1]
    truth = {("s", 0): SimpleNamespace(caption="Ada waves.", referential_caption="Ada waves.", characters=[],
                                       setting=right.name),
             ("s", 1): SimpleNamespace(caption="Ada sits.", referential_caption="She sits.",
                                       characters=[next(iter(LOOKS))], setting=right.name)}
    for row in ROWS:
        (tmp_path / row / "5").mkdir(parents=True)
        draw_background(right, 32).save(tmp_path / row / "5" / "s_0.png")
        draw_background(wrong, 32).save(tmp_path / row / "5" / "s_1.png")
    out = rescore(tmp_path, truth)
    assert out["rows"][ROWS[0]] == {"det_char_acc_pronoun": 0.0, "det_bg_acc_pronoun": 0.0, "det_char_acc_named": 1.0,
                                    "det_bg_acc_named": 1.0, "pronoun_frames": 1, "named_frames": 1}
    assert out["det_bg_acc_by_characters_drawn"] == {"0": {"det_bg_acc": 0.5, "frames": 8}}
