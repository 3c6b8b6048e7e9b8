"""Building and running the Serve app: `make_app`, the `serve deploy` builder and `rise serve`."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from rise_ray.compat import serve_haproxy_binary
from rise_ray.config import DEFAULT_CONFIG, RunConfig, load_config
from rise_ray.serve.auth import read_token, token_digest

ROUTES = ("GET /healthz", "GET /v1/models", "POST /v1/chat/completions", "POST /v1/completions",
          "POST /tokenize", "POST /v1/rise/solve")


def served_models(models: Mapping[str, str], cfg: RunConfig) -> dict[str, str]:
    """The models `rise serve` deploys, of a run's (oldest first): the latest, or all of them with
    serve.iterations=all. One model is named serve.model_name when set."""
    chosen = dict(models) if cfg.serve.iterations == "all" else dict([list(models.items())[-1]])
    if len(chosen) == 1 and cfg.serve.model_name:
        chosen = {cfg.serve.model_name: next(iter(chosen.values()))}
    return chosen


def make_app(models: Mapping[str, str], cfg: RunConfig, token: str | None = None,
             cluster_resources: Mapping[str, float] | None = None) -> serve.Application:
    """The Serve application: one Ray Serve LLM engine deployment (LLMServer) per model id in
    `models` ({id: HF directory}), behind RiseIngress (the OpenAI routes, /v1/rise/solve for the
    last model unless a request names one, /healthz).

    `cluster_resources`: the cluster the replicas go to (None: `ray.cluster_resources()` of the
    Ray this process is connected to); with the config it decides GPU or CPU replicas
    (rise_ray.serve.llm_config.serve_devices), whatever hardware this process has.

    `token`: the bearer token; only its SHA-256 reaches the cluster. None: each replica reads the
    environment variable named by `cfg.serve.token_env`; neither set: no auth, unless
    serve.require_token, when such a replica refuses to start.
    """
    import ray
    from ray.serve.llm import build_llm_deployment

    from rise_ray.compat import serve_model_card
    from rise_ray.envs import REGISTRY
    from rise_ray.serve.app import RiseIngress, ingress_class
    from rise_ray.serve.llm_config import llm_config, runtime_env, serve_devices

    s = cfg.serve
    if token is not None and not token.strip():
        raise ValueError("token: blank")
    if (s.env or cfg.env.name) not in REGISTRY:
        raise ValueError(f"serve.env: unknown env {s.env or cfg.env.name!r}; known: {sorted(REGISTRY)}")
    if not models:
        raise ValueError("models: nothing to serve")
    dirs = {m: os.path.abspath(d) if os.path.exists(d) else d for m, d in models.items()}
    devices = serve_devices(cfg, ray.cluster_resources() if cluster_resources is None else cluster_resources)
    configs = {m: llm_config(d, m, cfg, devices) for m, d in dirs.items()}
    digest = token_digest(token) if token else None
    options = RiseIngress.get_deployment_options(list(configs.values()))
    options.update(
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": s.retry_after_s},
        # With CPU replicas the ingress takes no CPU the engines need (docs/serve_llm.md)
        ray_actor_options={"num_cpus": 0 if devices.cpu else 1, "runtime_env": runtime_env()},
        health_check_period_s=s.health_check_period_s,
    )
    return serve.deployment(ingress_class(cfg, digest), **options).bind(
        llm_deployments={m: build_llm_deployment(c) for m, c in configs.items()},
        model_cards={m: serve_model_card(m, c) for m, c in configs.items()},
        config=cfg.model_dump(mode="json"),
        model_dirs=dirs,
        default_model=list(dirs)[-1],
        token_sha256=digest,
    )


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
    name = cfg.serve.model_name or os.path.basename(os.path.normpath(a.checkpoint))
    return make_app({name: a.checkpoint}, cfg, read_token(cfg))


def proxy_env(proxy: str) -> dict[str, str]:
    """The Serve controller's environment for serve.proxy (its proxies and replicas inherit it):
    Ray Serve's HAProxy mode, or nothing for Ray's Python proxy. auto takes HAProxy where Ray finds
    a binary; haproxy without one is an error naming the setting."""
    if proxy == "ray":
        return {}
    try:
        serve_haproxy_binary()
    except FileNotFoundError as e:
        if proxy == "haproxy":
            raise ValueError(f"serve.proxy=haproxy: {e}") from None
        return {}
    # HAProxy's own request metrics would label every request route="/" (it knows the path prefix,
    # not FastAPI's routes) and parse a log datagram per request in a Python actor; off, the ingress
    # replica counts them per route, as Ray's proxy does (`_should_emit_request_ingress_metrics`).
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0"}


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_proxy_env(proxy: str, host: str, single_node: bool) -> dict[str, str]:
    """proxy_env, where HAProxy can reach every ingress replica. In HAProxy mode each ingress replica
    serves HTTP itself, bound to the host Serve was started with (serve.host), and each node's
    HAProxy connects to a replica on another node at that node's IP: with a loopback host only the
    replicas on its own node answer, the others are marked down. So a loopback host takes HAProxy
    only on a cluster of one node (`single_node`); on a larger one auto takes Ray's proxy and
    haproxy is an error naming both settings."""
    env = proxy_env(proxy)
    if env and host in LOOPBACK and not single_node:
        if proxy == "haproxy":
            raise ValueError(f"serve.proxy=haproxy with serve.host={host}: on a cluster of more than one node "
                             "HAProxy cannot reach the ingress replicas of other nodes, which bind the "
                             "loopback address; set serve.host=0.0.0.0 (with a token) or serve.proxy=ray")
        return {}
    return env


def single_node_cluster() -> bool:
    """Whether the connected Ray is one node that stays one: a Ray started here (not one joined at
    RAY_ADDRESS, where an autoscaler may add nodes) with one node alive."""
    import ray

    return not os.environ.get("RAY_ADDRESS") and sum(n["Alive"] for n in ray.nodes()) == 1


def check_checkpoint(checkpoint: str) -> None:
    """A local checkpoint must be an HF model directory; an `org/name` hub id is passed through."""
    if os.path.isdir(checkpoint):
        if not os.path.exists(os.path.join(checkpoint, "config.json")):
            raise FileNotFoundError(f"{checkpoint}: not a model directory (no config.json)")
    elif os.path.exists(checkpoint) or checkpoint.startswith(("/", ".", "~")) or checkpoint.count("/") != 1:
        raise FileNotFoundError(f"{checkpoint}: no such model directory")


def serve_command(
    models: Mapping[str, str], cfg: RunConfig, host: str | None = None, port: int | None = None,
    blocking: bool = True
) -> str:
    """`rise serve`: join Ray (RAY_ADDRESS, else a local Ray with its dashboard), start Serve on
    host:port (default cfg.serve.host/port: 127.0.0.1:8000) and the app at "/" once every model's
    engine is up. Blocking: until Ctrl-C or SIGTERM (`ray job stop`), then the app is deleted.
    Returns the base URL."""
    from rise_ray.ray_init import init_ray

    for checkpoint in models.values():
        check_checkpoint(checkpoint)
    s = cfg.serve
    host = s.host if host is None else host
    port = s.port if port is None else port
    proxy_env(s.proxy)  # no HAProxy binary for serve.proxy=haproxy: an error before Ray starts
    dashboard = init_ray()
    env = serve_proxy_env(s.proxy, host, single_node_cluster())
    token = read_token(cfg)
    url = f"http://{host}:{port}"

    def deploy() -> None:
        # The controller's env_vars apply only when this starts Serve (Ray warns when one runs).
        serve.start(http_options={"host": host, "port": port}, controller_options={"runtime_env": {"env_vars": env}})
        serve.run(make_app(models, cfg, token), name=s.app_name, route_prefix="/", blocking=False)

    if not blocking:
        deploy()
        return url

    def on_term(signum: int, frame: Any) -> None:  # stop on SIGTERM the way Ctrl-C stops
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)  # after ray.init, which installs its own
    deployed = False
    try:
        deployed = True
        deploy()
        print(f"rise serve: {url}\n  models: " + ", ".join(f"{m} ({d})" for m, d in models.items()))
        print(f"  proxy: {'HAProxy' if env else 'Ray Serve proxy'} (serve.proxy={s.proxy})")
        print(f"  routes: {', '.join(ROUTES)}")
        print(f"  auth: {'bearer token from $' + s.token_env if token else 'none (set $' + s.token_env + ' to require one)'}")
        if token is None and host not in LOOPBACK:
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
