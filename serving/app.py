"""The Serve application: StoryAPI (FastAPI ingress) → StoryLLM (aligner loop) → CharLDM (batched).

``build_app(cfg)`` from Python; ``serving.app:app_builder`` for ``serve run`` / ``serve build`` /
``serve deploy`` (args: ``config``, ``overrides``, optional ``char_ldm`` / ``aligner`` dirs, e.g.
``serve run serving.app:app_builder config=configs/tiny.yaml``). Replica counts, autoscaling and
resources come from ``cfg.serve.llm`` / ``cfg.serve.char_ldm``.
"""

from __future__ import annotations

from pathlib import Path

from ray.serve import Application

from storygpt.config import ConfigError, ReplicaConfig, StoryConfig, load_config
from storygpt.models.trained import trained_dir
from serving.deployments import CharLDMDeployment, StoryLLMDeployment
from serving.ingress import StoryAPI

REPO = Path(__file__).resolve().parents[1]
APP_NAME = "storygpt"
# The ingress parses JSON and base64 and relays: a sliver of a CPU (no serve.ingress section yet).
INGRESS_CPUS = 0.1


def deployment_options(replica: ReplicaConfig) -> dict:
    """Serve options of one deployment from its config section."""
    return {
        "autoscaling_config": {"min_replicas": replica.min_replicas, "max_replicas": replica.max_replicas,
                               "initial_replicas": replica.min_replicas,
                               "target_ongoing_requests": replica.target_ongoing_requests},
        "max_ongoing_requests": replica.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": replica.num_cpus, "num_gpus": replica.num_gpus,
                              "resources": dict(replica.resources)},  # the node type (configs/cluster-*.yaml)
    }


def build_app(cfg: StoryConfig, char_ldm_dir: str | Path | None = None, aligner_dir: str | Path | None = None,
              api_key: str | None = None) -> Application:
    """The composed application. The trained dirs are found here (``--char-ldm`` / ``models.*`` /
    the latest export), so a missing one fails before anything starts; replicas get absolute paths."""
    cfg = cfg.resolved()
    char_ldm = str(trained_dir(cfg, "char_ldm", char_ldm_dir).resolve())
    aligner = str(trained_dir(cfg, "aligner", aligner_dir).resolve())
    data = cfg.model_dump(mode="json")
    ldm = CharLDMDeployment.options(**deployment_options(cfg.serve.char_ldm)).bind(data, char_ldm)
    llm = StoryLLMDeployment.options(**deployment_options(cfg.serve.llm)).bind(data, aligner, ldm)
    # The ingress holds every request in flight (uploads being read, health checks, stories waiting
    # on the LM): sized apart from the story budget, so 64 slow uploads cannot take every slot.
    # Past max_queued_requests the Serve proxy answers 503 itself.
    limits = cfg.serve.limits
    return StoryAPI.options(max_ongoing_requests=limits.max_connections, max_queued_requests=limits.max_queued_requests,
                            ray_actor_options={"num_cpus": INGRESS_CPUS}).bind(llm, data, api_key)


def app_builder(args: dict) -> Application:
    """``serve run serving.app:app_builder config=configs/flintstones.yaml``: args ``config``
    (a relative path is tried from the cwd, then from the repo), ``overrides`` (list of
    ``dotted.key=value``, or one string of them separated by spaces), ``char_ldm``, ``aligner``."""
    known = {"config", "overrides", "char_ldm", "aligner"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"app_builder: unknown args {unknown}; expected {sorted(known)}")
    config = Path(args.get("config", "configs/tiny.yaml"))
    if not config.is_absolute() and not config.is_file() and (REPO / config).is_file():
        config = REPO / config
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    cfg = load_config(config, list(overrides))
    return build_app(cfg, args.get("char_ldm"), args.get("aligner"))
