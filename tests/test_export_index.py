"""Self-describing Char-LDM exports (storygpt/char_ldm/export.py): the index names the schedule and
the frozen parts an export was trained with, and a preset that disagrees is refused by the field
to change. Tiny zoo, untrained model, no Ray."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from storygpt.char_ldm.export import INDEX
from storygpt.char_ldm.model import CharLDM
from storygpt.config import ConfigError, load_config


@pytest.fixture(scope="module")
def export(repo, tiny_work, tmp_path_factory):
    """The session's zoo; the export and the variants go to a directory of this module's own."""
    work = tmp_path_factory.mktemp("export")
    cfg = load_config(repo / "configs" / "tiny.yaml", [f"work_dir={tiny_work}"])
    torch.manual_seed(0)
    CharLDM.from_config(cfg).save_trained(work / "export")
    return cfg, work


def _variant(cfg, work, part: str, edit: dict):
    """A copy of a zoo part with ``edit`` in its config, and the preset pointing at it."""
    copy = work / f"{part}-variant"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(cfg.path(getattr(cfg.models, part)), copy)
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    config = json.loads((copy / name).read_text())
    (copy / name).write_text(json.dumps({**config, **edit}))
    return cfg.model_copy(update={"models": cfg.models.model_copy(update={part: str(copy)})})


def test_the_index_names_the_schedule_and_the_frozen_parts(export):
    cfg, work = export
    index = json.loads((work / "export" / INDEX).read_text())
    assert index["schedule"]["prediction_type"] == "v_prediction" and index["schedule"]["rescale_betas_zero_snr"]
    assert set(index["frozen"]) == {"vae", "clip_text", "clip_vision", "scheduler"}
    loaded = CharLDM.from_config(cfg, work / "export")  # the preset it was trained under loads it
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"


def test_an_epsilon_preset_is_refused_for_a_v_prediction_export(export):
    cfg, work = export
    eps = _variant(cfg, work, "scheduler", {"prediction_type": "epsilon", "rescale_betas_zero_snr": False})
    eps = eps.model_copy(update={"char_ldm": eps.char_ldm.model_copy(update={"prediction_type": "epsilon"})})
    CharLDM.from_config(eps)  # the preset itself is consistent: a fresh model loads
    with pytest.raises(ConfigError, match=r"models\.scheduler: .*prediction_type='v_prediction'"):
        CharLDM.from_config(eps, work / "export")


def test_shapes_and_frozen_parts_are_checked_by_name(export):
    cfg, work = export
    bigger = cfg.model_copy(update={"char_ldm": cfg.char_ldm.model_copy(update={"resolution": 64})})
    with pytest.raises(ConfigError, match=r"char_ldm\.resolution: .*32, the preset has 64"):
        CharLDM.from_config(bigger, work / "export")
    other_text = _variant(cfg, work, "clip_text", {"layer_norm_eps": 1e-3})
    with pytest.raises(ConfigError, match=r"models\.clip_text: .*another clip_text"):
        CharLDM.from_config(other_text, work / "export")


def test_an_export_from_before_the_index_still_loads(export):
    cfg, work = export
    old = work / "old-export"
    shutil.copytree(work / "export", old, dirs_exist_ok=True)
    (old / INDEX).unlink()
    bigger = cfg.model_copy(update={"char_ldm": cfg.char_ldm.model_copy(update={"resolution": 64})})
    CharLDM.from_config(bigger, old)  # nothing to check against
