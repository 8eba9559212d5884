"""cluster.yaml and the KubeRay manifests in deploy/: checked with Ray's own validators.

The launcher config goes through what `ray up` runs before it touches a cloud
(``ray.autoscaler._private.util.prepare_config`` then ``validate_config``, which checks the
installed ``ray/autoscaler/ray-schema.json``); the RayService's ``serveConfigV2`` through
``ray.serve.schema.ServeDeploySchema``, what `serve deploy` and KubeRay's Serve calls use.
The rest checks this project's own rules: node types against the flintstones preset, the head
runs nothing, every pip call uses constraints.txt, the manifests' jobs are real subcommands.
No cloud, no Kubernetes, no Ray started: a few seconds.
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

from storygpt.cli import COMMANDS
from storygpt.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster.yaml"
DEPLOY = REPO / "deploy"
REPO_ON_NODE = "/home/ray/storygpt-v-ray"
IMAGE = "storygpt-v-ray:latest"
SERVE_IMPORT_PATH = "serving.app:app_builder"


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
    return load_config(REPO / "configs" / "flintstones.yaml")


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
    "typo in a node type's docker": lambda c: _rename(c["available_node_types"]["gpu_1x_worker"]["docker"],
                                                      "worker_image", "worker_imag"),
}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=list(MUTATIONS))
def test_a_broken_copy_fails_rays_validator(raw, mutation):
    broken = copy.deepcopy(raw)
    MUTATIONS[mutation](broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
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


def _effective_setup(cfg) -> dict[str, list[str]]:
    """The commands each node type runs (a type's worker_setup_commands replace the merged list)."""
    out = {}
    for name, node in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            out[name] = cfg["head_setup_commands"]
        else:
            out[name] = node.get("worker_setup_commands", cfg["worker_setup_commands"])
    return out


def _pip_installs(cmds: list[str]) -> list[list[str]]:
    found = []
    for cmd in cmds:
        lexer = shlex.shlex(cmd, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, ";"]:  # split at &&, ||, ;, |, ( ) -- quotes respected
            if token and set(token) <= set("&|;()"):
                if "pip" in words and "install" in words:
                    found.append(words)
                words = []
            else:
                words.append(token)
    return found


def test_setup_commands_install_like_make_setup(cfg):
    gpu = _gpu_types(cfg)
    for name, cmds in _effective_setup(cfg).items():
        pips = _pip_installs(cmds)
        assert pips, name
        for words in pips:  # every pip call through the constraints file, from the repo dir
            assert "-c" in words and words[words.index("-c") + 1] == "constraints.txt", (name, words)
        joined = "\n".join(cmds)
        assert f"cd {REPO_ON_NODE}" in joined
        # torch first, then deepspeed (built against it, its CPU comm op compiled), then the project
        order = [next(i for i, w in enumerate(pips) if any(a.startswith(pkg) for a in w))
                 for pkg in ("torch==", "deepspeed==", ".")]
        assert order == sorted(order), (name, order)
        ds = next(c for c in cmds if "deepspeed==" in c)
        assert "DS_BUILD_SHM_COMM=1" in ds and "--no-build-isolation" in ds and "--no-cache-dir" in ds
        torch_cmd = next(c for c in cmds if "torch==" in c)
        if name in gpu:  # the CUDA wheel: PyPI's default, never the CPU index
            assert "whl/cpu" not in torch_cmd, name
            assert "gpu" in cfg["available_node_types"][name]["docker"]["worker_image"]
        else:
            assert "download.pytorch.org/whl/cpu" in torch_cmd, name
        assert "storygpt.compat import check" in joined
        assert "ln -sfn /shared/work work_dirs/flintstones" in joined, name


def test_pins_match_constraints_and_the_installed_ray(cfg):
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for name, cmds in _effective_setup(cfg).items():
        for words in _pip_installs(cmds):
            for w in words:
                if "==" in w:
                    pkg, ver = w.split("==")
                    assert pins.get(pkg) == ver, (name, w)
    images = [cfg["docker"]["image"]] + [n["docker"]["worker_image"] for n in _gpu_types(cfg).values()]
    for image in images:
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py311"), image


def test_repo_and_shared_storage_reach_every_node(cfg):
    assert cfg["file_mounts"].get(REPO_ON_NODE) == "."
    assert any("/shared:/shared" in opt for opt in cfg["docker"]["run_options"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):  # Ray starts in the repo
        assert any(f"cd {REPO_ON_NODE} && ray start" in c for c in cfg[key]), key
    init = "\n".join(cfg["initialization_commands"])
    assert "mount -t nfs4" in init and " /shared" in init
    # the preset's default train.storage_path lands on /shared with --set work_dir=/shared/work
    shared = load_config(REPO / "configs" / "flintstones.yaml", ["work_dir=/shared/work"]).resolved()
    assert shared.train.storage_path.startswith("/shared/")
    assert shared.preprocess.output.startswith("/shared/") and shared.precompute.output.startswith("/shared/")


def test_placeholders_are_marked(raw):
    text = CLUSTER.read_text()
    assert all(n["node_config"]["ImageId"] == "ami-REPLACE_ME" for n in raw["available_node_types"].values())
    assert "fs-REPLACE_ME" in "\n".join(raw["initialization_commands"])
    assert re.search(r"region: \S+ +# REPLACE", text)


# ----------------------------------------------------------------------------- deploy/ (KubeRay)
def manifests() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
            for p in sorted(DEPLOY.glob("*.yaml"))}


EXPECTED = {
    "rayjob-train-ldm.yaml": ("RayJob", "ray.io/v1"),
    "rayjob-preprocess.yaml": ("RayJob", "ray.io/v1"),
    "rayservice.yaml": ("RayService", "ray.io/v1"),
    "shared-pvc.yaml": ("PersistentVolumeClaim", "v1"),
}


def test_every_manifest_parses_with_kind_and_api_version():
    found = manifests()
    assert set(EXPECTED) <= set(found)
    for name, docs in found.items():
        assert docs, name
        for doc in docs:
            assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), name
            assert doc["metadata"].get("name"), name
    for name, (kind, api) in EXPECTED.items():
        assert [(d["kind"], d["apiVersion"]) for d in found[name]] == [(kind, api)], name


def _pvc_name() -> str:
    (pvc,) = manifests()["shared-pvc.yaml"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    return pvc["metadata"]["name"]


def _pods(cluster_spec: dict) -> list[tuple[str, dict]]:
    pods = [("head", cluster_spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster_spec["workerGroupSpecs"]]
    return pods


def _gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "work scheduled on the head"
    assert all(_gpus(c) == 0 for c in head["template"]["spec"]["containers"])
    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert {"groupName", "minReplicas", "maxReplicas", "template", "rayStartParams"} <= set(g), g.get("groupName")
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
    claim = _pvc_name()
    for group, pod in _pods(spec):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert pod["containers"], group
        for c in pod["containers"]:
            assert c["image"] == IMAGE, (group, c["image"])
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/shared" in mounts, group
            assert volumes[mounts["/shared"]]["persistentVolumeClaim"]["claimName"] == claim, group


def _entrypoint_job(entrypoint: str) -> str:
    words = shlex.split(entrypoint)
    assert words[:3] == ["python", "-m", "storygpt.cli"], entrypoint
    assert words[3] in COMMANDS, f"{words[3]}: not a storygpt subcommand"
    rest = " ".join(words[4:])
    assert "--config configs/flintstones.yaml" in rest and "--set work_dir=/shared/work" in rest, entrypoint
    assert (REPO / "configs" / "flintstones.yaml").is_file()
    return words[3]


@pytest.mark.parametrize("name,job", [("rayjob-train-ldm.yaml", "train-ldm"),
                                      ("rayjob-preprocess.yaml", "preprocess")])
def test_rayjobs(name, job, preset):
    (doc,) = manifests()[name]
    spec = doc["spec"]
    assert _entrypoint_job(spec["entrypoint"]) == job
    if "runtimeEnvYAML" in spec:
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    check_cluster_spec(spec["rayClusterSpec"])
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpu_capacity = sum(max(_gpus(c) for c in g["template"]["spec"]["containers"]) * g["maxReplicas"]
                       for g in groups)
    if job == "train-ldm":  # all Train workers' GPUs, on one pod (NVLink)
        assert any(_gpus(c) >= preset.train.num_workers for g in groups for c in g["template"]["spec"]["containers"])
    else:  # a CPU group, and GPUs for the preset's SR + SAM pools at their maximum
        assert any(all(_gpus(c) == 0 for c in g["template"]["spec"]["containers"]) for g in groups)
        pools = preset.preprocess.super_resolution.pool, preset.preprocess.masks.pool
        assert gpu_capacity >= sum(p.max_actors * p.num_gpus for p in pools)


def _serve_apps(config: dict) -> dict[str, str]:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)  # Ray's own schema for `serve deploy` / serveConfigV2
    return {app["name"]: app["import_path"] for app in config["applications"]}


def test_rayservice(preset):
    (doc,) = manifests()["rayservice.yaml"]
    spec = doc["spec"]
    assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 must be a YAML string"
    serve = yaml.safe_load(spec["serveConfigV2"])
    apps = _serve_apps(serve)
    assert list(apps.values()) == [SERVE_IMPORT_PATH]
    (app,) = serve["applications"]
    assert app["args"] == {"config": "configs/flintstones.yaml"}
    assert (REPO / app["args"]["config"]).is_file()
    module, _, attr = SERVE_IMPORT_PATH.partition(":")
    source = (REPO / Path(*module.split("."))).with_suffix(".py")
    if source.exists():  # serving/app.py is being written; once it is, it must define the builder
        assert re.search(rf"^(def {attr}\b|{attr}\s*=)", source.read_text(), re.M), f"{source}: no {attr}"
    check_cluster_spec(spec["rayClusterConfig"])
    (group,) = spec["rayClusterConfig"]["workerGroupSpecs"]
    assert group["maxReplicas"] >= preset.serve.llm.max_replicas + preset.serve.char_ldm.max_replicas
    assert group["minReplicas"] >= preset.serve.llm.min_replicas + preset.serve.char_ldm.min_replicas


def test_rayservice_matches_serving_serve_config():
    path = REPO / "serving" / "serve_config.yaml"
    if not path.exists():
        pytest.skip("serving/serve_config.yaml not written yet")
    ours = _serve_apps(yaml.safe_load(yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())["spec"]["serveConfigV2"]))
    theirs = _serve_apps(yaml.safe_load(path.read_text()))
    assert sorted(ours.values()) == sorted(theirs.values())


def test_a_broken_serve_config_fails_rays_schema():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        _serve_apps({"applications": [{"name": "storygpt", "import_pth": SERVE_IMPORT_PATH}]})


def test_dockerfile_installs_like_make_setup():
    text = (DEPLOY / "Dockerfile").read_text()
    steps = " ".join(text.split("\\\n"))  # continuation lines joined
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py311-gpu$", text, re.M)
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
