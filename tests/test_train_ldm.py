"""Stage 1 on a real local Ray: 2 workers, real DeepSpeed engines (ZeRO-2 and ZeRO-3), MLflow,
and a run killed with SIGKILL that resumes from its checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storygpt.config import load_config

pytestmark = pytest.mark.slow
PARTS = ("clip_text", "clip_vision", "vae", "unet", "scheduler")


def _overrides(tiny_work, work, **values):
    """Models from the shared tiny zoo; runs, MLflow and exports in this test's own work dir."""
    settings = {f"models.{p}": tiny_work / "zoo" / p for p in PARTS}
    settings.update({"work_dir": work, "char_ldm.batch_size": 4, "char_ldm.learning_rate": 1e-3,
                     "char_ldm.warmup_steps": 2, "char_ldm.log_every": 2, "train.checkpoint_every": 4})
    settings.update({k.replace("__", "."): v for k, v in values.items()})
    return [f"{k}={v}" for k, v in settings.items()]


def _history(cfg, key):
    import mlflow

    from ray_jobs.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri(cfg))
    [run] = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    return client, run, sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)


# ZeRO-3 here (CI time): ZeRO-2 Stage-1 runs end to end in test_fault_tolerance (worker killed), test_job_submit and test_demo
@pytest.mark.parametrize("stage", [3])
def test_two_workers_train_under_zero_and_track_in_mlflow(ray_local, records, tiny_work, repo, tmp_path, stage):
    from ray_jobs.train_ldm import fit

    cfg = load_config(repo / "configs" / "tiny.yaml", _overrides(
        tiny_work, tmp_path / "work", train__zero_stage=stage, char_ldm__max_steps=16, char_ldm__sample_every=8)).resolved()
    summary = fit(cfg, str(records))
    assert summary["global_step"] == 16 and summary["checkpoint"]
    client, run, losses = _history(cfg, "loss")
    assert run.data.params["train.zero_stage"] == str(stage) and run.data.params["char_ldm.lreg_weight"] == str(cfg.char_ldm.lreg_weight)
    assert [m.step for m in losses] == list(range(2, 17, 2))  # every log_every steps, each once
    for key in ("noise_loss", "lreg", "lr", "samples_per_s", "attn_in_mask_ratio"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 8
    values = [m.value for m in losses]
    assert sum(values[-3:]) < sum(values[:3])  # loss falls
    assert {"samples", "attention", "config.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == [
        "samples/step_0000008.png", "samples/step_0000016.png"]
    exported = Path(cfg.work_dir) / "char_ldm" / summary["run"]
    assert Path(summary["export"]).resolve() == exported.resolve()  # what the next step reads
    assert (exported / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert "license: apache-2.0" in (exported / "README.md").read_text()  # the model card
    [version] = client.search_model_versions(f"name='{cfg.mlflow.experiment}-char-ldm'")
    assert version.run_id == run.info.run_id and version.tags["storygpt.export"] == str(exported)
    assert run.data.tags["storygpt.source_digest"] and any(k.startswith("system/") for k in run.data.metrics)


def _last_json(stdout: str) -> dict:
    """The command's summary: its last JSON line (Ray's raylet may print warnings after it)."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON summary in the output: {stdout[-2000:]}"
    return json.loads(lines[-1])


def test_killed_training_resumes_at_the_right_step_with_its_optimizer_state(records, tiny_work, repo, tmp_path):
    work = tmp_path / "work"
    args = ["--records", str(records)] + [a for o in _overrides(tiny_work, work, char_ldm__max_steps=12,
                                                                  char_ldm__sample_every=1000) for a in ("--set", o)]
    cmd = [sys.executable, "-m", "storygpt.cli", "train-ldm", *args]
    first = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    storage = work / "ray_results"
    deadline = time.time() + 400
    while time.time() < deadline and first.poll() is None and not list(storage.glob("char_ldm-*/step_0000004")):
        time.sleep(0.5)
    assert first.poll() is None, "the first run ended before it could be killed"
    time.sleep(1.0)  # let it run past the checkpoint
    os.killpg(first.pid, signal.SIGKILL)  # the driver, its local Ray and the training workers
    first.wait()
    second = subprocess.run([*cmd, "--resume"], cwd=repo, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = _last_json(second.stdout)
    assert summary["resumed_from_step"] in (4, 8) and summary["global_step"] == 12
    assert summary["saved_optimizer_digest"] > 0  # Adam moments were saved, and came back equal:
    assert summary["restored_optimizer_digest"] == pytest.approx(summary["saved_optimizer_digest"], rel=1e-6)
    cfg = load_config(repo / "configs" / "tiny.yaml", _overrides(tiny_work, work)).resolved()
    _, _, losses = _history(cfg, "loss")
    steps = [m.step for m in losses]
    assert steps == sorted(set(steps)) == list(range(2, 13, 2))  # no step logged twice, none missing


def test_a_batch_the_shard_cannot_fill_is_refused_by_name(ray_local):
    """With drop_last, a shard smaller than one micro batch yields nothing: the loop would spin."""
    from ray_jobs.runtime import micro_batches
    from storygpt.config import ConfigError

    batches = micro_batches(ray_local.data.from_items([{"x": i} for i in range(5)]).iterator(), 2, "char_ldm.batch_size", 0)
    assert [next(batches).num_rows for _ in range(5)] == [2] * 5  # epoch after epoch, the odd row dropped
    with pytest.raises(ConfigError, match=r"char_ldm\.batch_size: expected a batch the train split can fill"):
        next(micro_batches(ray_local.data.from_items([{"x": 1}]).iterator(), 2, "char_ldm.batch_size", 0))


def test_micro_batches_mix_stories_and_reshuffle_every_epoch(ray_local):
    """Rows arrive in story order; each epoch must hold every row once, in a new mixed order."""
    from ray_jobs.runtime import micro_batches

    rows = [{"story": i // 4, "x": i} for i in range(64)]  # 16 stories of 4 rows, in order
    batches = micro_batches(ray_local.data.from_items(rows).iterator(), 4, "char_ldm.batch_size", 0)
    epochs = [[b for _ in range(16) for b in [next(batches)]] for _ in range(2)]
    orders = [[x for b in epoch for x in b.column("x").to_pylist()] for epoch in epochs]
    assert all(sorted(order) == list(range(64)) for order in orders) and orders[0] != orders[1]
    one_story = sum(len(set(b.column("story").to_pylist())) == 1 for b in epochs[0])
    assert one_story <= 2  # unshuffled, all 16 micro batches would hold a single story
