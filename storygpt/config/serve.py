"""``serve:``: the Ray Serve app's bind address, request limits and per-deployment autoscaling."""

from __future__ import annotations

from pydantic import Field, model_validator

from storygpt.config.base import Section, _ordered


class ReplicaConfig(Section):
    """One Serve deployment: autoscaling bounds and per-replica resources."""

    min_replicas: int = Field(ge=1)
    max_replicas: int = Field(ge=1)
    num_cpus: float = Field(gt=0)
    num_gpus: float = Field(ge=0)
    max_ongoing_requests: int = Field(ge=1)
    target_ongoing_requests: float = Field(gt=0, description="autoscaling target per replica")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom resources per replica, e.g. {gpu_1x_worker: 1}: the node type")

    @model_validator(mode="after")
    def _min_le_max(self) -> "ReplicaConfig":
        return _ordered(self, "min_replicas", "max_replicas")


class CharLDMReplicaConfig(ReplicaConfig):
    max_batch_size: int = Field(ge=1, description="@serve.batch: frames drawn together across stories")
    batch_wait_timeout_s: float = Field(ge=0)


class ServeLimits(Section):
    """Every request is checked against these; a violation is a 4xx naming the field."""

    max_frames: int = Field(ge=1, description="captions per story (given + continued)")
    max_caption_chars: int = Field(ge=1)
    max_steps: int = Field(ge=1, description="denoising steps a request may ask for")
    max_guidance: float = Field(ge=1)
    max_reference_images: int = Field(ge=0)
    max_image_bytes: int = Field(ge=1, description="one decoded reference image")
    max_image_side: int = Field(ge=1, description="reference image width/height in pixels")
    body_timeout_s: float = Field(default=10.0, gt=0, description="seconds a client has to send a whole "
                                  "request body (a slow or stalled upload gets 408 and frees its slot)")
    max_connections: int = Field(default=1024, ge=1, description="requests the ingress holds at once: uploads "
                                 "being read, health checks and stories; stories alone are held to what the "
                                 "LM deployments draw at once (beyond it: 503 with Retry-After)")
    max_queued_requests: int = Field(default=256, ge=1, description="requests the Serve proxy queues when the "
                                     "ingress holds max_connections; beyond them it answers 503")


class ServeConfig(Section):
    host: str = Field(description="bind address; 127.0.0.1 unless you mean to expose it")
    port: int = Field(ge=1, le=65535)
    api_key: str | None = Field(default=None, description="required X-API-Key; null: $STORYGPT_API_KEY, else open")
    limits: ServeLimits
    llm: ReplicaConfig
    char_ldm: CharLDMReplicaConfig
