"""`ray job submit`, for real: the README's commands against a Ray head started with `ray start`.

A head of its own (job server on 127.0.0.1, its own temp dir and token, every port it opens
chosen free here, 2 CPUs) runs as `ray start --head --block`, stopped by its PID at the end.
The tests never `ray.init`: they reach that cluster only through the job CLI (and the job
server's HTTP API to see it is up), from a copy of what a fresh clone holds (plus a `weights/` and
a `data/` dir, as a user's checkout has), exactly as a user does. The working dir goes up without
`.venv`, `work_dirs`, `.git`, `weights/` or `data/` (`.gitignore`, `.rayignore` and Ray's default
excludes); `preprocess` then `train-ldm` run on the tiny preset named by name (`--config tiny`),
and a job with a bad config must fail naming the field.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.prefix) / "bin"
RAY = str(VENV_BIN / "ray")
JOB_TIMEOUT_S = 300


# ----------------------------------------------------------------------------- helpers
def _free_ports(n: int) -> list[int]:
    """n distinct ports free on every interface now (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))  # Ray swaps --node-ip-address 127.0.0.1 for the node's own IP
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    with socket.socket() as s:  # Ray's workers bind all interfaces
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _free_range(size: int, avoid: set[int]) -> tuple[int, int]:
    """A run of `size` ports, all free now, outside Ray's default worker range (10002-19999)
    and below the kernel's ephemeral range, so another Ray on this machine cannot clash."""
    rng = random.Random()
    for _ in range(200):
        low = rng.randrange(20000, 32000 - size)
        ports = range(low, low + size)
        if not avoid.intersection(ports) and all(_port_free(p) for p in ports):
            return low, low + size - 1
    raise RuntimeError(f"no run of {size} free ports found")


def _clean_env(token_file: Path) -> dict[str, str]:
    """This process's environment without anything that would point Ray at another cluster
    (or MLflow elsewhere), the venv's bin first on PATH (job entrypoints are shell commands),
    and token auth on with this head's own token.

    Token auth is explicit: Ray 2.60's `ray start --head` turns it on by itself when
    ~/.ray/auth_token exists, but the job CLI then sends no token unless RAY_AUTH_MODE=token
    is set on its side too (`Missing authentication token`). The same variables on both sides
    (and in the jobs, which inherit the head's environment) make it the same on any machine."""
    dropped = {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "RAY_AUTH_TOKEN",
               "MLFLOW_TRACKING_URI"}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = sys.prefix
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # SIGTERM: stop now, not after a 30 s drain
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


class Head:
    def __init__(self, address: str, gcs_port: int, env: dict, proc: subprocess.Popen, log: Path, temp: str):
        self.address, self.gcs_port, self.env, self.proc, self.log, self.temp = address, gcs_port, env, proc, log, temp
        self.clone = REPO  # where the job CLI runs: set to a fresh clone by the `head` fixture

    def joined(self, out: str) -> bool:
        """The job's driver joined this cluster (its `ray.init()`), not a Ray of its own."""
        return re.search(rf"Connecting to existing Ray cluster at address: [\w.]+:{self.gcs_port}\b", out) is not None

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`ray job ...` against this head only, from the fresh clone."""
        return subprocess.run([RAY, "job", *args, "--address", self.address], cwd=self.clone, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def submit(self, *command: str) -> tuple[subprocess.CompletedProcess, str]:
        """The README's line: ray job submit --address A --working-dir . -- python -m storygpt.cli ..."""
        argv = [RAY, "job", "submit", "--address", self.address, "--working-dir", ".", "--",
                "python", "-m", "storygpt.cli", *command]
        started = time.monotonic()
        done = subprocess.run(argv, cwd=self.clone, env=self.env, capture_output=True, text=True,
                              timeout=JOB_TIMEOUT_S)
        print(f"\n$ {shlex.join(argv[1:])}\n  -> exit {done.returncode} in {time.monotonic() - started:.1f}s")
        out = done.stdout + done.stderr
        found = re.search(r"Job '([^']+)' submitted successfully", out)
        assert found, f"no job id in `ray job submit` output:\n{out[-6000:]}"
        return done, found.group(1)

    def status(self, job_id: str) -> str:
        """`ray job status ID`, as a JobStatus name."""
        done = self.cli("status", job_id)
        text = done.stdout + done.stderr
        assert done.returncode == 0, text
        words = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}
        found = re.search(rf"Job '{re.escape(job_id)}' (succeeded|failed|was stopped)", text)
        if found:
            return words[found.group(1)]
        found = re.search(rf"Status for job '{re.escape(job_id)}': (\w+)", text)
        assert found, text
        return found.group(1)

    def listed(self) -> dict[str, str]:
        """`ray job list`: {submission id: JobStatus name}."""
        done = self.cli("list")
        assert done.returncode == 0, done.stdout + done.stderr
        jobs = {}
        for chunk in done.stdout.split("JobDetails(")[1:]:
            job_id = re.search(r"submission_id='([^']+)'", chunk)
            status = re.search(r"status=<JobStatus\.(\w+)", chunk)
            if job_id and status:
                jobs[job_id.group(1)] = status.group(1)
        return jobs

    def logs(self, job_id: str) -> str:
        done = self.cli("logs", job_id)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout


def _get(url: str, token: str | None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


def _wait_for_job_server(head: "Head", timeout: float = 180) -> None:
    """Until the job server lists jobs over HTTP with the head's token (and refuses without it)."""
    token = Path(head.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.proc.returncode}:\n{head.log.read_text()[-4000:]}")
        try:
            code, body = _get(f"{head.address}/api/version", token)
            if (code == 200 and json.loads(body).get("ray_version")
                    and _get(f"{head.address}/api/jobs/", token)[0] == 200):
                assert _get(f"{head.address}/api/jobs/", None)[0] == 401, "the job server answers without the token"
                return
        except (OSError, ValueError):
            pass
        time.sleep(1)
    raise RuntimeError(f"the job server at {head.address} did not answer in {timeout}s:\n"
                       f"{head.log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` (it shuts down the processes it started), by PID; any of
    its own descendants still alive afterwards are ended by their PIDs too."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=30)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def _package_bytes(root: Path) -> int:
    """The size of the zip `ray job submit --working-dir .` makes of ``root`` (Ray's own
    packaging function, with .gitignore, .rayignore and Ray's default excludes, as the CLI calls it)."""
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "pkg.zip"
        create_package(str(root), target, include_gitignore=True, excludes=get_runtime_env_default_excludes())
        return target.stat().st_size


# ----------------------------------------------------------------------------- the head
@pytest.fixture(scope="module")
def _head_process():
    """`ray start --head --block` launched (not yet waited for); stopped by its PID at the end."""
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths are limited
    (gcs, dashboard, client, metrics, agent_http, agent_grpc, runtime_env_agent, object_manager,
     node_manager) = _free_ports(9)
    low, high = _free_range(100, {gcs, dashboard, client, metrics, agent_http, agent_grpc, runtime_env_agent,
                                  object_manager, node_manager})
    token_file = Path(temp) / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    env = _clean_env(token_file)
    log = Path(temp) / "ray_start.log"
    argv = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
            "--ray-client-server-port", str(client), "--metrics-export-port", str(metrics),
            "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(runtime_env_agent), "--object-manager-port", str(object_manager),
            "--node-manager-port", str(node_manager), "--min-worker-port", str(low), "--max-worker-port", str(high),
            "--temp-dir", temp, "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(300 * 2**20),
            "--disable-usage-stats"]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=temp, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield Head(f"http://127.0.0.1:{dashboard}", gcs, env, proc, log, temp)
    finally:
        _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def job_work(tiny_work, tmp_path_factory) -> Path:
    """A work dir of its own; the tiny zoo and world of `tiny_work` linked in (read only)."""
    work = tmp_path_factory.mktemp("jobwork")
    for part in ("zoo", "world"):
        (work / part).symlink_to(tiny_work / part, target_is_directory=True)
    return work


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """What a fresh clone holds, plus the weights and data a user keeps in the checkout."""
    from test_packaging import checkout_copy

    root = checkout_copy(tmp_path_factory.mktemp("clone"))
    for big in ("weights/stable-diffusion-v1-5/unet/model.safetensors", "data/flintstones/frames.npy"):
        (root / big).parent.mkdir(parents=True)
        (root / big).write_bytes(os.urandom(2**20))
    return root


@pytest.fixture(scope="module")
def head(_head_process, job_work, clone):
    """The head, once its job server answers (it starts while `job_work` builds the tiny zoo)."""
    _wait_for_job_server(_head_process)
    _head_process.clone = clone
    return _head_process


SMALL_RUN = ["--set", "char_ldm.max_steps=4", "--set", "train.checkpoint_every=2", "--set", "char_ldm.batch_size=4",
             "--set", "char_ldm.sample_every=1000", "--set", "char_ldm.log_every=2"]


# ----------------------------------------------------------------------------- the tests
def test_preprocess_then_train_ldm_as_submitted_jobs(head, job_work):
    # preprocess: the README's "On a cluster" line with the tiny preset
    done, job_id = head.submit("preprocess", "--config", "tiny", "--set", f"work_dir={job_work}")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-8000:]
    assert head.status(job_id) == "SUCCEEDED"
    assert head.joined(out), out[-8000:]
    # the working dir went up without the venv, the work dirs or .git (.gitignore + Ray's default
    # excludes), and is small: look at what the head unpacked for this job
    uploaded = re.search(r"Uploading package gcs://(_ray_pkg_\w+)\.zip", out)
    assert uploaded, out[-8000:]
    unpacked = Path(head.temp) / "session_latest" / "runtime_resources" / "working_dir_files" / uploaded.group(1)
    assert (unpacked / "storygpt" / "cli.py").is_file() and (unpacked / "configs" / "tiny.yaml").is_file()
    for ignored in (".venv", "work_dirs", ".git", ".pytest_cache", "weights", "data"):
        assert not (unpacked / ignored).exists(), f"{ignored} was uploaded with the working dir"
    files = [p for p in unpacked.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    size = sum(p.stat().st_size for p in files)
    zipped = _package_bytes(head.clone)
    print(f"\nworking dir as uploaded: {len(files)} files, {size / 2**20:.2f} MiB unpacked; "
          f"package {zipped / 2**20:.2f} MiB zipped")
    assert size < 10 * 2**20 and zipped < 5 * 2**20
    summary = re.search(r"^preprocess: (\d+) frames in, (\d+) records out, (\d+) errors", out, re.M)
    assert summary, out[-8000:]
    frames_in, records_out, errors = map(int, summary.groups())
    assert frames_in > 0 and records_out == frames_in and errors == 0
    manifest = json.loads((job_work / "records" / "manifest.json").read_text())
    assert manifest["counts"]["records_out"] == records_out
    assert Path(manifest["output"]).resolve() == (job_work / "records").resolve()
    assert list((job_work / "records" / "records").glob("*.parquet"))

    # stage 1: train-ldm, 2 workers x 0.5 CPU (the tiny default), a few steps
    done, job_id = head.submit("train-ldm", "--config", "tiny", "--set", f"work_dir={job_work}", *SMALL_RUN)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-8000:]
    assert head.status(job_id) == "SUCCEEDED"
    assert head.joined(out), out[-8000:]
    summaries = [json.loads(line) for line in done.stdout.splitlines()  # the job's output, tailed by submit
                 if line.startswith("{") and '"run"' in line]
    assert summaries, out[-8000:]
    summary = summaries[-1]
    assert summary["global_step"] == 4 and summary["checkpoint"]
    exported = job_work / "char_ldm" / summary["run"]
    assert (exported / "unet" / "diffusion_pytorch_model.safetensors").is_file(), sorted(
        str(p.relative_to(job_work)) for p in (job_work / "char_ldm").rglob("*"))
    checkpoints = sorted(p.name for p in (job_work / "ray_results" / summary["run"]).glob("step_*"))
    assert checkpoints == ["step_0000002", "step_0000004"], checkpoints
    assert (job_work / "mlflow.db").is_file()


def test_a_bad_config_fails_the_job_naming_the_field(head, job_work):
    done, job_id = head.submit("train-ldm", "--config", "tiny", "--set", f"work_dir={job_work}",
                               "--set", "char_ldm.batch_size=0")
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-8000:]
    logs = head.logs(job_id)
    assert "storygpt train-ldm: error: invalid config" in logs, logs[-4000:]
    assert re.search(r"char_ldm\.batch_size: .*greater than 0", logs), logs[-4000:]
    assert "Traceback" not in logs, logs[-4000:]  # a config error, not a crash
    assert head.listed()[job_id] == "FAILED"
