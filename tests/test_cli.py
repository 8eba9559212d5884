import ast
import json
import subprocess
import sys

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
    args = ["data", "show", "--root", str(tmp_path / "w"), "--referential", "--json", "--format", "flintstones"]
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
