"""The KubeRay manifests in deploy/, validated against the KubeRay and Kubernetes schemas vendored in
tests/schemas/ (no network, no cluster): strictly, unknown fields rejected as `kubectl apply` does,
with Kubernetes' own pod/Service/PVC schemas inside KubeRay's ray.io/v1 types. The RayService's
``serveConfigV2`` goes through Ray's ``ServeDeploySchema`` and its import path and args are
loaded. The pipeline must be complete: a RayJob for every step the RayService needs, all on one
path-independent preset, each on a cluster whose groups declare the custom resources (and GPUs)
that preset's pools, replicas and workers ask for.
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

from storygpt.cli import COMMANDS
from storygpt.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
REPO_ON_NODE = "/home/ray/storygpt-v-ray"
IMAGE = "storygpt-v-ray:latest"
SERVE_IMPORT_PATH = "serving.app:app_builder"
PRESET = "cluster-flintstones"
PIPELINE = ["preprocess", "train-ldm", "precompute", "train-aligner"]  # what the RayService needs, in order


@pytest.fixture(scope="module")
def preset():
    return load_config(PRESET)


def manifests() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
            for p in sorted(DEPLOY.glob("*.yaml"))}


EXPECTED = {
    "shared-pvc.yaml": ("PersistentVolumeClaim", "v1"),
    **{f"rayjob-{step}.yaml": ("RayJob", "ray.io/v1") for step in [*PIPELINE, "evaluate"]},
    "rayservice.yaml": ("RayService", "ray.io/v1"),
}


@pytest.fixture(scope="module")
def validator():
    """Draft 2020-12 over KubeRay's types + Kubernetes' strict definitions (tests/schemas/)."""
    defs = {**json.loads((SCHEMAS / "kubernetes-v1.33-strict.json").read_text())["$defs"],
            **json.loads((SCHEMAS / "kuberay-v1.json").read_text())["$defs"]}
    kinds = {"RayJob": "RayJob", "RayService": "RayService",
             "PersistentVolumeClaim": "io.k8s.api.core.v1.PersistentVolumeClaim"}

    def validate(doc: dict) -> list[str]:
        schema = {"$defs": defs, "$ref": f"#/$defs/{kinds[doc['kind']]}"}
        found = jsonschema.Draft202012Validator(schema).iter_errors(doc)
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in found]

    return validate


def test_every_manifest_is_valid_against_the_crd_and_kubernetes_schemas(validator):
    found = manifests()
    assert set(found) == set(EXPECTED), set(found) ^ set(EXPECTED)
    for name, docs in found.items():
        assert [(d["kind"], d["apiVersion"]) for d in docs] == [EXPECTED[name]], name
        for doc in docs:
            assert validator(doc) == [], name
            assert "KubeRay >= 1.2" in (DEPLOY / name).read_text() or doc["kind"] == "PersistentVolumeClaim", name


def _head(doc):
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
    return spec["headGroupSpec"]


BROKEN = {  # each must be caught: the checker bites (strict, typed, required)
    "misspelled spec field": lambda d: d["spec"].update(shutdownAfterJobFinish=True),
    "replicas as a string": lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="1"),
    "unknown container field": lambda d: _head(d)["template"]["spec"]["containers"][0].update(imagePullPolicyy="x"),
    "rayStartParams value not a string": lambda d: _head(d)["rayStartParams"].update({"num-cpus": 0}),
    "worker group without a name": lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"),
    "a status written by hand": lambda d: d.update(status={}),
}


@pytest.mark.parametrize("damage", BROKEN, ids=list(BROKEN))
def test_a_broken_manifest_fails_the_schema(validator, damage):
    (doc,) = manifests()["rayjob-preprocess.yaml"]
    broken = copy.deepcopy(doc)
    BROKEN[damage](broken)
    assert len(validator(broken)) == 1, validator(broken)


def _pvc_name() -> str:
    (pvc,) = manifests()["shared-pvc.yaml"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    return pvc["metadata"]["name"]


def _groups(cluster_spec: dict) -> list[tuple[str, dict, dict]]:
    """(name, pod spec, rayStartParams) of the head and every worker group."""
    head = cluster_spec["headGroupSpec"]
    return [("head", head["template"]["spec"], head["rayStartParams"])] + [
        (g["groupName"], g["template"]["spec"], g["rayStartParams"]) for g in cluster_spec["workerGroupSpecs"]]


def _gpus(pod: dict) -> int:
    return max(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in pod["containers"])


def _custom_resources(params: dict) -> dict[str, float]:
    """rayStartParams.resources, KubeRay's '"{\"name\": n}"' string, as a dict."""
    text = params.get("resources")
    return json.loads(json.loads(text)) if text else {}


def check_cluster_spec(spec: dict) -> dict[str, float]:
    """The project's rules for a Ray cluster in a manifest; returns each custom resource's most
    (amount per pod x maxReplicas)."""
    assert spec["rayVersion"] == ray.__version__
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "work scheduled on the head"
    assert _gpus(spec["headGroupSpec"]["template"]["spec"]) == 0
    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    capacity: dict[str, float] = {}
    for g in groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
        resources = _custom_resources(g["rayStartParams"])
        gpus = _gpus(g["template"]["spec"])
        for name, amount in resources.items():  # named as cluster.yaml's node types, sized like them
            assert name == {0: "cpu_worker", 1: "gpu_1x_worker", 8: "gpu_8x_worker"}[gpus], (g["groupName"], name)
            capacity[name] = capacity.get(name, 0) + amount * g["maxReplicas"]
    claim = _pvc_name()
    for group, pod, _ in _groups(spec):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            assert c["image"] == IMAGE and c["workingDir"] == REPO_ON_NODE, group
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert volumes[mounts["/shared"]]["persistentVolumeClaim"]["claimName"] == claim, group
    return capacity


def _commands(entrypoint: str) -> list[str]:
    """The storygpt subcommands an entrypoint runs (a && chain), each on the cluster preset."""
    jobs = []
    for command in entrypoint.split("&&"):
        words = shlex.split(command)
        assert words[:3] == ["python", "-m", "storygpt.cli"] and words[3] in COMMANDS, command
        assert words[4:] == ["--config", PRESET], command  # one path-independent preset, no overrides
        jobs.append(words[3])
    return jobs


def test_the_rayjobs_run_the_whole_pipeline_each_on_a_cluster_that_fits(preset):
    """Following deploy/ in order gives the RayService what it loads, and each job's cluster has
    the node types (custom resources, GPUs) the preset's pools and workers ask for."""
    needs = {  # step -> (what asks, {resource: amount}, how many at once)
        "preprocess": [(p.resources, p.max_actors) for p in (preset.preprocess.super_resolution.pool,
                                                             preset.preprocess.masks.pool)],
        "precompute": [(preset.precompute.pool.resources, preset.precompute.pool.max_actors)],
        "train-ldm": [(preset.train.resources_per_worker, preset.train.num_workers)],
        "train-aligner": [(preset.train.resources_per_worker, preset.train.num_workers),
                          (preset.precompute.pool.resources, 1)],  # the candidates task
        "evaluate": [(preset.evaluate.pool.resources, preset.evaluate.pool.max_actors), ({"gpu_1x_worker": 1}, 1)],
    }
    order = []
    for name, docs in manifests().items():
        if not name.startswith("rayjob-"):
            continue
        (doc,) = docs
        spec = doc["spec"]
        steps = _commands(spec["entrypoint"])
        order.append((int(re.search(r"# Step (\d) of 5", (DEPLOY / name).read_text()).group(1)), steps))
        capacity = check_cluster_spec(spec["rayClusterSpec"])
        asked: dict[str, float] = {}
        for resources, count in needs[steps[-1]]:
            for resource, amount in resources.items():
                asked[resource] = asked.get(resource, 0) + amount * count
        for resource, amount in asked.items():
            assert capacity.get(resource, 0) >= amount, (name, resource, amount, capacity)
        if "entrypointResources" in spec:  # the driver's own share, on a group that has it
            assert set(json.loads(spec["entrypointResources"])) <= set(capacity), name
        assert spec["shutdownAfterJobFinishes"] is True
        assert "KubeRay never runs a finished" in (DEPLOY / name).read_text(), name  # and says how to re-run it
    flat = [s for _, steps in sorted(order) for s in steps]
    assert flat[:len(PIPELINE)] == PIPELINE and flat[-1] == "evaluate", flat


def _serve_apps(config: dict) -> dict[str, str]:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)  # Ray's own schema for `serve deploy` / serveConfigV2
    return {app["name"]: app["import_path"] for app in config["applications"]}


def test_rayservice_import_path_and_args_load_and_find_the_pipelines_exports(preset):
    import importlib

    from ray.serve.schema import DeploymentSchema

    from serving.app import deployment_options

    (doc,) = manifests()["rayservice.yaml"]
    spec = doc["spec"]
    assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 must be a YAML string"
    serve = yaml.safe_load(spec["serveConfigV2"])
    assert list(_serve_apps(serve).values()) == [SERVE_IMPORT_PATH]
    (app,) = serve["applications"]
    module, _, attr = SERVE_IMPORT_PATH.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    # the args load: the preset resolves, and the one thing missing here is what the RayJobs export
    with pytest.raises(ConfigError, match=r"models\.char_ldm: not set and no export under '/shared/work/char_ldm'"):
        builder(app["args"])
    assert load_config(app["args"]["config"]).model_dump() == preset.model_dump()  # the RayJobs' preset
    for replica in (preset.serve.llm, preset.serve.char_ldm):
        DeploymentSchema.model_validate({"name": "x", **deployment_options(replica)})
    capacity = check_cluster_spec(spec["rayClusterConfig"])
    for resource in {**preset.serve.llm.resources, **preset.serve.char_ldm.resources}:
        most = preset.serve.llm.max_replicas * preset.serve.llm.resources.get(resource, 0) + \
            preset.serve.char_ldm.max_replicas * preset.serve.char_ldm.resources.get(resource, 0)
        assert capacity.get(resource, 0) >= most, resource
    (group,) = spec["rayClusterConfig"]["workerGroupSpecs"]
    assert group["minReplicas"] >= preset.serve.llm.min_replicas + preset.serve.char_ldm.min_replicas


def test_rayservice_matches_serving_serve_config():
    ours = _serve_apps(yaml.safe_load(yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())["spec"]["serveConfigV2"]))
    theirs = _serve_apps(yaml.safe_load((REPO / "serving" / "serve_config.yaml").read_text()))
    assert sorted(ours.values()) == sorted(theirs.values())


def test_a_broken_serve_config_fails_rays_schema():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        _serve_apps({"applications": [{"name": "storygpt", "import_pth": SERVE_IMPORT_PATH}]})
