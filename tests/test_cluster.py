"""cluster.yaml (the Ray cluster launcher) and deploy/Dockerfile, checked with Ray's own validators.

The launcher config goes through what `ray up` runs before it touches a cloud
(``ray.autoscaler._private.util.prepare_config`` then ``validate_config``, which checks the
installed ``ray/autoscaler/ray-schema.json``). The rest checks this project's own rules: node
types against the cluster preset, the head runs nothing, one image everywhere, every custom
resource the preset asks for declared by its node type. The KubeRay manifests: test_kuberay.py.
No cloud, no Ray started: a few seconds.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from storygpt.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster.yaml"
DEPLOY = REPO / "deploy"
REPO_ON_NODE = "/home/ray/storygpt-v-ray"
IMAGE = "storygpt-v-ray:latest"
PRESET = "cluster-flintstones"
PIPELINE = ["preprocess", "train-ldm", "precompute", "train-aligner"]  # what the RayService needs, in order


# ----------------------------------------------------------------------------- cluster.yaml
@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def prepared(config: dict) -> dict:
    """What `ray up` validates: defaults merged (prepare_config), then validate_config."""
    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


@pytest.fixture(scope="module")
def cfg(raw) -> dict:
    return prepared(raw)


@pytest.fixture(scope="module")
def preset():
    return load_config(PRESET)


def ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_passes_rays_own_validator(raw, cfg):
    jsonschema.validate(raw, ray_schema())  # the file as written, not only after defaults
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] == "head"
    assert {"head", "cpu_worker", "gpu_1x_worker", "gpu_8x_worker"} <= set(cfg["available_node_types"])


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


MUTATIONS = {
    "typo in a top-level key": lambda c: _rename(c, "idle_timeout_minutes", "idle_timout_minutes"),
    "typo in a node type key": lambda c: _rename(c["available_node_types"]["gpu_8x_worker"], "max_workers",
                                                 "max_worker"),
    "node type without resources": lambda c: c["available_node_types"]["cpu_worker"].pop("resources"),
    "fractional resource": lambda c: c["available_node_types"]["gpu_1x_worker"]["resources"].update(GPU=0.5),
    "negative max_workers": lambda c: c.update(max_workers=-1),
    "sum of min_workers above max_workers": lambda c: c["available_node_types"]["cpu_worker"].update(
        min_workers=50),
    "unknown head node type": lambda c: c.update(head_node_type="head_node"),
    "typo in docker": lambda c: _rename(c["docker"], "run_options", "run_option"),
    "typo in the image key": lambda c: _rename(c["docker"], "image", "imag"),
}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=list(MUTATIONS))
def test_a_broken_copy_fails_rays_validator(raw, mutation):
    broken = copy.deepcopy(raw)
    MUTATIONS[mutation](broken)
    with pytest.raises((jsonschema.ValidationError, ValueError, AssertionError)):  # Ray asserts some
        prepared(broken)


def test_min_workers_le_max_workers(cfg):
    total_max = cfg["max_workers"]
    for name, node in cfg["available_node_types"].items():
        assert 0 <= node["min_workers"] <= node["max_workers"] <= total_max, name
    assert sum(n["min_workers"] for n in cfg["available_node_types"].values()) <= total_max


def test_head_runs_no_work(cfg):
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0
    assert not re.match(r"(p|g)\d", head["node_config"]["InstanceType"]), "head on a GPU instance"
    assert "worker_image" not in head.get("docker", {})


def _gpu_types(cfg) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if v["resources"].get("GPU", 0) > 0}


def test_every_worker_type_has_its_own_custom_resource(cfg):
    for name, node in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            continue
        assert node["resources"].get(name, 0) > 0, f"{name}: no custom resource named after the type"


def test_node_types_fit_the_flintstones_preset(cfg, preset):
    types = cfg["available_node_types"]

    def fits(node, cpus, gpus):
        return node["resources"].get("CPU", 0) >= cpus and node["resources"].get("GPU", 0) >= gpus

    train, one = types["gpu_8x_worker"], types["gpu_1x_worker"]
    tcpu, tgpu = preset.train.cpus_per_worker, 1
    # all Ray Train workers on one 8-GPU node; never a Train worker on a 1-GPU node
    assert train["resources"]["GPU"] >= preset.train.num_workers
    assert train["resources"]["CPU"] >= preset.train.num_workers * tcpu
    assert not fits(one, tcpu, tgpu), "a Train worker fits gpu_1x_worker: training could spread over them"
    # the GPU actor pools and the Serve replicas fit a 1-GPU node
    for pool in (preset.preprocess.super_resolution.pool, preset.preprocess.masks.pool, preset.precompute.pool):
        assert fits(one, pool.num_cpus, pool.num_gpus), pool
    for replica in (preset.serve.llm, preset.serve.char_ldm):
        assert fits(one, replica.num_cpus, replica.num_gpus), replica
    assert one["max_workers"] >= preset.serve.llm.max_replicas + preset.serve.char_ldm.max_replicas
    assert fits(types["cpu_worker"], preset.preprocess.task_num_cpus, 0)


def _requested(preset) -> dict[str, list[tuple[str, dict, float]]]:
    """Per node-type resource: (what, {resource: amount} per actor/replica/worker, how many at most)."""
    asks = [("preprocess.super_resolution.pool", preset.preprocess.super_resolution.pool.resources,
             preset.preprocess.super_resolution.pool.max_actors),
            ("preprocess.masks.pool", preset.preprocess.masks.pool.resources, preset.preprocess.masks.pool.max_actors),
            ("precompute.pool", preset.precompute.pool.resources, preset.precompute.pool.max_actors),
            ("evaluate.pool", preset.evaluate.pool.resources, preset.evaluate.pool.max_actors),
            ("serve.llm", preset.serve.llm.resources, preset.serve.llm.max_replicas),
            ("serve.char_ldm", preset.serve.char_ldm.resources, preset.serve.char_ldm.max_replicas),
            ("train", preset.train.resources_per_worker, preset.train.num_workers)]
    out: dict[str, list] = {}
    for what, resources, count in asks:
        assert resources, f"{PRESET}: {what} asks for no node type"
        for name in resources:
            out.setdefault(name, []).append((what, dict(resources), count))
    return out


def test_every_node_runs_the_projects_image(raw, cfg):
    assert raw["docker"]["image"] == IMAGE and re.search(r"image: \S+ +# REPLACE", CLUSTER.read_text())
    for name, node in raw["available_node_types"].items():  # one image everywhere, nothing built on a node
        assert "docker" not in node and "worker_setup_commands" not in node, name
    assert cfg["setup_commands"] == [] and cfg["worker_setup_commands"] == []
    assert [c for c in cfg["head_setup_commands"] if "pip install" in c] == [
        f"cd {REPO_ON_NODE} && pip install -q -c constraints.txt 'boto3>=1.4.8'"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py311-gpu$", dockerfile, re.M)
    assert "ENV STORYGPT_GIT_COMMIT=" in dockerfile  # runs record their commit (no .git in the image)


def test_pool_replica_and_worker_resources_exist_on_their_node_types(cfg, preset):
    """Each custom resource the cluster preset asks for is declared by exactly one node type, one
    actor/replica/worker fits it, and the type's max_workers hold the most the preset asks for."""
    types = cfg["available_node_types"]
    for resource, asks in _requested(preset).items():
        owners = [n for n, t in types.items() if t["resources"].get(resource, 0) > 0]
        assert owners == [resource], (resource, owners)  # named after its node type
        node = types[resource]
        for what, resources, count in asks:
            per_node = node["resources"][resource] // resources[resource]
            assert per_node >= 1, what
            assert node["max_workers"] * per_node >= count, (what, count)


def test_the_launcher_commands_in_the_docs_run_as_written(preset):
    """docs/cluster.md's job lines use the preset by name: no --working-dir paths to resolve."""
    text = (REPO / "docs" / "cluster.md").read_text()
    for step in PIPELINE:
        assert re.search(rf"\$J {re.escape(step)} ", text), step
    assert f'J="ray job submit --address http://127.0.0.1:8265 -- python -m storygpt.cli"' in text
    assert f'S="--config {PRESET}"' in text
    resolved = preset.resolved()
    for value in (resolved.data.root, resolved.preprocess.output, resolved.precompute.output,
                  resolved.train.storage_path, *[v for v in resolved.models.paths().values() if v]):
        assert value.startswith("/shared/"), value  # the same on every node, whatever the cwd


def test_repo_and_shared_storage_reach_every_node(cfg):
    assert cfg["file_mounts"].get(REPO_ON_NODE) == "."
    assert any("/shared:/shared" in opt for opt in cfg["docker"]["run_options"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):  # Ray starts in the repo
        assert any(f"cd {REPO_ON_NODE} && ray start" in c for c in cfg[key]), key
    init = "\n".join(cfg["initialization_commands"])
    assert "mount -t nfs4" in init and " /shared" in init
    assert {"/weights/", "/data/"} <= set(cfg["rsync_exclude"])


def test_placeholders_are_marked(raw):
    text = CLUSTER.read_text()
    assert all(n["node_config"]["ImageId"] == "ami-REPLACE_ME" for n in raw["available_node_types"].values())
    assert "fs-REPLACE_ME" in "\n".join(raw["initialization_commands"])
    assert re.search(r"region: \S+ +# REPLACE", text)


def test_dockerfile_installs_like_make_setup():
    text = (DEPLOY / "Dockerfile").read_text()
    steps = " ".join(text.split("\\\n"))  # continuation lines joined
    pips = [line for line in steps.splitlines() if re.match(r"RUN .*pip install", line)]
    assert pips and all("-c constraints.txt" in line for line in pips)
    assert [i for i, line in enumerate(pips) if "torch==" in line] < \
           [i for i, line in enumerate(pips) if "deepspeed==" in line] < \
           [i for i, line in enumerate(pips) if "-e ." in line]
    ds = next(line for line in pips if "deepspeed==" in line)
    assert "DS_BUILD_SHM_COMM=1" in ds and "--no-build-isolation" in ds
    assert "whl/cpu" not in steps  # the CUDA torch
    assert "WORKDIR /home/ray/storygpt-v-ray" in text
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "weights", "data"} <= set(ignore)
