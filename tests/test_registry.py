"""Trained parts as MLflow models on a sqlite registry: logged the way the training jobs log them
(ray_jobs.tracking.Tracker on rank 0), loaded back with ``mlflow.pyfunc.load_model("models:/...")``
and served with ``storygpt serve --model-uri``; the exports' model cards name the base licences.
Untrained tiny exports: the plumbing is under test, not the pictures."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from storygpt.config import load_config
from storygpt.models.cards import write_model_card

STORY = ["Emma waves hello in the forest.", "Later, she sits down with Bruno.", "They eat lunch."]


# ----------------------------------------------------------------------------- model cards (fast)
def test_model_cards_name_the_base_models_and_their_licences(tmp_path):
    cfg = load_config("flintstones")
    ldm = write_model_card(cfg, "char_ldm", tmp_path, "char_ldm-20260101-000000").read_text()
    assert ldm.startswith("---\nlicense: other\n")  # several licences apply
    assert "| clip_text, vae, unet, scheduler | [stable-diffusion-v1-5](" in ldm
    assert "CreativeML OpenRAIL-M" in ldm and "Attachment A" in ldm and "| MIT |" in ldm
    assert "OPT" not in ldm  # the Char-LDM does not touch the LM
    aligner = write_model_card(cfg, "aligner", tmp_path, "aligner-x").read_text()
    assert "OPT-175B License Agreement (non-commercial research use)" in aligner and "opt-6.7b" in aligner
    tiny = write_model_card(load_config("tiny"), "char_ldm", tmp_path, "r").read_text()
    assert tiny.startswith("---\nlicense: apache-2.0\n") and "random init" in tiny
    undeclared = load_config("flintstones", ["models.sources=[]"])
    assert "Not declared in the preset (`models.sources`): clip_text, clip_vision, scheduler, unet, vae" in \
        write_model_card(undeclared, "char_ldm", tmp_path, "r").read_text()


# ----------------------------------------------------------------------------- the registry
@pytest.fixture(scope="module")
def registry(tiny_work, tmp_path_factory):
    """A Char-LDM and a story model (aligner) logged and registered as train-ldm / train-aligner do."""
    import torch

    from ray_jobs.tracking import Tracker
    from storygpt.aligner.model import StoryAligner
    from storygpt.char_ldm.model import CharLDM

    work = tmp_path_factory.mktemp("registry")
    zoo = tiny_work / "zoo"
    cfg = load_config("tiny", [f"work_dir={work}", f"models.lm={zoo / 'opt'}", "char_ldm.sample_steps=2"]
                      + [f"models.{p}={zoo / p}" for p in ("clip_text", "clip_vision", "vae", "unet", "scheduler")]
                      ).resolved()
    torch.manual_seed(0)
    char_ldm, aligner = work / "char_ldm" / "char_ldm-1", work / "aligner" / "aligner-1"
    CharLDM.from_config(cfg).save_trained(char_ldm)
    write_model_card(cfg, "char_ldm", char_ldm, char_ldm.name)
    StoryAligner.from_config(cfg).save_trained(aligner)
    (work / "fused").mkdir()  # precompute's record of the Char-LDM the targets were made with
    (work / "fused" / "targets.json").write_text(json.dumps({"char_ldm": str(char_ldm)}))
    old = os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    try:
        for stage, export in (("char_ldm", char_ldm), ("aligner", aligner)):
            tracker = Tracker(cfg, f"{stage}-1", None, active=True)
            time.sleep(2.5)  # a run long enough for a system-metrics sample
            tracker.log_model(export, stage)
            tracker.end()
    finally:
        if old is None:
            os.environ.pop("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
        else:
            os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = old
    import mlflow

    from ray_jobs.tracking import tracking_uri

    uri = tracking_uri(cfg)
    # Tracker's mlflow.set_tracking_uri exported $MLFLOW_TRACKING_URI: unset it, or every later
    # test module's runs would land in this database (each test here names the URI it reads)
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return cfg, uri


@pytest.mark.slow
def test_every_run_records_its_source_config_and_system_metrics(registry):
    import mlflow

    cfg, uri = registry
    mlflow.set_tracking_uri(uri)  # for mlflow.artifacts below (conftest unsets it after the test)
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert len(runs) == 2
    for run in runs:
        tags = run.data.tags
        assert len(tags["storygpt.source_digest"]) == 16
        if (Path(__file__).parents[1] / ".git").exists():
            assert len(tags["mlflow.source.git.commit"]) == 40
        logged = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml"))
        assert logged == json.loads(cfg.model_dump_json())  # the whole resolved config
        assert any(k.startswith("system/cpu_utilization_percentage") for k in run.data.metrics), run.data.metrics


@pytest.mark.slow
def test_registered_versions_load_with_pyfunc_and_draw(registry):
    import mlflow
    import pandas as pd

    cfg, uri = registry
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    [ldm_version] = client.search_model_versions("name = 'storygpt-tiny-char-ldm'")
    [story_version] = client.search_model_versions("name = 'storygpt-tiny-aligner'")
    assert ldm_version.tags["storygpt.export"] == str(Path(cfg.work_dir) / "char_ldm" / "char_ldm-1")

    ldm = mlflow.pyfunc.load_model("models:/storygpt-tiny-char-ldm/1")
    frames = ldm.predict(pd.DataFrame({"caption": STORY[:2]}), params={"steps": 2, "seed": 3})
    assert frames.shape == (2, 32, 32, 3) and frames.dtype == np.uint8 and frames.std() > 0
    again = ldm.predict(pd.DataFrame({"caption": STORY[:2]}), params={"steps": 2, "seed": 3})
    assert np.array_equal(frames, again)  # seeded

    story = mlflow.pyfunc.load_model("models:/storygpt-tiny-aligner/1")
    config = story.metadata.flavors["python_function"]["config"]
    assert config == {"stage": "aligner", "char_ldm_uri": "models:/storygpt-tiny-char-ldm/1"}  # its own Char-LDM
    drawn = story.predict(pd.DataFrame({"caption": STORY}), params={"steps": 2})
    assert drawn.shape == (3, 32, 32, 3) and drawn.dtype == np.uint8
    from storygpt.registry import resolve

    assert "license: apache-2.0" in (resolve("models:/storygpt-tiny-char-ldm/1").export / "README.md").read_text()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_storygpt_serve_serves_a_registry_version(registry, tmp_path):
    """`storygpt serve --model-uri models:/...` as a user runs it (its own local Ray), from a
    directory that is not the work dir: the config and both exports come from the registry."""
    import requests

    _, uri = registry
    port = _free_port()
    argv = [sys.executable, "-m", "storygpt.cli", "serve", "--model-uri", "models:/storygpt-tiny-aligner/1",
            "--tracking-uri", uri, "--port", str(port)]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "is serving at" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(1)
        reply = requests.post(f"http://127.0.0.1:{port}/v1/stories", json={"captions": STORY, "steps": 2}, timeout=300)
        assert reply.status_code == 200, reply.text
        assert [f["caption"] for f in reply.json()["frames"]] == STORY

        # what listens: the API on loopback only; every socket of the server's processes that Ray
        # opens beyond loopback is named, at start, in the one note line
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        beyond, api = set(), set()
        for p in tree:
            for conn in p.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    (api if conn.laddr.port == port else beyond).add((p.name(), conn.laddr.ip, conn.laddr.port))
        assert {ip for _, ip, _ in api} == {"127.0.0.1"}, api
        beyond = {(name, p) for name, ip, p in beyond if not ipaddress.ip_address(ip).is_loopback}
        note = next(line for line in log.read_text().splitlines() if line.startswith("note: Ray listens beyond loopback"))
        assert all(f"{name}:{p}" in note for name, p in beyond), (beyond, note)
        print(f"beyond loopback: {len(beyond)} sockets of {len(tree)} processes")

        proc.send_signal(signal.SIGTERM)  # `kill PID`: the server stops Serve and its Ray, agents included
        proc.wait(timeout=90)
        time.sleep(2)
        left = [p for p in tree[1:] if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert left == [], [(p.pid, p.name()) for p in left]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the command shuts Serve and its Ray down
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_serve_refuses_a_model_uri_with_a_config_or_a_char_ldm_model(capsys, monkeypatch):
    from storygpt.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["serve", "--model-uri", "models:/x-aligner/1", "--config", "tiny"]) == 2
    assert "--model-uri: the version carries its config and trained parts; drop --config" in capsys.readouterr().err
    assert main(["serve", "--model-uri", "models:/x-aligner/1"]) == 2
    assert "--tracking-uri: where the registry of --model-uri is" in capsys.readouterr().err
