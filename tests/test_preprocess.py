"""Preprocessing on a real local Ray: actor pools, both backend pairs, bad input, resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from storygpt.config import load_config
from storygpt.data.record_schema import decode_png, read_table

pytestmark = pytest.mark.slow


def _cfg(repo, work, *overrides):
    return load_config(repo / "configs" / "tiny.yaml", [f"work_dir={work}", *overrides])


def _inside_box(mask, box, tol=0.0):
    """Every mask pixel's centre lies in the box (widened by ``tol`` px)."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = box
    return (xs.min() + 0.5 >= x0 - tol and ys.min() + 0.5 >= y0 - tol
            and xs.max() + 0.5 <= x1 + tol and ys.max() + 0.5 <= y1 + tol)


def test_world_with_resize_and_box_backends(ray_local, tiny_work, repo, tmp_path):
    from preprocessing.job import preprocess

    cfg = _cfg(repo, tiny_work, f"preprocess.output={tmp_path}/rec", "preprocess.masks.prefer_dataset_masks=false")
    manifest, size = preprocess(cfg), cfg.char_ldm.resolution
    c = manifest["counts"]
    assert c["frames_in"] == 100 and c["records_out"] == 100 and c["errors"] == 0
    records = read_table(tmp_path / "rec").to_pylist()
    assert sorted(r["id"] for r in records) == sorted(set(r["id"] for r in records))
    assert {r["split"] for r in records} == {"train", "val", "test"}
    from storygpt.models.loading import load_clip_tokenizer

    tok = load_clip_tokenizer(tiny_work / "zoo" / "clip_text")
    for r in records:
        assert decode_png(r["image"]).shape == (size, size, 3) and r["size"] == size
        assert len(r["masks"]) == len(r["boxes"]) == len(r["token_spans"]) == len(r["characters"])
        for name, box, mask, span in zip(r["characters"], r["boxes"], r["masks"], r["token_spans"]):
            m = decode_png(mask)
            assert m.shape == (size, size) and m.any() and _inside_box(m, box)  # box backend: mask = box
            ids = tok(r["caption"])["input_ids"][span[0] : span[1]]
            assert "".join(tok.convert_ids_to_tokens(ids)).replace("</w>", "") == name.lower()
    assert manifest["versions"]["ray"] and manifest["config"]["preprocess.masks.backend"] == "box"


def test_world_with_tiny_ldm_upscaler_and_sam(ray_local, tiny_work, repo, tmp_path):
    from preprocessing.job import preprocess

    cfg = _cfg(repo, tiny_work, f"preprocess.output={tmp_path}/rec", "preprocess.splits=[val, test]",
               "preprocess.super_resolution.backend=ldm", "preprocess.masks.backend=sam",
               "preprocess.masks.prefer_dataset_masks=false")
    manifest, size = preprocess(cfg), cfg.char_ldm.resolution
    records = read_table(tmp_path / "rec").to_pylist()
    assert len(records) == manifest["counts"]["records_out"] == 40  # val + test: 8 of the 20 stories
    with_boxes = [r for r in records if any(b is not None for b in r["boxes"])]
    c = manifest["counts"]
    # One SAM image-encoder pass per frame with boxes, whatever the number of boxes.
    assert c["mask_encoder_runs"] == len(with_boxes)
    assert c["boxes_masked"] == sum(len(r["boxes"]) for r in with_boxes) > len(with_boxes)
    for r in records:
        assert decode_png(r["image"]).shape == (size, size, 3)
        for box, mask in zip(r["boxes"], r["masks"]):
            m = decode_png(mask)
            assert m.shape == (size, size) and (not m.any() or _inside_box(m, box))  # SAM clipped to box


def _corrupt(world):
    """Damage >= 5 % of the frames and some boxes, each in a different way; return what to expect."""
    ann_file = world / "flintstones_annotations_v1-0.json"
    ann = json.loads(ann_file.read_text())
    by_id = {a["globalID"]: a for a in ann}
    ids = sorted(by_id)
    frames = world / "video_frames_sampled"
    (frames / f"{ids[3]}.npy").write_bytes(b"not an array")
    np.save(frames / f"{ids[7]}.npy", np.zeros((2, 64, 64, 4), np.uint8))
    (frames / f"{ids[11]}.npy").unlink()
    by_id[ids[15]]["description"] = "   "
    with_chars = [i for i in ids if by_id[i]["characters"] and i not in ids[:16]]
    by_id[with_chars[0]]["characters"][0]["rectangles"] = [[10, 10, 10, 40]] * 2  # zero area
    by_id[with_chars[1]]["characters"][0]["rectangles"] = [[200, 200, 260, 240]] * 2  # outside
    by_id[with_chars[2]]["characters"].append({"entityLabel": "woman", "rectangles": [[0, 0, 5, 5]] * 2})
    ann_file.write_text(json.dumps(ann))
    dropped = {ids[3]: "load", ids[7]: "load", ids[11]: "load", ids[15]: "validate"}
    partial = {with_chars[0]: "zero area", with_chars[1]: "outside", with_chars[2]: "'woman' is not in"}
    return set(ids), dropped, partial


def test_bad_input_goes_to_errors_and_no_good_record_is_lost(ray_local, tiny_work, repo, tmp_path):
    from preprocessing.job import preprocess

    world = tmp_path / "world"
    shutil.copytree(tiny_work / "world", world)
    all_ids, dropped, partial = _corrupt(world)
    assert len(dropped) + len(partial) >= 0.05 * len(all_ids)
    manifest = preprocess(_cfg(repo, tiny_work, f"data.root={world}", f"preprocess.output={tmp_path}/rec"))
    records = read_table(tmp_path / "rec").to_pylist()
    errors = read_table(tmp_path / "rec", "errors").to_pylist()
    assert {r["id"] for r in records} == all_ids - set(dropped)  # every good frame is written
    for fid, stage in dropped.items():
        [e] = [e for e in errors if e["id"] == fid]
        assert e["stage"] == stage and e["dropped"] == "frame" and e["reason"]
    for fid, words in partial.items():
        [e] = [e for e in errors if e["id"] == fid]
        assert words in e["reason"] and e["dropped"] in ("box", "character")
        assert fid in {r["id"] for r in records}  # the frame itself is kept
    c = manifest["counts"]
    assert c["errors"] == len(errors) == len(dropped) + len(partial)
    assert c["frames_dropped"] == len(dropped) and c["records_out"] == len(records)


def test_killed_run_resumes_without_duplicates(tiny_work, repo, tmp_path):
    out = tmp_path / "rec"
    cmd = [sys.executable, "-m", "storygpt.cli", "preprocess", "--set", f"work_dir={tiny_work}",
           "--output", str(out), "--set", "preprocess.rows_per_file=4",
           "--set", "preprocess.super_resolution.pool.batch_size=4", "--set", "preprocess.masks.pool.batch_size=4"]
    env = {**os.environ, "RAY_TMPDIR": "/tmp"}
    first = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "done").glob("*.json"))) < 2 if (out / "done").exists() else time.time() < deadline:
        if first.poll() is not None:
            break
        time.sleep(0.2)
    assert first.poll() is None, "the first run finished before it could be killed"
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
    first.wait()
    done_before = len(list((out / "done").glob("*.json")))
    assert 0 < done_before
    second = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    ids = [r["id"] for r in read_table(out, columns=["id"]).to_pylist()]
    assert len(ids) == len(set(ids)) == 100 == manifest["counts"]["records_out"]
    assert manifest["counts"]["frames_already_done"] >= 4 * done_before - 3
    assert "frames already done" in second.stdout
