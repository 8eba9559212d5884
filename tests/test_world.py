import hashlib
import json
import pickle

import numpy as np
from PIL import Image

from storygpt.data.characters import WORLD
from storygpt.world.cast import LOOKS, MIN_COLOUR_GAP, SETTINGS
from storygpt.world.detector import detect
from storygpt.world.generate import generate_world


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = (generate_world(tmp_path / n, stories=4, seed=s) for n, s in (("a", 7), ("b", 7), ("c", 8)))
    da, db, dc = (_digest(tmp_path / n) for n in "abc")
    assert da == db and len(da) > 40
    assert da != dc


def test_layout_counts_and_shapes(world_dir):
    ann = json.loads((world_dir / "flintstones_annotations_v1-0.json").read_text())
    split = json.loads((world_dir / "train-val-test_split.json").read_text())
    following = pickle.loads((world_dir / "following_cache4.pkl").read_bytes())
    labels = pickle.loads((world_dir / "labels.pkl").read_bytes())
    assert len(ann) == 24 * 5 and len(following) == 24
    assert all(len(v) == 4 for v in following.values())
    assert sorted(len(v) for v in split.values()) == [30, 30, 60]  # 6 + 6 + 12 stories
    assert set().union(*map(set, split.values())) == {a["globalID"] for a in ann}
    for a in ann[:10]:
        clip = np.load(world_dir / "video_frames_sampled" / f"{a['globalID']}.npy")
        masks = np.load(world_dir / "masks" / f"{a['globalID']}.npy")
        assert clip.shape == (2, 128, 128, 3) and clip.dtype == np.uint8
        assert masks.shape == (2, 128, 128)
        names = [c["entityLabel"].capitalize() for c in a["characters"]]
        assert labels[a["globalID"]].tolist() == WORLD.to_multi_hot(names)
        assert a["setting"] in {s.name for s in SETTINGS}
    for name in WORLD.names:
        assert np.asarray(Image.open(world_dir / "reference_images" / f"{name}.png")).shape == (128, 128, 3)


def test_masks_are_exact_and_boxes_bound_them(world_dir):
    ann = json.loads((world_dir / "flintstones_annotations_v1-0.json").read_text())
    checked = 0
    for a in ann:
        clip = np.load(world_dir / "video_frames_sampled" / f"{a['globalID']}.npy")
        seg = np.load(world_dir / "masks" / f"{a['globalID']}.npy")
        for t in range(clip.shape[0]):
            for k, char in enumerate(a["characters"]):
                mask = seg[t] == k + 1
                colour = LOOKS[char["entityLabel"].capitalize()].colour
                pixels = clip[t][mask]
                is_body = (pixels == colour).all(axis=1)
                assert is_body.mean() > 0.9  # the rest are its eyes
                outside = (clip[t] == colour).all(axis=2) & ~mask
                assert not outside.any()  # no pixel of its colour outside its mask
                ys, xs = np.nonzero(mask)
                assert char["rectangles"][t] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                checked += 1
    assert checked > 50


def test_every_frame_has_a_caption_naming_its_characters(world_dir):
    for a in json.loads((world_dir / "flintstones_annotations_v1-0.json").read_text()):
        assert a["description"].strip()
        for c in a["characters"]:
            assert c["entityLabel"].capitalize() in a["description"]


def test_cast_is_large_enough_and_colours_are_separable():
    genders = {c.gender for c in WORLD.characters}
    assert len(WORLD.characters) >= 6 and genders == {"male", "female"} and len(SETTINGS) >= 8
    assert len({look.shape for look in LOOKS.values()}) == len(LOOKS)
    chars = [np.array(look.colour) for look in LOOKS.values()]
    backgrounds = [np.array(c) for s in SETTINGS for c in (s.sky, s.ground, s.pattern_colour) if c]
    for i, a in enumerate(chars):
        for b in chars[i + 1 :] + backgrounds:
            assert np.abs(a - b).max() >= MIN_COLOUR_GAP


def test_detector_recovers_ground_truth_even_with_noise(world_dir):
    rng = np.random.default_rng(0)
    ann = json.loads((world_dir / "flintstones_annotations_v1-0.json").read_text())
    for a in ann:
        image = np.load(world_dir / "video_frames_sampled" / f"{a['globalID']}.npy")[1]
        noisy = np.clip(image.astype(int) + rng.integers(-15, 16, image.shape), 0, 255).astype(np.uint8)
        truth = sorted(c["entityLabel"].capitalize() for c in a["characters"])
        for img in (image, noisy):
            found = detect(img)
            assert sorted(found.characters) == truth and found.setting == a["setting"]
