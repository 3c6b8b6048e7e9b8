"""Building and running the Serve app: `make_app`, the `serve deploy` builder and `rise serve`."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from rise_ray.config import DEFAULT_CONFIG, RunConfig, load_config
from rise_ray.serve.auth import read_token, token_digest

ROUTES = ("GET /healthz", "GET /v1/models", "POST /v1/chat/completions", "POST /v1/rise/solve")


def make_app(checkpoint: str, cfg: RunConfig, token: str | None = None) -> serve.Application:
    """The Serve application for `checkpoint`, with deployment options from `cfg.serve`.

    `token`: the bearer token; only its SHA-256 reaches the cluster. None: each replica reads the
    environment variable named by `cfg.serve.token_env`; neither set: no auth, unless
    serve.require_token, when such a replica refuses to start.
    """
    from rise_ray.envs import REGISTRY
    from rise_ray.serve.app import RiseServer

    s = cfg.serve
    if token is not None and not token.strip():
        raise ValueError("token: blank")
    if (s.env or cfg.env.name) not in REGISTRY:
        raise ValueError(f"serve.env: unknown env {s.env or cfg.env.name!r}; known: {sorted(REGISTRY)}")
    if os.path.exists(checkpoint):
        checkpoint = os.path.abspath(checkpoint)
    options: dict[str, Any] = {
        "autoscaling_config": s.autoscaling_config(),
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": s.retry_after_s},
        "ray_actor_options": {"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica},
        "health_check_timeout_s": 60,
        "health_check_period_s": s.health_check_period_s,
    }
    digest = token_digest(token) if token else None
    return RiseServer.options(**options).bind(checkpoint, cfg.model_dump(mode="json"), digest)


class AppArgs(BaseModel):
    """`args` of a Serve config file (configs/serve/deploy.yaml) or `serve run ... checkpoint=...`."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    config: str | None = None  # a run config YAML (None: the embedded default, as `rise` uses)
    # key=value, e.g. ["serve.max_n=4"]; a string (from `serve run ... overrides="a=1 b=2"`) is split
    overrides: list[str] | str = Field(default_factory=list)


def build_app(args: Mapping[str, Any] | AppArgs) -> serve.Application:
    """The import-path builder for `serve deploy` / `serve run`: rise_ray.serve.deploy:build_app."""
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(dict(args))
    overrides = a.overrides.split() if isinstance(a.overrides, str) else a.overrides
    cfg = load_config(a.config or DEFAULT_CONFIG, overrides)
    # A token where the app is built is baked in (as its digest): replicas need not read one.
    return make_app(a.checkpoint, cfg, read_token(cfg))


def check_checkpoint(checkpoint: str) -> None:
    """A local checkpoint must be an HF model directory; an `org/name` hub id is passed through."""
    if os.path.isdir(checkpoint):
        if not os.path.exists(os.path.join(checkpoint, "config.json")):
            raise FileNotFoundError(f"{checkpoint}: not a model directory (no config.json)")
    elif os.path.exists(checkpoint) or checkpoint.startswith(("/", ".", "~")) or checkpoint.count("/") != 1:
        raise FileNotFoundError(f"{checkpoint}: no such model directory")


def serve_command(
    checkpoint: str, cfg: RunConfig, host: str | None = None, port: int | None = None, blocking: bool = True
) -> str:
    """`rise serve`: join Ray (RAY_ADDRESS, else a local Ray with its dashboard), start Serve on
    host:port (default cfg.serve.host/port: 127.0.0.1:8000) and the app at "/". Blocking: until
    Ctrl-C or SIGTERM (`ray job stop`), then the app is deleted. Returns the base URL."""
    from rise_ray.session import init_ray

    check_checkpoint(checkpoint)
    s = cfg.serve
    host = s.host if host is None else host
    port = s.port if port is None else port
    dashboard = init_ray()
    token = read_token(cfg)
    url = f"http://{host}:{port}"
    if not blocking:
        serve.start(http_options={"host": host, "port": port})
        serve.run(make_app(checkpoint, cfg, token), name=s.app_name, route_prefix="/", blocking=False)
        return url

    def on_term(signum: int, frame: Any) -> None:  # stop on SIGTERM the way Ctrl-C stops
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)  # after ray.init, which installs its own
    deployed = False
    try:
        serve.start(http_options={"host": host, "port": port})
        deployed = True
        serve.run(make_app(checkpoint, cfg, token), name=s.app_name, route_prefix="/", blocking=False)
        print(f"rise serve: {checkpoint} at {url}\n  routes: {', '.join(ROUTES)}")
        print(f"  auth: {'bearer token from $' + s.token_env if token else 'none (set $' + s.token_env + ' to require one)'}")
        if token is None and host not in ("127.0.0.1", "localhost", "::1"):
            print(f"  warning: listening on {host} without a token: anyone who reaches it can use the model")
        if dashboard:
            print(f"  Ray dashboard (Serve tab, metrics): http://{dashboard}")
        print("  Ctrl-C to stop", flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("rise serve: stopping", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if deployed:
            serve.delete(s.app_name)
    return url
