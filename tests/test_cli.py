import ast
import json
import subprocess
import sys

import numpy as np
import pytest

from storygpt.cli import COMMANDS, main


def test_help_lists_every_subcommand(repo):
    out = subprocess.run([sys.executable, "-m", "storygpt.cli", "--help"], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


def test_world_then_data_show_round_trip(tmp_path, capsys, repo, monkeypatch):
    monkeypatch.chdir(repo)
    assert main(["world", "--out", str(tmp_path / "w"), "--stories", "6", "--seed", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == 30
    args = ["data", "show", "--root", str(tmp_path / "w"), "--referential", "--json", "--format", "flintstones",
            "--dataset", "world"]  # the world in the FlintstonesSV layout: its own table, said explicitly
    stories = []
    for split in ("train", "val", "test"):
        assert main([*args, "--split", split, "--set", "data.on_error=raise"]) == 0
        stories += [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(stories) == 6 and all(len(s["frames"]) == 5 for s in stories)
    frames = [f for s in stories for f in s["frames"]]
    assert set(frames[0]) == {"id", "caption", "referential_caption", "characters", "boxes", "setting"}
    assert all(len(f["boxes"]) == len(f["characters"]) and all(b for b in f["boxes"]) for f in frames)
    pronouns = [f for f in frames if f["referential_caption"] != f["caption"]]
    assert pronouns  # six stories of this world always contain some
    for f in pronouns:
        words = f["referential_caption"].lower().replace(",", " ").replace(".", " ").split()
        if len(f["characters"]) == 1:
            gender = {"Ada": "f", "Cleo": "f", "Emma": "f"}.get(f["characters"][0], "m")
            assert ("she" in words or "her" in words) == (gender == "f")
            assert f["characters"][0] not in f["referential_caption"]
        else:
            assert "they" in words or "their" in words


def _flintstones_story(root):
    """A FlintstonesSV-format dir (the corpora's) whose test story names Fred and Wilma, then each alone."""
    import json as _json

    from corpora import FLINT_IDS, flintstones

    flintstones(root)
    annotations = _json.loads((root / "flintstones_annotations_v1-0.json").read_text())
    story = {fid: i for i, fid in enumerate(FLINT_IDS[2])}
    frames = [("Fred and Wilma walk in the quarry.", ["fred", "wilma"]), ("Fred sits down.", ["fred"]),
              ("Wilma waves.", ["wilma"]), ("Fred and Wilma eat.", ["fred", "wilma"]), ("Fred runs.", ["fred"])]
    for ann in annotations:
        if ann["globalID"] in story:
            caption, names = frames[story[ann["globalID"]]]
            ann["description"] = caption
            ann["characters"] = [{"entityLabel": n, "rectangle": [0, 0, 64, 64]} for n in names]
    (root / "flintstones_annotations_v1-0.json").write_text(_json.dumps(annotations))
    return root


def test_data_show_takes_the_character_table_from_the_format(tmp_path, capsys, repo, monkeypatch):
    """The first command on a download: only --format and --root (the default preset is the world's)."""
    root = _flintstones_story(tmp_path / "flintstones")
    monkeypatch.chdir(tmp_path)
    assert main(["data", "show", "--format", "flintstones", "--root", str(root), "--split", "test",
                 "--referential", "--json", "--set", "data.referential_rule=subset"]) == 0
    out = capsys.readouterr()
    [story] = [json.loads(line) for line in out.out.splitlines()]
    assert [f["characters"] for f in story["frames"]] == [["Fred", "Wilma"], ["Fred"], ["Wilma"], ["Fred", "Wilma"],
                                                          ["Fred"]]
    assert [f["referential_caption"] for f in story["frames"][1:3]] == ["He sits down.", "She waves."]
    assert json.loads(out.err)["report"]["dataset"] == "flintstones"
    # told the wrong table, the read stops naming --dataset instead of dropping every name
    assert main(["data", "show", "--format", "flintstones", "--root", str(root), "--split", "test",
                 "--dataset", "world"]) == 2
    err = capsys.readouterr().err
    assert "7 of 7 character labels are not world characters (fred, wilma" in err and "--dataset" in err


def test_missing_tiny_inputs_say_the_command_that_builds_them(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh clone's state: no world, no zoo
    assert main(["data", "show"]) == 2
    assert "render the story world: storygpt world --config tiny --set work_dir=work_dirs/tiny" in capsys.readouterr().err
    assert main(["world", "--stories", "4"]) == 0
    capsys.readouterr()
    assert main(["preprocess"]) == 2
    err = capsys.readouterr().err
    assert "models.clip_text: expected an existing directory" in err
    assert "build the tiny zoo: storygpt zoo --config tiny --set work_dir=work_dirs/tiny" in err


def test_data_show_limit_and_human_format(world_dir, capsys, repo, monkeypatch):
    monkeypatch.chdir(repo)
    assert main(["data", "show", "--root", str(world_dir), "--limit", "2"]) == 0
    out = capsys.readouterr()
    assert out.out.count("story ") == 2 and '"stories": 2' in out.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "show", "--set", "data.formt=pororo"], "data.formt: unknown key"),
        (["data", "show", "--set", "data.split=7"], "data.split: Input should be 'train', 'val' or 'test'"),
        (["data", "show", "--root", "/nonexistent"], "/nonexistent/flintstones_annotations_v1-0.json: required file is missing"),
        (["world", "--stories", "0", "--out", "/tmp/never"], "--stories: expected a positive number"),
        (["zoo", "--preset", "flintstones"], "zoo: preset 'flintstones' has no tiny model sizes"),
    ],
)
def test_bad_input_is_a_clear_error_with_exit_code_2(argv, message, capsys, repo, monkeypatch):
    monkeypatch.chdir(repo)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_model_library_never_imports_ray(repo):
    offenders = []
    for path in (repo / "storygpt").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert offenders == []


@pytest.mark.slow
def test_generate_writes_frames_grid_and_json_and_continues(tiny_work, tmp_path, capsys, repo, monkeypatch):
    """`storygpt generate` over exports saved the way the training jobs save them (untrained:
    the command's plumbing is under test, not the pictures)."""
    import torch
    from PIL import Image

    from storygpt.aligner.model import StoryAligner
    from storygpt.char_ldm.model import CharLDM
    from storygpt.config import load_config

    monkeypatch.chdir(repo)
    work = tmp_path / "work"
    cfg = load_config(repo / "configs" / "tiny.yaml", [f"work_dir={work}"] + [
        f"models.{p}={tiny_work / 'zoo' / p}" for p in ("clip_text", "clip_vision", "vae", "unet", "scheduler")]
        + [f"models.lm={tiny_work / 'zoo' / 'opt'}"])
    torch.manual_seed(0)
    CharLDM.from_config(cfg).save_trained(work / "char_ldm" / "char_ldm-1")
    StoryAligner.from_config(cfg).save_trained(work / "aligner" / "aligner-1")  # found as the latest exports
    overrides = [a for item in [f"work_dir={work}", f"models.lm={tiny_work / 'zoo' / 'opt'}", "char_ldm.sample_steps=2"]
                 + [f"models.{p}={tiny_work / 'zoo' / p}" for p in ("clip_text", "clip_vision", "vae", "unet", "scheduler")]
                 for a in ("--set", item)]
    out = tmp_path / "story"
    assert main(["generate", *overrides, "--out", str(out), "--caption", "Emma waves hello.",
                 "--caption", "Later, she sits down.", "--continue", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["frames"] == 3
    story = json.loads((out / "story.json").read_text())
    assert [f["written"] for f in story["frames"]] == [False, False, True]
    assert [f["caption"] for f in story["frames"][:2]] == ["Emma waves hello.", "Later, she sits down."]
    grid = np.asarray(Image.open(out / "story.png"))
    frame = np.asarray(Image.open(out / "frame_00.png"))
    scale = -(-192 // cfg.char_ldm.resolution)  # upscaled to >= 192 px by a whole factor, pixels kept
    assert np.array_equal(grid[8:8 + frame.shape[0] * scale, 8:8 + frame.shape[1] * scale],
                          frame.repeat(scale, 0).repeat(scale, 1))
    assert all((out / f"frame_{i:02d}.png").is_file() for i in range(3))
    assert main(["generate", *overrides, "--out", str(out)]) == 2  # no caption: an error naming --caption
    assert "--caption" in capsys.readouterr().err


def test_story_grid_upscales_frames_and_writes_each_caption_under_its_frame():
    from storygpt.story_grid import story_grid

    frames = [np.full((32, 32, 3), c, np.uint8) for c in (50, 120, 200)]
    captions = ["Emma waves hello in the forest.", "", "Later, they are eating lunch in the forest with Bruno."]
    grid = np.asarray(story_grid(frames, captions))
    assert grid.shape[1] == 8 + 3 * (192 + 8) and grid.shape[0] > 8 + 192 + 8
    for i, frame in enumerate(frames):
        x = 8 + i * 200
        assert (grid[8:200, x:x + 192] == frame[0, 0]).all()  # 32 px -> 192 px, whole
        text = grid[208:, x:x + 192]
        assert (text.min() < 128) == bool(captions[i])  # dark caption pixels exactly under captioned frames
    with pytest.raises(ValueError, match="3 frames but 2 captions"):
        story_grid(frames, captions[:2])
