"""Hand-built miniature corpora in each dataset's layout (not written by the story world)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

FLINT_IDS = [[f"s_05_e_12_shot_{i:06d}_{i + 50:06d}" for i in range(s * 500, s * 500 + 500, 100)] for s in range(3)]


def flintstones(root: Path) -> Path:
    """3 stories; boxes as a single ``rectangle`` in 640x480 source pixels; 5-frame clips."""
    rng = np.random.default_rng(0)
    (root / "video_frames_sampled").mkdir(parents=True)
    ann = []
    for s, ids in enumerate(FLINT_IDS):
        for f, fid in enumerate(ids):
            clip = rng.integers(0, 255, (5, 128, 128, 3), dtype=np.uint8)
            np.save(root / "video_frames_sampled" / f"{fid}.npy", clip)
            chars = [
                {"entityLabel": "wilma", "rectangle": [64, 48, 320, 240]},
                {"entityLabel": "woman", "rectangle": [0, 0, 10, 10]},  # not a main character
                {"entityLabel": "mr slate", "rectangle": [320, 240, 640, 480]},
            ] if f % 2 == 0 else []
            desc = "Wilma talks with Mr. Slate in the quarry." if chars else "The car drives by."
            ann.append({"globalID": fid, "description": desc, "setting": "quarry", "characters": chars})
    (root / "flintstones_annotations_v1-0.json").write_text(json.dumps(ann))
    split = {"train": FLINT_IDS[0] + FLINT_IDS[1], "val": [], "test": FLINT_IDS[2]}
    (root / "train-val-test_split.json").write_text(json.dumps(split))
    following = {ids[0]: ids[1:] for ids in FLINT_IDS}
    (root / "following_cache4.pkl").write_bytes(pickle.dumps(following))
    (root / "labels.pkl").write_bytes(pickle.dumps({fid: np.zeros(7) for ids in FLINT_IDS for fid in ids}))
    return root


def storygptv(root: Path) -> Path:
    """2 four-frame stories at 256 px (2 sampled frames), segments + segment maps + bg labels."""
    ids = [[f"s_01_e_01_shot_{s}{f}" for f in range(4)] for s in range(2)]
    (root / "video_frames_sampled_4x").mkdir(parents=True)
    (root / "seg_mask_4x_comb").mkdir()
    ann, bg = {}, {}
    for story in ids:
        for fid in story:
            np.save(root / "video_frames_sampled_4x" / f"{fid}.npy", np.zeros((2, 256, 256, 3), np.uint8))
            seg = np.zeros((256, 256), np.uint8)
            seg[40:120, 20:100] = 7
            np.save(root / "seg_mask_4x_comb" / f"{fid}-frame0.npy", seg)
            ann[fid] = {
                "captions": ["Fred and Dino play.", "Fred and Dino play outside."],
                "tokens": ["Fred", "and", "Dino", "play", "."],
                "segments": [
                    {"id": 9, "bbox": [60, 10, 100, 50], "start": 2, "end": 3, "word": "dino"},
                    {"id": 7, "bbox": [10, 20, 50, 60], "start": 0, "end": 1, "word": "fred"},
                ],
            }
            bg[fid] = np.eye(5)[3]
    (root / "split.json").write_text(json.dumps({"train": [f for s in ids for f in s], "test": []}))
    (root / "following_cache3.pkl").write_bytes(pickle.dumps({s[0]: s[1:] for s in ids}))
    (root / "cleaned_annotations.json").write_text(json.dumps(ann))
    (root / "labels.pkl").write_bytes(pickle.dumps({}))
    (root / "labels_bg.pkl").write_bytes(pickle.dumps(bg))
    return root


def pororo(root: Path) -> Path:
    """3 five-frame stories of 64 px frames in vertical strips of 2."""
    paths, descriptions, labels = [], {}, {}
    for ep in range(3):
        folder = root / "Pororo_ENGLISH1_1" / f"Pororo_ENGLISH1_1_ep{ep}"
        folder.mkdir(parents=True)
        for k in range(5):
            rel = f"Pororo_ENGLISH1_1/Pororo_ENGLISH1_1_ep{ep}/{k}.png"
            strip = np.zeros((128, 64, 3), np.uint8)
            strip[:64] = (10 * k, 0, 0)
            strip[64:] = (0, 10 * k, 0)
            Image.fromarray(strip).save(root / rel)
            paths.append(rel)
            key = rel.removesuffix(".png")
            descriptions[key] = ["loopy is baking cookies.", "loopy bakes."] if k else ["pororo and loopy are playing."]
            labels[key] = np.eye(9)[1] if k else np.eye(9)[0] + np.eye(9)[1]
    firsts = [paths[i * 5] for i in range(3)]
    np.save(root / "img_cache4.npy", np.array([p.encode() for p in firsts]))
    np.save(root / "following_cache4.npy", np.array([[p.encode() for p in paths[i * 5 + 1 : i * 5 + 5]] for i in range(3)]))
    ids = np.empty(3, dtype=object)
    ids[0], ids[1], ids[2] = np.array([0, 1]), np.array([], dtype=int), np.array([2])
    np.save(root / "train_seen_unseen_ids.npy", ids, allow_pickle=True)
    np.save(root / "descriptions.npy", descriptions, allow_pickle=True)
    np.save(root / "labels.npy", labels, allow_pickle=True)
    return root


SLIDING_IDS = [f"s_02_e_07_shot_{i * 100:06d}_{i * 100 + 99:06d}" for i in range(14)]


def flintstones_sliding(root: Path) -> Path:
    """One episode of 14 clips as the release ships it: *every* clip starts a story
    (``following_cache4.pkl`` maps each id to the 4 after it), so stories overlap. Fred is alone in
    every clip but the 6th and 11th, where Wilma is; all clips are in the test split."""
    rng = np.random.default_rng(1)
    (root / "video_frames_sampled").mkdir(parents=True)
    ann = []
    for k, fid in enumerate(SLIDING_IDS):
        np.save(root / "video_frames_sampled" / f"{fid}.npy", rng.integers(0, 255, (2, 128, 128, 3), dtype=np.uint8))
        name = "Wilma" if k in (5, 10) else "Fred"
        ann.append({"globalID": fid, "description": f"{name} walks in clip {k}.", "setting": "quarry",
                    "characters": [{"entityLabel": name.lower(), "rectangle": [10, 10, 60, 90]}]})
    (root / "flintstones_annotations_v1-0.json").write_text(json.dumps(ann))
    (root / "train-val-test_split.json").write_text(json.dumps({"train": [], "val": [], "test": SLIDING_IDS}))
    following = {fid: SLIDING_IDS[k + 1:k + 5] for k, fid in enumerate(SLIDING_IDS) if k + 5 <= len(SLIDING_IDS)}
    (root / "following_cache4.pkl").write_bytes(pickle.dumps(following))
    (root / "labels.pkl").write_bytes(pickle.dumps({fid: np.zeros(7) for fid in SLIDING_IDS}))
    return root
