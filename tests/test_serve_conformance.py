"""OpenAI-API conformance: the same OpenAI Python client calls against `rise serve` and against vLLM's
own OpenAI server (`python -m vllm.entrypoints.openai.api_server`, through bench/vllm_server.py),
side by side, on the same checkpoint with the same engine settings.

Steps:
  1. train the tiny "\\boxed{x}" model (tests/test_serve.py); start vLLM's server on it and
     `rise serve` (serve_command) on it, both on 127.0.0.1, no token;
  2. make each call of CALLS against both: the call vLLM's server accepts, ours accepts, and the
     two responses have the same shape (every key path and the type of each value, recursively;
     values may differ: sampling); a call vLLM refuses, ours refuses with the same status; a call
     that fails otherwise (an assertion inside it, a dropped connection) fails the row, even when
     both servers fail it the same way;
  3. print the table (call | vLLM | rise).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_serve import QUESTION, free_port, train_boxed_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-rise"
KV_BYTES = 268435456
MESSAGES = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed")
    import ray
    from ray import serve

    from rise_ray.config import load_config
    from rise_ray.serve.deploy import serve_command

    sys.path.insert(0, str(ROOT / "bench"))
    from serve import start_vllm_server  # bench/serve.py: vLLM's server with the same engine settings

    tmp = tmp_path_factory.mktemp("conformance")
    model = train_boxed_model(str(tmp / "boxed"))
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    proc = None
    try:
        cfg = load_config(overrides=["serve.token_env=RISE_CONFORMANCE_UNSET_TOKEN", "serve.num_cpus_per_replica=0.5",
                                     "model.max_model_len=512", f"rollout.kv_cache_memory_bytes={KV_BYTES}"])
        rise = serve_command({MODEL: model}, cfg, "127.0.0.1", free_port(), blocking=False)
        proc, vllm = start_vllm_server(model, MODEL, 512, KV_BYTES, str(tmp / "vllm.log"))
        yield {"vllm": vllm, "rise": rise}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
        serve.shutdown()
        ray.shutdown()


def shape(x: Any) -> Any:
    """Every key path of a JSON value and its values' types, without the values (a list: the union
    of its items' shapes)."""
    if isinstance(x, dict):
        return {k: shape(v) for k, v in sorted(x.items())}
    if isinstance(x, list):
        merged: dict[str, Any] = {}
        for item in x:
            s = shape(item)
            merged[json.dumps(s, sort_keys=True)] = s
        return sorted(merged, key=str)
    return type(x).__name__  # str, int, float, bool, NoneType: a value changing type is a difference


def _openai(base: str):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(**kw: Any) -> Callable[[str], Any]:
    return lambda base: _openai(base).chat.completions.create(model=MODEL, messages=kw.pop("messages", MESSAGES), **kw).model_dump()


def _stream(base: str) -> Any:
    chunks = _openai(base).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, stream=True,
                                                   stream_options={"include_usage": True})
    return [c.model_dump() for c in chunks]


def _seeded(base: str) -> Any:
    a, b = (_openai(base).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, seed=3, temperature=1.0)
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content  # the same seed, the same sample
    return a.model_dump()


def _http(method: str, path: str, body: dict | None = None) -> Callable[[str], Any]:
    def call(base: str) -> Any:
        r = httpx.request(method, base + path, json=body, timeout=120)
        r.raise_for_status()
        return r.json() if "json" in r.headers.get("content-type", "") else r.text
    return call


JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}}}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}}}}]
CALLS: dict[str, Callable[[str], Any]] = {
    "chat": _chat(max_tokens=8),
    "chat n=2": _chat(max_tokens=4, n=2, temperature=0.8),
    "chat stop": _chat(max_tokens=8, stop=["}"]),
    "chat logprobs top_logprobs=5": _chat(max_tokens=4, logprobs=True, top_logprobs=5),
    "chat max_completion_tokens": _chat(max_completion_tokens=4),
    "chat seed repeatable": _seeded,
    "chat stream include_usage": _stream,
    "chat system + named user": _chat(max_tokens=4, messages=[{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": QUESTION, "name": "ann"}]),
    "chat content parts": _chat(max_tokens=4, messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]),
    "chat presence/frequency penalty": _chat(max_tokens=4, presence_penalty=1.5, frequency_penalty=0.5),
    "chat logit_bias": _chat(max_tokens=4, logit_bias={"5": 50}),
    "chat response_format json_schema": _chat(max_tokens=12, response_format=JSON_SCHEMA),
    "chat tools tool_choice=auto": _chat(max_tokens=4, tools=TOOLS, tool_choice="auto"),
    "chat temperature=0 n=2": _chat(max_tokens=4, n=2, temperature=0),
    "completions": lambda base: _openai(base).completions.create(model=MODEL, prompt=QUESTION, max_tokens=4).model_dump(),
    "completions echo logprobs": lambda base: _openai(base).completions.create(
        model=MODEL, prompt=QUESTION, max_tokens=3, echo=True, logprobs=2).model_dump(),
    "models list": lambda base: _openai(base).models.list().model_dump(),
    "POST /tokenize": _http("POST", "/tokenize", {"model": MODEL, "prompt": QUESTION}),
    "POST /detokenize": _http("POST", "/detokenize", {"model": MODEL, "tokens": [5, 6, 7]}),
    "GET /health": _http("GET", "/health"),
    "GET /metrics": _http("GET", "/metrics"),
}
# Keys only one side has, by construction: the model card (Ray Serve LLM's ModelCard has no
# `created`/`root`/`max_model_len` but `metadata`), and the bodies of /health and /metrics.
SHAPE_EXEMPT = {"models list", "GET /health", "GET /metrics"}


def outcome(call: Callable[[str], Any], base: str) -> tuple[str, Any]:
    """("ok", the response), (the HTTP status, None) for a refusal, or ("error: ...", None) for any
    other failure (an assertion inside the call, a connection error): never a match."""
    from openai import APIStatusError

    try:
        return "ok", call(base)
    except httpx.HTTPStatusError as e:
        return str(e.response.status_code), None
    except APIStatusError as e:
        return str(e.status_code), None
    except Exception as e:  # noqa: BLE001 - reported as the row's failure
        return f"error: {type(e).__name__}: {e}", None


def compare(name: str, vllm: tuple[str, Any], rise: tuple[str, Any]) -> str | None:
    """Why the row fails, or None: the same outcome, and for a success the same shape."""
    (v, v_body), (r, r_body) = vllm, rise
    if v.startswith("error") or r.startswith("error"):
        return f"{name}: the call failed (vLLM {v}; rise {r})"
    if v != r:
        return f"{name}: vLLM {v}, rise {r}"
    if v == "ok" and name not in SHAPE_EXEMPT and shape(v_body) != shape(r_body):
        return f"{name}: shapes differ:\n  vLLM {shape(v_body)}\n  rise {shape(r_body)}"
    return None


def test_shape_sees_a_value_change_type():
    assert shape({"a": [{"b": 1}, {"b": 2}], "c": "x"}) == shape({"a": [{"b": 3}], "c": "y"})
    assert shape({"a": 1}) != shape({"a": "1"})
    assert shape({"a": 1}) != shape({"a": 1.0})
    assert shape({"a": [{"b": None}]}) != shape({"a": [{"b": "x"}]})


def test_a_call_failing_alike_on_both_servers_is_a_failure():
    same = ("error: AssertionError: ", None)
    assert compare("chat seed repeatable", same, same) is not None
    assert compare("chat", ("400", None), ("400", None)) is None
    assert compare("chat", ("ok", {"a": 1}), ("ok", {"a": None})) is not None


@pytest.mark.slow
def test_every_call_vllms_server_accepts_ours_accepts_with_the_same_shape(servers):
    rows, failures = [], []
    for name, call in CALLS.items():
        v, r = outcome(call, servers["vllm"]), outcome(call, servers["rise"])
        rows.append(f"| {name} | {v[0]} | {r[0]} |")
        if (why := compare(name, v, r)) is not None:
            failures.append(why)
    print("\n| call | vLLM's server | rise serve |\n|---|---|---|\n" + "\n".join(rows))
    assert not failures, "\n".join(failures)
    assert sum(row.endswith("| ok | ok |") for row in rows) >= 18


@pytest.mark.slow
def test_the_vllm_server_here_is_vllms_own(servers):
    # bench/vllm_server.py runs vllm.entrypoints.openai.api_server's __main__, nothing of ours.
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "vllm_server.py"), "--help"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and "--served-model-name" in out.stdout
