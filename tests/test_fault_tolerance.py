"""Fault tolerance on a local multi-node Ray cluster: a head and a worker node on this machine
(``ray.cluster_utils.Cluster``), nothing mocked.

Each process killed here is found through Ray's state API (``ray.util.state.list_actors``) and
checked to be that actor before it gets SIGKILL: a Ray Train worker mid-run, a Ray Data pool
actor mid-run, a Serve replica. Every job must still finish with exact results: the training
at its exact last step with each MLflow step logged once, every record exactly once, the
story served again. A crash mid-write must leave the previous good state: a half-written
checkpoint dir is not what a resume picks up (Ray Train v2 restores the latest checkpoint its
controller registered in ``checkpoint_manager_snapshot.json``, not the newest dir), and a
record part torn mid-write is never read and is redone once by the re-run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from storygpt.config import load_config

pytestmark = pytest.mark.slow

PARTS = ("clip_text", "clip_vision", "vae", "unet", "scheduler")
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train v2's record of the registered checkpoints


# ----------------------------------------------------------------------------- the cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU, the dashboard the state API needs, on 127.0.0.1) + one worker node (2 CPUs).
    The nodes listen on this machine's own address, as ``ray_local`` does (Ray turns a loopback
    address into it); only the Serve proxy binds 127.0.0.1.

    Whatever Ray the session had (``ray_local``) is shut down first and put back after, so the
    files that run later find it as they expect. ``RAY_TMPDIR`` points at this module's own
    temp dir meanwhile: the cluster's address file lands there, so no other process on the
    machine that calls a bare ``ray.init()`` joins this cluster by accident.
    """
    import ray
    import torch
    from ray.cluster_utils import Cluster

    from conftest import start_local_ray

    had_ray = ray.is_initialized()
    if had_ray:
        ray.shutdown()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    saved_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: socket paths are limited
    head = None
    try:
        head = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": _free_port(), "dashboard_agent_listen_port": _free_port(),
            "metrics_export_port": _free_port()})
        head.add_node(num_cpus=2)
        ray.init(address=head.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield "http://" + head.webui_url
    finally:
        ray.shutdown()
        if head is not None:
            head.shutdown()
        if saved_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved_tmpdir
        torch.set_num_threads(threads)
        if had_ray:
            start_local_ray()


def _actors(dashboard: str, **equal) -> list:
    from ray.util.state import list_actors

    filters = [(key, "=", value) for key, value in equal.items()]
    return list_actors(address=dashboard, filters=filters, detail=True, limit=10_000, raise_on_missing_output=False)


def _kill(actor, title: str) -> None:
    """SIGKILL the actor's process, after checking the PID still is that actor (Ray titles an actor's
    process ``ray::<its repr>``); wait till it is gone."""
    pid = actor.pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert cmdline.startswith("ray::") and title in cmdline, f"pid {pid} is not {actor.class_name}: {cmdline!r}"
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 30
    while time.time() < deadline and _running(pid):
        time.sleep(0.1)
    assert not _running(pid), f"{actor.class_name} (pid {pid}) survived SIGKILL"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie is dead, only not reaped yet


def _wait_for(predicate, timeout: float, what: str, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Killer(threading.Thread):
    """Waits in the background for ``ready()`` to return an actor, then kills it. Ray Train's
    ``fit`` must run on the main thread (it installs a SIGINT handler), so the kill lives here."""

    def __init__(self, ready, title: str, timeout: float, what: str, every: float = 0.2):
        super().__init__(daemon=True)
        self.ready, self.title, self.timeout, self.what, self.every = ready, title, timeout, what, every
        self.killed, self.error, self.stop = None, None, threading.Event()

    def run(self) -> None:
        try:
            deadline = time.time() + self.timeout
            while not self.stop.is_set() and time.time() < deadline:
                actor = self.ready()
                if actor is not None:
                    _kill(actor, self.title)
                    self.killed = actor
                    return
                time.sleep(self.every)
            raise AssertionError(f"never found {self.what} to kill")
        except BaseException as err:  # noqa: BLE001 - reported on the main thread
            self.error = err

    def result(self):
        self.stop.set()
        self.join(60)
        if self.error is not None:
            raise self.error
        assert self.killed is not None, f"{self.what} was never killed (the job ended first)"
        return self.killed


# ----------------------------------------------------------------------------- records on the cluster
def _tiny(repo: Path, *overrides: str):
    return load_config(repo / "configs" / "tiny.yaml", list(overrides))


@pytest.fixture(scope="module")
def cluster_records(cluster, tiny_work, repo, tmp_path_factory) -> Path:
    """``tiny_work``'s world preprocessed on the cluster (``records`` lives on ``ray_local``)."""
    from preprocessing.job import preprocess

    out = tmp_path_factory.mktemp("ft-records")
    preprocess(_tiny(repo, f"work_dir={tiny_work}", f"preprocess.output={out}"))
    return out


# ----------------------------------------------------------------------------- 1. training worker killed
def _train_cfg(repo, tiny_work, work, max_steps: int):
    settings = {f"models.{p}": tiny_work / "zoo" / p for p in PARTS}
    # the run's own MLflow db, whatever MLFLOW_TRACKING_URI an earlier in-process run exported
    settings.update({"mlflow.tracking_uri": f"sqlite:///{Path(work).resolve()}/mlflow.db", "work_dir": work,
                     "char_ldm.batch_size": 4, "char_ldm.learning_rate": 1e-3,
                     "char_ldm.warmup_steps": 2, "char_ldm.log_every": 2, "char_ldm.sample_every": 1000,
                     "char_ldm.max_steps": max_steps, "train.checkpoint_every": 4, "train.max_failures": 1})
    return _tiny(repo, *[f"{k}={v}" for k, v in settings.items()]).resolved()


def _registered(run_dir: Path) -> tuple[str | None, list[str]]:
    """(latest, all) checkpoint dir names Ray Train's controller registered for the run."""
    try:
        snapshot = json.loads((run_dir / SNAPSHOT).read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or being rewritten
        return None, []
    latest = snapshot.get("latest_checkpoint_result") or {}
    return latest.get("checkpoint_dir_name"), [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]


def _loss_steps(cfg) -> list[int]:
    import mlflow

    from ray_jobs.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri(cfg))
    [run] = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))


def _loss_steps_so_far(cfg) -> list[int]:
    """What MLflow holds while the run is going ([] before it exists or while the db is busy)."""
    try:
        return _loss_steps(cfg)
    except Exception:  # noqa: BLE001 - no experiment / no run yet / sqlite locked: ask again
        return []


@pytest.fixture(scope="module")
def killed_training(cluster, cluster_records, tiny_work, repo, tmp_path_factory) -> dict:
    """Stage 1 (2 workers, ZeRO-2, 12 steps, a checkpoint every 4): one RayTrainWorker gets
    SIGKILL once the step-4 checkpoint is registered, aiming at the moment rank 0 has already
    committed steps 6 and 8 to MLflow (right after reporting the step-8 checkpoint) while Ray
    Train's controller has not registered that checkpoint yet (it polls the workers every 2 s):
    the restart then resumes from step 4 and runs steps 5-8 again."""
    from ray_jobs.train_ldm import fit

    work = tmp_path_factory.mktemp("ft-train")
    cfg = _train_cfg(repo, tiny_work, work, max_steps=12)
    storage = Path(cfg.train.storage_path)
    group, at_kill = [], {}

    def ready():  # the workers are looked up while they start; the kill follows at once
        if len(group) < 2:
            group[:] = [a for a in _actors(cluster, class_name="RayTrainWorker", state="ALIVE") if a.pid]
            return None
        runs = list(storage.glob("char_ldm-*"))
        latest = _registered(runs[0])[0] if runs else None
        if latest is None:  # step 4 uploaded is not enough: registered
            return None
        logged = _loss_steps_so_far(cfg)
        if latest == "step_0000004" and 8 not in logged:
            return None
        at_kill.update(registered=latest, logged=logged)
        return group[0]

    killer = Killer(ready, "RayTrainWorker", timeout=600, what="a RayTrainWorker after the step-4 checkpoint",
                    every=0.05)
    killer.start()
    try:
        summary = fit(cfg, str(cluster_records))
    except BaseException:
        killer.stop.set()  # the run's own error is the one to see
        raise
    killed = killer.result()
    run_dir = storage / summary["run"]
    return {"cfg": cfg, "summary": summary, "killed": killed, "run_dir": run_dir, "at_kill": at_kill,
            "workers": _actors(cluster, class_name="RayTrainWorker")}


def test_training_worker_killed_mid_run_resumes_and_finishes_exactly(killed_training):
    summary, killed = killed_training["summary"], killed_training["killed"]
    assert not _running(killed.pid)
    workers = {a.actor_id: a for a in killed_training["workers"]}
    assert workers[killed.actor_id].state == "DEAD"
    assert len(workers) >= 4  # a second worker group was started after the kill
    assert summary["global_step"] == 12 and summary["checkpoint"].endswith("step_0000012")
    at_kill = killed_training["at_kill"]
    # the restart continued from the checkpoint registered when the worker died (or one registered
    # in the instant between that look and the kill)
    assert summary["resumed_from_step"] in (4, 8), at_kill
    assert summary["resumed_from_step"] >= int(at_kill["registered"][-7:]), at_kill
    assert summary["restored_optimizer_digest"] == pytest.approx(summary["saved_optimizer_digest"], rel=1e-6)
    steps = _loss_steps(killed_training["cfg"])
    assert steps == list(range(2, 13, 2)), at_kill  # each log step once: none twice, none missing


# ----------------------------------------------------------------------------- 4a. torn checkpoint
def test_a_half_written_checkpoint_is_not_what_a_resume_picks_up(killed_training, cluster_records, tiny_work,
                                                                 repo):
    """A crash mid-save leaves a ``step_NNNNNNN`` dir Ray Train never registered. Ray Train v2
    restores the latest checkpoint of its controller's snapshot, so the resume starts from the
    last complete one even though the torn dir is the newest on disk."""
    from ray_jobs.train_ldm import fit

    run_dir, first = killed_training["run_dir"], killed_training["cfg"]
    latest, registered = _registered(run_dir)
    assert latest == "step_0000012" and "step_0000016" not in registered
    torn = run_dir / "step_0000016"
    shutil.copytree(run_dir / "step_0000012", torn)
    files = [f for f in torn.rglob("*") if f.is_file()]
    assert any(f.suffix == ".pt" for f in files)
    for f in files:  # every file cut short, as a crash mid-upload leaves them
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    (torn / "client_state.json").write_text(json.dumps({"global_step": 16}))
    assert max(p.name for p in run_dir.glob("step_*")) == "step_0000016"  # "newest dir" would pick it

    cfg = _train_cfg(repo, tiny_work, Path(first.work_dir), max_steps=16)
    summary = fit(cfg, str(cluster_records), resume=run_dir.name)
    assert summary["run"] == run_dir.name
    assert summary["resumed_from_step"] == 12 and summary["global_step"] == 16
    assert summary["restored_optimizer_digest"] == pytest.approx(summary["saved_optimizer_digest"], rel=1e-6)
    assert _loss_steps(cfg) == list(range(2, 17, 2))
    assert _registered(run_dir)[0] == "step_0000016"
    assert json.loads((torn / "client_state.json").read_text())["global_step"] == 16  # rewritten whole
    # the export was renamed into place: no staging dir left beside it, the new one complete
    work = Path(cfg.work_dir)
    assert not list(work.glob(".*.partial")) and not list(work.glob(".*.old"))
    assert (work / "char_ldm" / run_dir.name / "unet" / "diffusion_pytorch_model.safetensors").is_file()


# ----------------------------------------------------------------------------- 2. Ray Data actor killed
def _all_frame_ids(world: Path) -> set[str]:
    return {fid for ids in json.loads((world / "train-val-test_split.json").read_text()).values() for fid in ids}


def test_preprocessing_pool_actor_killed_mid_run_loses_and_duplicates_nothing(cluster, tiny_work, repo, tmp_path):
    from preprocessing.job import preprocess
    from storygpt.data.record_schema import read_table
    from storygpt.world.generate import generate_world

    world, out = tmp_path / "world", tmp_path / "rec"
    generate_world(world, stories=20, seed=11, image_size=128, clip_frames=2, val_fraction=0.1, test_fraction=0.1)
    expected = _all_frame_ids(world)
    assert len(expected) == 100
    # 20 parts of 5 frames; one actor per pool: the run cannot finish unless the killed one comes
    # back; half-CPU tasks: fewer worker processes starting at once on 2 cores
    pool = {"min_actors": 1, "max_actors": 1, "num_cpus": 0.4, "num_gpus": 0, "batch_size": 5}
    cfg = _tiny(repo, f"work_dir={tiny_work}", f"data.root={world}", f"preprocess.output={out}",
                "preprocess.rows_per_file=5", "preprocess.task_num_cpus=0.5",
                f"preprocess.super_resolution.pool={json.dumps(pool)}", f"preprocess.masks.pool={json.dumps(pool)}")

    done_at_kill = []

    def ready():  # the Mask pool's actor, up and working, while most parts are still to come
        done = len(list((out / "done").glob("*.json"))) if (out / "done").is_dir() else 0
        if done > 10:
            return None
        actors = [a for a in _actors(cluster, state="ALIVE")
                  if "MapWorker" in a.class_name and "(Mask)" in (a.repr_name or "") and a.pid]
        done_at_kill[:] = [done]
        return actors[0] if actors else None

    killer = Killer(ready, "MapWorker(MapBatches(Mask))", timeout=300, what="the Mask pool's actor mid-run")
    killer.start()
    try:
        manifest = preprocess(cfg)
    except BaseException:
        killer.stop.set()
        raise
    killed = killer.result()
    assert not _running(killed.pid) and done_at_kill[0] <= 10  # killed with at least half the parts to go
    [after] = [a for a in _actors(cluster, actor_id=killed.actor_id)]
    assert after.num_restarts >= 1  # Ray Data's pool actors restart (max_restarts=-1 by default)
    marked = [i for m in (out / "done").glob("*.json") for i in json.loads(m.read_text())["ids"]]
    assert len(marked) == len(set(marked)) == len(expected)  # each frame in exactly one finished part
    ids = read_table(out, columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == expected  # every frame exactly once
    c = manifest["counts"]
    assert c["frames_in"] == c["records_out"] == len(expected) and c["errors"] == 0


# ----------------------------------------------------------------------------- 4b. torn record part
# The writer in a child process that dies (os._exit: no cleanup runs, as under SIGKILL) right
# after its ``crash_at``-th Parquet write has put half of its bytes on disk.
_DIE_MID_WRITE = """
import json, os, sys
from pathlib import Path
import pyarrow.parquet as pq
from storygpt.data import parts
from storygpt.data.record_schema import ERRORS

out, rows_file, ids, crash_at = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
rows, real_write, calls = pq.read_table(rows_file), pq.write_table, []

def write(table, where, *args, **kwargs):
    calls.append(where)
    real_write(table, where, *args, **kwargs)
    if len(calls) == crash_at:
        data = Path(where).read_bytes()
        Path(where).write_bytes(data[: len(data) // 2])
        os._exit(137)

parts.pq.write_table = write
parts.write_part(out, ids, {"records": rows, "errors": ERRORS.empty_table()}, {"records": len(ids)})
"""


def _writer_dies(repo: Path, out: Path, rows_file: Path, ids: list[str], crash_at: int) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _DIE_MID_WRITE, str(out), str(rows_file), json.dumps(ids),
                           str(crash_at)], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 137, proc.stderr[-2000:]


def test_a_record_part_torn_mid_write_is_never_read_and_redone_once(cluster_records, tiny_work, repo, tmp_path):
    """The writer's two crash points, each a real process death, on a part whose frames are not
    done yet: half-way through the records file (a torn temp file), then half-way through the
    errors file (the records part is in place, its done marker is not). The parts written before
    stay readable, nothing torn or unmarked is ever read, and the re-run (Ray Data, on the cluster) deletes
    the leftovers and writes every record exactly once."""
    import pyarrow.parquet as pq

    from preprocessing.job import preprocess
    from storygpt.data.record_schema import read_table

    out = tmp_path / "rec"
    shutil.copytree(cluster_records, out)
    expected = _all_frame_ids(tiny_work / "world")
    markers = {m.stem: json.loads(m.read_text())["ids"] for m in (out / "done").glob("*.json")}
    assert len(markers) >= 2 and sum(map(len, markers.values())) == len(expected)
    part, ids = min(markers.items(), key=lambda kv: len(kv[1]))  # this part's frames: "not written yet"
    rows_file = tmp_path / "rows.parquet"
    shutil.copy(out / "records" / f"{part}.parquet", rows_file)
    for kind in ("records", "errors"):
        (out / kind / f"{part}.parquet").unlink()
    (out / "done" / f"{part}.json").unlink()
    earlier = set(read_table(out, columns=["id"])["id"].to_pylist())
    assert earlier == expected - set(ids)

    _writer_dies(repo, out, rows_file, ids, crash_at=1)  # inside the records file
    torn = [p for p in (out / "records").iterdir() if part in p.name]
    assert len(torn) == 1 and torn[0].name.endswith(".tmp") and torn[0].stat().st_size > 0
    assert set(read_table(out, columns=["id"])["id"].to_pylist()) == earlier  # the torn file is never read

    _writer_dies(repo, out, rows_file, ids, crash_at=2)  # the records part renamed into place, then dies
    assert (out / "records" / f"{part}.parquet").is_file() and not (out / "done" / f"{part}.json").exists()
    assert any(p.name.endswith(".tmp") for p in (out / "errors").iterdir())
    assert set(read_table(out, columns=["id"])["id"].to_pylist()) == earlier  # an unmarked part is not read
    assert pq.read_table(out / "records" / f"{part}.parquet").num_rows == len(ids)

    again = preprocess(_tiny(repo, f"work_dir={tiny_work}", f"preprocess.output={out}"))
    after = read_table(out, columns=["id"])["id"].to_pylist()
    assert len(after) == len(set(after)) and set(after) == expected  # every record exactly once
    c = again["counts"]
    assert c["frames_already_done"] == len(earlier) and c["records_out"] == len(expected)
    leftovers = [p.name for kind in ("records", "errors") for p in (out / kind).iterdir() if p.name.endswith(".tmp")]
    assert leftovers == [] and (out / "done" / f"{part}.json").is_file()


# ----------------------------------------------------------------------------- 3. Serve replica killed
def test_serve_replica_killed_is_replaced_and_stories_are_served_again(cluster, tiny_work, repo, tmp_path):
    import requests
    from ray import serve

    from serving.app import build_app
    from serving.command import start
    from test_serve import served_config

    cfg = served_config(repo, tiny_work, tmp_path / "serve-work")
    port = _free_port()
    # one HTTP proxy, on the head: every node here shares 127.0.0.1, a proxy per node would clash
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        url = start(build_app(cfg), "127.0.0.1", port, ray_init=False)
        story = {"captions": ["Emma waves hello in the forest.", "Later, she sits down with Bruno."], "seed": 3}
        r = requests.post(url + "/v1/stories", json=story, timeout=120)
        assert r.status_code == 200 and len(r.json()["frames"]) == 2, r.text
        replicas = [a for a in _actors(cluster, class_name="ServeReplica:storygpt:CharLDM", state="ALIVE") if a.pid]
        assert len(replicas) == cfg.serve.char_ldm.min_replicas
        for replica in replicas:  # all of them: no replica left to route to until Serve replaces them
            _kill(replica, "ServeReplica:storygpt:CharLDM")

        failures = []

        def served_again():
            try:
                reply = requests.post(url + "/v1/stories", json=story, timeout=60)
            except requests.RequestException as err:
                failures.append(repr(err))
                return None
            if reply.status_code == 200 and len(reply.json()["frames"]) == 2:
                return reply
            failures.append(reply.status_code)
            return None

        try:
            reply = _wait_for(served_again, 240, "a full story after the replica was killed", every=1.0)
        except AssertionError as err:
            raise AssertionError(f"{err}; last failures: {failures[-5:]}") from None
        assert reply.json()["frames"][1]["caption"] == story["captions"][1]
        new = [a for a in _actors(cluster, class_name="ServeReplica:storygpt:CharLDM", state="ALIVE") if a.pid]
        assert len(new) == len(replicas)
        assert not {a.actor_id for a in new} & {a.actor_id for a in replicas}
        assert not {a.pid for a in new} & {a.pid for a in replicas}
        assert requests.get(url + "/healthz", timeout=10).status_code == 200
    finally:
        serve.shutdown()
