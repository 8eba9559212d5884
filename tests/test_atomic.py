"""A crash mid-write leaves the previous good file or directory, and no staging behind."""

from __future__ import annotations

import pytest

from storygpt.atomic import replace_bytes, replace_dir, replace_file


class Crash(RuntimeError):
    pass


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "done.json"
    replace_bytes(target, b"first")

    def torn(staging):
        staging.write_bytes(b"half of the sec")
        raise Crash

    with pytest.raises(Crash):
        replace_file(target, torn)
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["done.json"]
    replace_bytes(target, b"second")
    assert target.read_bytes() == b"second"


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "export"
    replace_dir(target, lambda d: (d.mkdir(), (d / "model.safetensors").write_bytes(b"v1")))

    def torn(staging):
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"v2, half")
        raise Crash

    with pytest.raises(Crash):
        replace_dir(target, torn)
    assert (target / "model.safetensors").read_bytes() == b"v1"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    replace_dir(target, lambda d: (d.mkdir(), (d / "config.json").write_bytes(b"{}")))
    assert [p.name for p in target.iterdir()] == ["config.json"]  # swapped whole: no v1 file left
