"""The `serve` section of the run configuration (rise_ray.config.RunConfig): `rise serve`'s
bind address, limits, replicas and auth. Beside config.py, below the serving code that reads it
(rise_ray.serve imports the config, never the other way)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ServeConfig(BaseModel):
    """`rise serve`: the Ray Serve app (rise_ray.serve). Limits bound every request; overload past
    max_ongoing_requests per replica plus max_queued_requests at the proxy gets 503 + Retry-After."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)  # as every section of RunConfig

    host: str = "127.0.0.1"  # bind address: loopback unless told otherwise
    port: int = Field(8000, ge=1, le=65535)
    # Ray Serve's HTTP proxy. haproxy: Ray Serve's HAProxy mode (the binary ray[serve] bundles on
    # Linux, or RAY_SERVE_HAPROXY_BINARY_PATH, or `haproxy` on PATH) in front of the ingress
    # replicas' own HTTP servers: no Python proxy hop per request. ray: Ray Serve's Python proxy
    # actor. auto: haproxy where Ray finds a binary, else ray (docs/serve_llm.md).
    proxy: Literal["auto", "haproxy", "ray"] = "auto"
    app_name: str = "rise"
    model_name: str | None = None  # the id /v1/models reports for one model (None: the directory's name)
    # A run directory: serve its latest model (id: serve.model_name or iter_<k>), or every
    # iteration's model side by side (iter_0 = the base model ... iter_k), one engine each.
    iterations: Literal["latest", "all"] = "latest"
    env: str | None = None  # default env of /v1/rise/solve (None: env.name)
    token_env: str = "RISE_SERVE_TOKEN"  # environment variable with the bearer token; unset: no auth
    max_n: int = Field(8, ge=1)  # chat's n: vLLM's own check (VLLM_MAX_N_SEQUENCES) at this limit
    max_tokens_limit: int = Field(1024, ge=1)  # per solve attempt (chat: vLLM checks the context)
    max_turns: int = Field(10, ge=1)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    max_ongoing_requests: int = Field(32, ge=1)  # per replica
    max_queued_requests: int = Field(128, ge=-1)  # per proxy (HAProxy: per ingress replica); -1: no 503
    retry_after_s: float = Field(1.0, ge=0)
    num_cpus_per_replica: float = Field(1.0, gt=0)
    num_gpus_per_replica: float = Field(0.0, ge=0)
    require_token: bool = False  # true: a replica with no token to check refuses to start
    max_body_bytes: int = Field(1 << 20, ge=1024)  # larger request bodies: 413 before parsing
    max_answer_chars: int = Field(1000, ge=1)  # the gold `answer` of /v1/rise/solve
    grade_timeout_s: float = Field(5.0, gt=0)  # grading time per solve request, then 422
    grade_workers: int = Field(2, ge=1)  # grading processes per replica (killed when over time)
    health_check_period_s: float = Field(10.0, gt=0)

    def autoscaling_config(self) -> dict[str, Any]:  # Ray Serve's, for these replica settings
        return {"min_replicas": self.min_replicas, "initial_replicas": max(self.min_replicas, 1), "max_replicas": self.max_replicas, "target_ongoing_requests": self.target_ongoing_requests}

    @model_validator(mode="after")
    def _replica_range(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"serve.min_replicas ({self.min_replicas}) > serve.max_replicas ({self.max_replicas})")
        if self.max_queued_requests == 0:
            raise ValueError("serve.max_queued_requests must be -1 (no limit) or >= 1")
        return self
