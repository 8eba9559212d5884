import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_what_exists_and_says_what_it_did(tmp_path, repo):
    work = tmp_path / "demo"
    out = subprocess.run(
        [sys.executable, "-m", "storygpt.cli", "demo", "--work-dir", str(work), "--set", "data.world.stories=12"],
        cwd=repo, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[4/4] preprocess (Ray Data)" in out.stdout and "demo finished" in out.stdout
    summary = json.loads((work / "dataset_summary.json").read_text())
    assert sum(summary[s]["stories"] for s in ("train", "val", "test")) == 12
    assert summary["train"]["pronoun_frames"] > 0 and summary["train"]["with_masks"] == summary["train"]["frames"]
    for part in ("clip_text", "clip_vision", "vae", "unet", "scheduler", "opt", "llama", "sam", "super_resolution"):
        assert (work / "zoo" / part).is_dir()
    manifest = json.loads((work / "records" / "manifest.json").read_text())
    assert manifest["counts"]["records_out"] == 60 and manifest["counts"]["errors"] == 0
    from storygpt.models.loading import load_unet

    assert load_unet(work / "zoo" / "unet").config.cross_attention_dim == 64
