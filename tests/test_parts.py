"""The resumable-parts store (``storygpt.data.parts``): a part without its done marker is
invisible to every reader, and a re-run keeps the finished parts and redoes the rest."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from storygpt.config import ConfigError, load_config
from storygpt.data import parts
from storygpt.data.record_schema import ERRORS, RECORDS, encode_png, read_table

NAMES = ("Ada", "Bruno")


def _records(ids: list[str], split: str = "train") -> pa.Table:
    """Record rows with a real PNG frame and one boxed character each (what the readers decode)."""
    image = encode_png(np.full((16, 16, 3), 200, np.uint8))
    return pa.Table.from_pylist([
        {"id": i, "story_id": i.split("-")[0], "frame_index": 0, "split": split, "caption": f"{name} waves.",
         "referential_caption": "She waves.", "characters": [name], "boxes": [[2.0, 2.0, 12.0, 12.0]],
         "token_spans": [[1, 2]], "masks": [None], "setting": "park", "image": image, "size": 16, "source": "test"}
        for i, name in zip(ids, NAMES * len(ids))], RECORDS)


def _errors(ids: list[str]) -> pa.Table:
    return pa.Table.from_pylist([{"id": i, "story_id": i, "stage": "validate", "reason": "test", "dropped": "box"}
                                 for i in ids], ERRORS)


def _unmark(root, name: str) -> None:
    """As if the writer died after its files were renamed into place, before the marker."""
    (root / parts.DONE / f"{name}.json").unlink()


@pytest.fixture
def records_dir(tmp_path):
    """A records dir with one finished part (s0-0, s0-1: train, Ada and Bruno) and one whose
    marker is missing (s1-0: train, Cleo; s1-1: val), plus a torn temp file."""
    root = tmp_path / "rec"
    parts.write_part(root, ["s0-0", "s0-1"], {"records": _records(["s0-0", "s0-1"]), "errors": _errors(["s0-0"])},
                     {"records": 2})
    crashed = ["s1-0", "s1-1"]
    rows = _records(crashed).to_pylist()
    rows[0]["characters"], rows[0]["caption"], rows[1]["split"] = ["Cleo"], "Cleo sits.", "val"
    name = parts.write_part(root, crashed, {"records": pa.Table.from_pylist(rows, RECORDS),
                                            "errors": _errors(crashed)}, {"records": 2})
    _unmark(root, name)
    (root / "records" / ".part-torn.parquet.1234.tmp").write_bytes(b"PAR1 half a file")
    return root


def test_a_part_without_its_marker_is_invisible_to_the_table_readers(records_dir):
    assert sorted(read_table(records_dir, columns=["id"])["id"].to_pylist()) == ["s0-0", "s0-1"]
    assert read_table(records_dir, "errors", columns=["id"])["id"].to_pylist() == ["s0-0"]
    assert read_table(records_dir, columns=["id"], filters=[("split", "=", "val")]).num_rows == 0
    listed = parts.finished_files(records_dir, "records")  # what the Ray Data readers take
    assert len(listed) == 1 and listed[0].endswith(f"{parts.part_name(['s0-1', 's0-0'])}.parquet")
    assert parts.unfinished_parts(records_dir, "records") == [parts.part_name(["s1-0", "s1-1"])]


def test_a_part_without_its_marker_is_invisible_to_the_evaluation_readers(records_dir):
    from storygpt.char_ldm.references import train_reference_crops
    from storygpt.evaluation.captioner_training import train_frames
    from storygpt.evaluation.classifier_training import _read_frames

    frames = _read_frames(records_dir, ("train", "val"))
    assert sorted(frames["train"]["id"]) == ["s0-0", "s0-1"] and frames["val"]["id"] == []
    images, captions = train_frames(records_dir)
    assert sorted(captions) == ["Ada waves.", "Bruno waves."] and len(images) == 2
    with pytest.raises(ConfigError, match="no 'val' records"):
        train_frames(records_dir, "val")
    assert sorted(train_reference_crops(records_dir, ["Ada", "Bruno", "Cleo"])) == ["Ada", "Bruno"]


def test_train_ldm_refuses_a_records_dir_of_unmarked_parts_only(repo, tmp_path):
    from ray_jobs.train_ldm import fit

    root = tmp_path / "rec"
    _unmark(root, parts.write_part(root, ["s0-0"], {"records": _records(["s0-0"])}))
    cfg = load_config(repo / "configs" / "tiny.yaml", [f"work_dir={tmp_path}"]).resolved()
    with pytest.raises(ConfigError, match="--records: no Parquet records in"):
        fit(cfg, str(root))  # before Ray starts: nothing finished to train on


def test_unmarked_target_parts_are_not_read_and_stop_stage_two(tmp_path):
    from storygpt.char_ldm.targets import INFO, PARTS, TARGETS, read_targets, target_files

    root = tmp_path / "fused"
    root.mkdir()
    (root / INFO).write_text("{}")

    def targets(ids, split):
        return pa.Table.from_pylist([{"id": i, "story_id": "s", "frame_index": 0, "split": split, "caption": "c",
                                      "referential_caption": "c", "characters": [], "fused": [0.5],
                                      "frame_feature": [1.0]} for i in ids], TARGETS)

    parts.write_part(root, ["a", "b"], {PARTS: targets(["a", "b"], "train")})
    assert len(target_files(root)) == 1
    _unmark(root, parts.write_part(root, ["c"], {PARTS: targets(["c"], "val")}))
    assert sorted(read_targets(root, columns=["id"])["id"].to_pylist()) == ["a", "b"]
    assert read_targets(root, split="val").num_rows == 0
    with pytest.raises(FileNotFoundError, match="precompute has not finished .1 unfinished parts, 1 done"):
        target_files(root)


def test_resume_keeps_finished_parts_and_redoes_an_unmarked_one(records_dir):
    finished = parts.part_name(["s0-0", "s0-1"])
    crashed = parts.part_name(["s1-0", "s1-1"])
    parts.write_whole(records_dir, "errors", "read", _errors(["s9"]))  # the driver's file: no marker, kept
    done, stats = parts.resume(records_dir, ("records", "errors"))
    assert done == {"s0-0", "s0-1"} and stats == [{"records": 2}]
    left = sorted(p.name for kind in ("records", "errors") for p in (records_dir / kind).iterdir())
    assert left == [f"{finished}.parquet", f"{finished}.parquet", "read.parquet"]  # leftovers deleted
    todo = [i for i in ("s0-0", "s0-1", "s1-0", "s1-1") if i not in done]
    assert todo == ["s1-0", "s1-1"]
    # the redone part has the same name: a retry rewrites it, never adds a second copy
    assert parts.write_part(records_dir, todo, {"records": _records(todo), "errors": _errors([])},
                            {"records": 2}) == crashed
    parts.write_part(records_dir, todo, {"records": _records(todo), "errors": _errors([])}, {"records": 2})
    assert sorted(read_table(records_dir, columns=["id"])["id"].to_pylist()) == ["s0-0", "s0-1", "s1-0", "s1-1"]
    assert sorted(read_table(records_dir, "errors", columns=["id"])["id"].to_pylist()) == ["s0-0", "s9"]
    again, _ = parts.resume(records_dir, ("records", "errors"))
    assert again == {"s0-0", "s0-1", "s1-0", "s1-1"}
    assert json.loads((records_dir / parts.DONE / f"{crashed}.json").read_text())["ids"] == todo


def test_a_whole_file_may_not_take_a_part_name(tmp_path):
    with pytest.raises(ValueError, match="must not start with 'part-'"):
        parts.write_whole(tmp_path, "errors", "part-x", _errors([]))
