import pickle

import numpy as np
import pytest

from corpora import FLINT_IDS, flintstones, pororo, storygptv
from storygpt.data.characters import FLINTSTONES, PORORO, WORLD
from storygpt.data.errors import DatasetError
from storygpt.data.images import load_image, load_masks
from storygpt.data.readers import ReadOptions, read_stories

BOXES_640 = (640, 480)  # the corpus' boxes are in 640x480 source pixels


def test_flintstones_corpus_not_written_by_the_world(tmp_path):
    root = flintstones(tmp_path)
    stories, report = read_stories("flintstones", root, FLINTSTONES, ReadOptions(split="train", box_source_size=BOXES_640, clip_frame=3))
    assert [s.story_id for s in stories] == [FLINT_IDS[0][0], FLINT_IDS[1][0]]
    first = stories[0].frames[0]
    assert first.characters == ["Wilma", "Mr. Slate"]
    assert first.boxes == [(12.8, 12.8, 64.0, 64.0), (64.0, 64.0, 128.0, 128.0)]  # 640x480 -> 128 px
    assert report.unknown_characters == {"woman": 6}  # counted, not kept as a character
    assert stories[0].frames[1].characters == [] and stories[0].frames[1].boxes == []
    assert first.masks is None  # the release ships no masks
    clip = np.load(root / "video_frames_sampled" / f"{first.id}.npy")
    assert np.array_equal(load_image(first.image), clip[3])  # the configured sampled frame


def test_boxes_in_another_coordinate_frame_are_refused_naming_box_source_size(tmp_path):
    """The boxes' coordinate frame is checked over the whole read, not assumed: boxes in 640x480
    pixels read as 128-px frame pixels reach 5x past the frame, and every mask and crop would be
    wrong. That is the config's error, refused whatever on_error says; one stray box is not."""
    root = flintstones(tmp_path)
    for options in (ReadOptions(split="train"), ReadOptions(split="train", on_error="skip")):
        with pytest.raises(DatasetError, match=r"boxes reach beyond their 128-px frame .*box_source_size: null"):
            read_stories("flintstones", root, FLINTSTONES, options)
    with pytest.raises(DatasetError, match=r"data.box_source_size: \[64, 48\]"):  # a wrong size, too
        read_stories("flintstones", root, FLINTSTONES, ReadOptions(split="train", box_source_size=(64, 48)))
    stories, _ = read_stories("flintstones", root, FLINTSTONES, ReadOptions(split="train", box_source_size=BOXES_640))
    assert stories


def test_one_stray_box_is_left_to_validation(tmp_path):
    import json

    root = flintstones(tmp_path)
    path = root / "flintstones_annotations_v1-0.json"
    annotations = json.loads(path.read_text())
    for ann in annotations:  # every box in frame pixels, then one far outside
        for char in ann.get("characters") or []:
            char["rectangle"] = [4, 4, 60, 60]
    annotations[0]["characters"][0]["rectangle"] = [900, 900, 990, 990]
    path.write_text(json.dumps(annotations))
    stories, _ = read_stories("flintstones", root, FLINTSTONES, ReadOptions(split="train", clip_frame=3))
    boxes = [b for s in stories for f in s.frames for b in f.boxes]
    assert (900.0, 900.0, 990.0, 990.0) in boxes and len(boxes) > 10  # read as given; validation drops it


def test_flintstones_referential_across_frames(tmp_path):
    stories, _ = read_stories("flintstones", flintstones(tmp_path), FLINTSTONES, ReadOptions(box_source_size=BOXES_640, split="test"))
    frames = stories[0].frames
    # frame 2 has the same two characters, but they are not one coordinated phrase: unchanged
    assert frames[2].referential_caption == frames[2].caption
    assert all(f.referential_caption == f.caption for f in frames[1::2])  # empty frames


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda r: (r / "video_frames_sampled" / f"{FLINT_IDS[0][2]}.npy").unlink(), "frame file is missing"),
        (lambda r: np.save(r / "video_frames_sampled" / f"{FLINT_IDS[0][2]}.npy", np.zeros((64, 64, 4), np.uint8)),
         r"expected \(T, H, W, 3\)"),
        (lambda r: (r / "video_frames_sampled" / f"{FLINT_IDS[0][2]}.npy").write_bytes(b"garbage"), "unreadable .npy"),
    ],
)
def test_bad_frame_files_raise_naming_file_and_id_or_are_skipped_and_counted(tmp_path, damage, match):
    root = flintstones(tmp_path)
    damage(root)
    bad_id = FLINT_IDS[0][2]
    with pytest.raises(DatasetError, match=match) as err:
        read_stories("flintstones", root, FLINTSTONES, ReadOptions(box_source_size=BOXES_640, split="train"))
    assert bad_id in str(err.value) and f"{bad_id}.npy" in str(err.value)
    stories, report = read_stories("flintstones", root, FLINTSTONES, ReadOptions(box_source_size=BOXES_640, split="train", on_error="skip"))
    assert [s.story_id for s in stories] == [FLINT_IDS[1][0]]  # the good story is kept
    assert [(s.id, s.file.endswith(f"{bad_id}.npy")) for s in report.skipped] == [(bad_id, True)]
    assert report.summary()["skipped"] == 1


def test_ids_absent_from_split_or_annotations_are_named(tmp_path):
    root = flintstones(tmp_path)
    following = pickle.loads((root / "following_cache4.pkl").read_bytes())
    following[FLINT_IDS[0][0]] = FLINT_IDS[0][1:3] + [FLINT_IDS[2][0], "s_09_e_09_shot_0_1"]
    (root / "following_cache4.pkl").write_bytes(pickle.dumps(following))
    with pytest.raises(DatasetError, match=rf"train-val-test_split.json \[id {FLINT_IDS[2][0]}\]: .*not in the 'train' split"):
        read_stories("flintstones", root, FLINTSTONES, ReadOptions(box_source_size=BOXES_640, split="train"))
    following[FLINT_IDS[0][0]] = FLINT_IDS[0][1:4] + ["s_09_e_09_shot_0_1"]
    (root / "following_cache4.pkl").write_bytes(pickle.dumps(following))
    with pytest.raises(DatasetError, match=r"flintstones_annotations_v1-0.json \[id s_09_e_09_shot_0_1\]: .*no annotation"):
        read_stories("flintstones", root, FLINTSTONES, ReadOptions(box_source_size=BOXES_640, split="train"))


def test_structural_problems(tmp_path):
    root = flintstones(tmp_path)
    with pytest.raises(DatasetError, match="clip_frame 7 out of range: the clip has 5 frames"):
        read_stories("flintstones", root, FLINTSTONES, ReadOptions(box_source_size=BOXES_640, split="train", clip_frame=7))
    with pytest.raises(DatasetError, match=r"following_cache3.pkl: required file is missing"):
        read_stories("flintstones", root, FLINTSTONES, ReadOptions(box_source_size=BOXES_640, split="train", frames_per_story=4))
    with pytest.raises(DatasetError, match="expected a 'dev' list"):
        read_stories("flintstones", root, FLINTSTONES, ReadOptions(box_source_size=BOXES_640, split="dev"))
    (root / "flintstones_annotations_v1-0.json").write_text(
        (root / "flintstones_annotations_v1-0.json").read_text().replace("[64, 48, 320, 240]", "[64, 48, 320]"))
    with pytest.raises(DatasetError, match=r"character Wilma: expected \[x0, y0, x1, y1\], got \[64.0, 48.0, 320.0\]"):
        read_stories("flintstones", root, FLINTSTONES, ReadOptions(box_source_size=BOXES_640, split="train"))


def test_storygptv_layout(tmp_path):
    root = storygptv(tmp_path)
    stories, report = read_stories("storygptv", root, FLINTSTONES, ReadOptions(split="train", frames_per_story=4))
    assert len(stories) == 2 and all(len(s.frames) == 4 for s in stories) and not report.skipped
    f = stories[0].frames[0]
    assert f.characters == ["Fred", "Dino"]  # in token order
    assert f.boxes == [(20.0, 40.0, 100.0, 120.0), (120.0, 20.0, 200.0, 100.0)]  # 128 px grid -> 256 px
    assert f.setting == "bg3" and f.caption == "Fred and Dino play outside." and len(f.captions) == 2
    masks = load_masks(f.masks)
    assert masks.shape == (2, 256, 256)
    assert masks[0].sum() == 80 * 80 and masks[0][40:120, 20:100].all()  # segment 7 = Fred
    assert not masks[1].any()  # Dino's segment 9 is absent from the map
    # The mask lies inside the box that the segment's bbox gives (the official crop order).
    x0, y0, x1, y1 = (int(v) for v in f.boxes[0])
    assert masks[0][y0:y1, x0:x1].sum() == masks[0].sum()
    assert stories[0].frames[1].referential_caption == "They play outside."


def test_pororo_layout(tmp_path):
    root = pororo(tmp_path)
    stories, report = read_stories("pororo", root, PORORO, ReadOptions(split="train", clip_frame=1,
                                                                        referential_rule="subset"))  # {Pororo, Loopy} -> {Loopy}
    assert len(stories) == 2 and not report.skipped
    frames = stories[0].frames
    assert frames[0].id == "Pororo_ENGLISH1_1/Pororo_ENGLISH1_1_ep0/0"
    assert frames[0].characters == ["Pororo", "Loopy"] and frames[0].boxes == [None, None]
    assert frames[0].caption == "Pororo and loopy are playing." and frames[0].masks is None
    assert frames[1].referential_caption == "She is baking cookies."
    image = load_image(frames[2].image)
    assert image.shape == (64, 64, 3) and tuple(image[0, 0]) == (0, 20, 0)  # second square of the strip
    test, _ = read_stories("pororo", root, PORORO, ReadOptions(split="test"))
    assert [s.story_id for s in test] == ["Pororo_ENGLISH1_1/Pororo_ENGLISH1_1_ep2/0"]


def test_the_method_variant_a_layout_allows_matches_the_boxes_its_reader_gives(tmp_path, repo):
    """PororoSV has no character boxes, so it trains the paper's text-only variant: the runs say so."""
    from ray_jobs.tracking import run_params
    from storygpt.config import load_config
    from storygpt.data.readers import HAS_BOXES, method_variant

    layouts = {"flintstones": (flintstones, FLINTSTONES, 5), "storygptv": (storygptv, FLINTSTONES, 4),
               "pororo": (pororo, PORORO, 5)}
    for fmt, (build, table, frames) in layouts.items():
        boxes = BOXES_640 if fmt == "flintstones" else None
        options = ReadOptions(split="train", frames_per_story=frames, clip_frame=0, box_source_size=boxes)
        stories, _ = read_stories(fmt, build(tmp_path / fmt), table, options)
        boxed = any(b is not None for s in stories for f in s.frames for b in f.boxes)
        assert boxed == HAS_BOXES[fmt], fmt
    assert method_variant("pororo").startswith("text-only") and method_variant("flintstones").startswith("full")
    params = run_params(load_config(repo / "configs" / "pororo.yaml"))
    assert params["method_variant"] == method_variant("pororo") and params["data.format"] == "pororo"


def test_pororo_problems(tmp_path):
    root = pororo(tmp_path)
    (root / "Pororo_ENGLISH1_1/Pororo_ENGLISH1_1_ep1/3.png").unlink()
    with pytest.raises(DatasetError, match=r"ep1/3.png \[id Pororo_ENGLISH1_1/Pororo_ENGLISH1_1_ep1/3\]: frame file is missing"):
        read_stories("pororo", root, PORORO, ReadOptions(split="train"))
    stories, report = read_stories("pororo", root, PORORO, ReadOptions(split="train", on_error="skip"))
    assert len(stories) == 1 and len(report.skipped) == 1
    with pytest.raises(DatasetError, match="with > 2 frames, got 64x128"):
        read_stories("pororo", root, PORORO, ReadOptions(split="test", clip_frame=2))


def test_world_masks_align_with_boxes(world_dir):
    stories, report = read_stories("flintstones", world_dir, WORLD, ReadOptions(split="train"))
    assert report.stories == 12 and report.frames == 60 and not report.skipped
    for frame in (f for s in stories for f in s.frames if f.characters):
        masks = load_masks(frame.masks)
        for mask, (x0, y0, x1, y1) in zip(masks, frame.boxes):
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
