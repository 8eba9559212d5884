"""Write the story world to disk in the FlintstonesSV release layout.

Stories are consecutive 5-frame pieces of episodes (``storygpt.world.stories.plan_episode``);
frame ids number the shots of an episode in order, as FlintstonesSV's do, and the splits take
whole episodes. Beside the standard files it writes what the release lacks: exact segment masks
(``masks/{id}.npy``, one uint8 map per sampled frame: k + 1 = the k-th annotated character),
one reference image per character (``reference_images/{Name}.png``) and ``world.json``
(the cast's looks and the settings, for the detector). Same arguments, same bytes.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from storygpt.data.characters import WORLD
from storygpt.world.cast import LOOKS, SETTINGS
from storygpt.world.render import render_frame, render_reference
from storygpt.world.stories import FRAMES_PER_STORY, place_characters, plan_episode

ANNOTATIONS = "flintstones_annotations_v1-0.json"
SPLIT = "train-val-test_split.json"
FOLLOWING = "following_cache4.pkl"
LABELS = "labels.pkl"
FRAMES_DIR = "video_frames_sampled"
MASKS_DIR = "masks"
REFERENCES_DIR = "reference_images"
JITTER = 2  # px a character moves between the sampled frames of one clip
# Stories per episode (fewer in worlds of under 40 stories: every split gets episodes). Four make
# 20-frame episodes, the longest runs the tiny presets score, and keep a 300-story world's test
# split at 8 episodes: at ten, its 30 test stories were 3 episodes, a handful of casts and settings.
EPISODE_STORIES = 4


@dataclass
class WorldSummary:
    root: str
    stories: int
    frames: int
    splits: dict[str, int]  # stories per split


def frame_id(episode: int, frame: int) -> str:
    """FlintstonesSV-style: season, episode, and the shot's frame range, consecutive in the episode."""
    start = frame * 100
    return f"s_01_e_{episode + 1:02d}_shot_{start:06d}_{start + 99:06d}"


def stories_per_episode(stories: int) -> int:
    return max(1, min(EPISODE_STORIES, stories // 10))


def generate_world(
    out: Path,
    stories: int,
    seed: int,
    image_size: int = 128,
    clip_frames: int = 2,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> WorldSummary:
    out = Path(out)
    for sub in (FRAMES_DIR, MASKS_DIR, REFERENCES_DIR):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    annotations, following, labels, episodes = [], {}, {}, []
    per_episode = stories_per_episode(stories)
    for first in range(0, stories, per_episode):
        count = min(per_episode, stories - first)
        episode = len(episodes)
        ids = [frame_id(episode, f) for f in range(count * FRAMES_PER_STORY)]
        episodes.append([ids[k:k + FRAMES_PER_STORY] for k in range(0, len(ids), FRAMES_PER_STORY)])
        for story in episodes[-1]:
            following[story[0]] = story[1:]
        for fid, plan in zip(ids, plan_episode(rng, len(ids))):
            places = place_characters(len(plan.cast), image_size, plan.setting.horizon, rng)
            clip_images, clip_masks, rectangles = [], [], [[] for _ in plan.cast]
            for t in range(clip_frames):
                moved = [(cx + int(rng.integers(-JITTER, JITTER + 1)) * (t > 0), cy, sz) for cx, cy, sz in places]
                frame = render_frame(plan.setting, plan.cast, moved, image_size)
                clip_images.append(frame.image)
                clip_masks.append(frame.segments)
                for k, box in enumerate(frame.boxes):
                    rectangles[k].append(list(box))
            np.save(out / FRAMES_DIR / f"{fid}.npy", np.stack(clip_images))
            np.save(out / MASKS_DIR / f"{fid}.npy", np.stack(clip_masks))
            labels[fid] = np.array(WORLD.to_multi_hot(plan.cast), dtype=np.int64)
            annotations.append({
                "globalID": fid,
                "description": plan.caption,
                "setting": plan.setting.name,
                "characters": [
                    {"entityLabel": name.lower(), "labelNPC": name.lower(), "rectangles": rects}
                    for name, rects in zip(plan.cast, rectangles)
                ],
            })
    splits = _split(episodes, rng, val_fraction, test_fraction)
    _write_json(out / ANNOTATIONS, annotations)
    _write_json(out / SPLIT, {k: [fid for story in v for fid in story] for k, v in splits.items()})
    (out / FOLLOWING).write_bytes(pickle.dumps(following, protocol=4))
    (out / LABELS).write_bytes(pickle.dumps(labels, protocol=4))
    for name in WORLD.names:
        Image.fromarray(render_reference(name, image_size)).save(out / REFERENCES_DIR / f"{name}.png")
    _write_json(out / "world.json", {
        "generator": "storygpt world",
        "stories": stories, "seed": seed, "image_size": image_size, "clip_frames": clip_frames,
        "characters": [
            {"name": c.name, "gender": c.gender, **asdict(LOOKS[c.name])} for c in WORLD.characters
        ],
        "settings": [asdict(s) for s in SETTINGS],
    })
    return WorldSummary(str(out), stories, stories * 5, {k: len(v) for k, v in splits.items()})


def _split(episodes: list[list[list[str]]], rng, val_fraction, test_fraction) -> dict[str, list[list[str]]]:
    """Whole episodes per split, so a split's long stories are consecutive frames of its own."""
    order = rng.permutation(len(episodes))
    n_test = int(round(test_fraction * len(episodes)))
    n_val = int(round(val_fraction * len(episodes)))
    pick = lambda idx: [story for i in sorted(idx) for story in episodes[i]]  # noqa: E731
    return {
        "train": pick(order[n_test + n_val :]),
        "val": pick(order[n_test : n_test + n_val]),
        "test": pick(order[:n_test]),
    }


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")
