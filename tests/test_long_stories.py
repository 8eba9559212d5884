"""Long stories (paper Table 5): runs of consecutive frames, each frame once, referential
captions over the whole run — on a sliding-window FlintstonesSV corpus and on the story world."""

import json
import subprocess
import sys

import pytest

from corpora import SLIDING_IDS, flintstones_sliding
from storygpt.data.characters import FLINTSTONES, WORLD
from storygpt.data.readers import ReadOptions, frame_position, read_long_stories, read_stories
from storygpt.data.runs import chains, consecutive_runs


def test_sliding_window_stories_give_distinct_consecutive_frames(tmp_path):
    root = flintstones_sliding(tmp_path)
    stories, _ = read_stories("flintstones", root, FLINTSTONES, ReadOptions(split="test"))
    assert len(stories) == 10  # every clip with 4 after it starts a story: they overlap
    long, report = read_long_stories("flintstones", root, FLINTSTONES, ReadOptions(split="test"), 10)
    assert len(long) == 1 and report.stories == 1
    ids = [f.id for f in long[0].frames]
    assert ids == SLIDING_IDS[:10]  # 10 distinct frames in episode order, none repeated
    assert [f.index for f in long[0].frames] == list(range(10))
    refs = [f.referential_caption for f in long[0].frames]
    # computed over the whole run: Fred keeps his pronoun across the 5-frame story boundary
    # (clip 4 -> clip 6), Wilma is named in clip 5 and Fred again in clip 6
    assert refs[:5] == ["Fred walks in clip 0."] + [f"He walks in clip {k}." for k in range(1, 5)]
    assert refs[5:8] == ["Wilma walks in clip 5.", "Fred walks in clip 6.", "He walks in clip 7."]


def test_runs_follow_shot_order_across_non_overlapping_stories_and_stop_at_gaps():
    # two 5-frame stories of one episode, then a story of another episode
    ep = [f"s_01_e_01_shot_{k * 100:06d}_{k * 100 + 99:06d}" for k in range(10)]
    other = [f"s_01_e_02_shot_{k * 100:06d}_{k * 100 + 99:06d}" for k in range(5)]
    stories = [ep[:5], ep[5:], other]
    position = frame_position("flintstones")
    assert chains(stories, position) == [ep, other]
    assert chains(stories, None) == [ep[:5], ep[5:], other]  # without the shot order: the stories
    runs = consecutive_runs(stories, 4, str, position)
    assert runs == [ep[:4], ep[4:8], other[:4]]  # whole, non-overlapping runs; no frame twice
    assert consecutive_runs(stories, 4, str, position, limit=2) == runs[:2]


def test_a_frame_with_two_successors_is_named():
    with pytest.raises(ValueError, match="frame 'a' is followed by 'b' in one story and 'c'"):
        chains([["a", "b"], ["a", "c"]])


def test_world_long_stories_stay_inside_one_episode(world_dir):
    long, _ = read_long_stories("flintstones", world_dir, WORLD, ReadOptions(split="train"), 10)
    assert long
    for story in long:
        ids = [f.id for f in story.frames]
        assert len(set(ids)) == 10
        episodes = {frame_position("flintstones")(i)[0] for i in ids}
        shots = [frame_position("flintstones")(i)[1] for i in ids]
        assert len(episodes) == 1 and shots == sorted(shots) and len(set(shots)) == 10


def test_data_show_prints_long_stories_and_pronoun_statistics(tmp_path, repo):
    root = flintstones_sliding(tmp_path)
    out = subprocess.run([sys.executable, "-m", "storygpt.cli", "data", "show", "--config", str(repo / "configs/tiny.yaml"),
                          "--format", "flintstones", "--dataset", "flintstones", "--root", str(root), "--split", "test",
                          "--long", "10", "--referential", "--json"], capture_output=True, text=True, check=True)
    stories = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(stories) == 1 and [f["id"] for f in stories[0]["frames"]] == SLIDING_IDS[:10]
    assert stories[0]["frames"][1]["referential_caption"] == "He walks in clip 1."
    stats = json.loads(out.stderr.strip().splitlines()[-1])["referential"]
    assert stats == {"rule": "equal", "pronoun_frames": 7, "pronoun_share": 0.7}
