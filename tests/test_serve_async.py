"""`rise serve` on vLLM's async engine (continuous batching), over HTTP on 127.0.0.1.

The model is the untrained tiny Llama. Sampling from it (temperature 1) picks its end token about
once in 200 tokens; the fixture picks a seed whose sample runs to max_tokens, so with that seed
"a long generation" is one with a large max_tokens. Serve admits 2 requests
at a time (serve.max_ongoing_requests=2), so a slot that is not freed shows as a request that waits.
No assertion is on time: each says what happened before what.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
from test_serve import HAS_VLLM, free_port

from rise_ray.config import load_config

pytestmark = [
    pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed"),
    pytest.mark.slow,  # a Ray Serve app on a vLLM engine, started for the module: CI runs it
]

MODEL = "tiny-async"
OVERRIDES = [
    "serve.engine=vllm",
    f"serve.model_name={MODEL}",
    "serve.num_cpus_per_replica=0.5",
    "serve.max_ongoing_requests=2",
    "serve.max_queued_requests=16",
    "serve.max_tokens_limit=1000",
    "model.max_model_len=1024",
    "rollout.kv_cache_memory_bytes=67108864",
    "eval.max_tokens=8",
]
LONG = 600  # tokens: a generation that runs for many engine steps
SEED: list[int] = []  # the fixture's seed whose sample has no end token in LONG tokens


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    import ray
    from ray import serve

    from rise_ray.demo.tiny import build_tiny_model
    from rise_ray.serve.deploy import serve_command

    model = build_tiny_model(str(tmp_path_factory.mktemp("async") / "tiny"), hidden_size=64, num_layers=2,
                             num_heads=1, intermediate_size=192)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    try:
        url = serve_command(model, load_config(overrides=OVERRIDES), "127.0.0.1", free_port(), blocking=False)
        SEED.append(_long_seed(url))
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def body(max_tokens: int = 16, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Count: 1 2 3"}], "max_tokens": max_tokens,
            "temperature": 1.0, "seed": SEED[0] if SEED else 0, **kw}


def _long_seed(url: str) -> int:
    """A seed whose reply runs to LONG tokens (sampled by 16 concurrent requests)."""
    import asyncio

    async def reasons() -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=body(LONG, seed=s)) for s in range(16)))
        return [r.json()["choices"][0]["finish_reason"] for r in rs]

    found = [s for s, r in enumerate(asyncio.run(reasons())) if r == "length"]
    assert found, "no seed in 0-15 samples LONG tokens without the end token"
    return found[0]


def events(lines) -> iter:
    """The JSON chunks of an SSE stream, up to [DONE]."""
    for line in lines:
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return
        yield json.loads(line[len("data: "):])


def content(chunk: dict) -> str:
    return "".join(c["delta"].get("content") or "" for c in chunk["choices"])


def running(client: httpx.Client) -> int:
    r = client.get("/healthz")
    assert r.status_code == 200, r.text
    return r.json()["running"]


def test_chunks_stream_while_decoding_and_healthz_answers_meanwhile(url):
    with httpx.Client(base_url=url, timeout=300) as client, \
            client.stream("POST", "/v1/chat/completions", json=body(LONG, stream=True)) as r:
            assert r.status_code == 200
            chunks = events(r.iter_lines())
            while not content(next(chunks)):  # the role chunk, then the first piece of the reply
                pass
            # Generation is still going: the replica answers /healthz and counts it as running.
            assert running(client) == 1
            later = [content(c) for c in chunks if content(c)]
    assert len(later) > 10  # the reply came in pieces as it was decoded, not as one chunk at the end


def test_stop_sequences_end_the_reply_before_them(url):
    with httpx.Client(base_url=url, timeout=120) as client:
        full = client.post("/v1/chat/completions", json=body(40)).json()["choices"][0]["message"]["content"]
        stop = full[12:15]
        assert stop.strip(), full
        r = client.post("/v1/chat/completions", json=body(40, stop=[stop, "never-said"]))
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
    assert choice["message"]["content"] == full[: full.index(stop)]
    assert choice["finish_reason"] == "stop"


def test_a_cancelled_request_frees_its_slot(url):
    with httpx.Client(base_url=url, timeout=300) as a, httpx.Client(base_url=url, timeout=300) as client, \
            a.stream("POST", "/v1/chat/completions", json=body(LONG, stream=True)) as ra:
            first_a = events(ra.iter_lines())
            while not content(next(first_a)):
                pass
            with client.stream("POST", "/v1/chat/completions", json=body(LONG, stream=True)) as rb:
                chunks = events(rb.iter_lines())
                while not content(next(chunks)):
                    pass
                # Both slots are taken (serve.max_ongoing_requests=2); B's client now goes away.
            while running(client) != 1:  # B is aborted in the engine; A still decodes
                pass
            # A new request gets B's slot and is served while A is still generating.
            r = client.post("/v1/chat/completions", json=body(4))
            assert r.status_code == 200, r.text
            assert running(client) == 1
            assert sum(1 for c in first_a if content(c)) > 10  # A went on, uncut


def test_unsupported_parameters_are_400_naming_them(url):
    with httpx.Client(base_url=url, timeout=60) as client:
        for extra, param in (({"presence_penalty": 0.5}, "presence_penalty"), ({"tools": []}, "tools"),
                             ({"top_logprobs": 2}, "top_logprobs"), ({"stop": ["a"] * 5}, "stop")):
            r = client.post("/v1/chat/completions", json=body(4, **extra))
            assert r.status_code == 400, (extra, r.text)
            assert r.json()["error"]["param"] == param
        assert client.post("/v1/chat/completions", json=body(4, user="me", presence_penalty=None)).status_code == 200


def test_logprobs_top_logprobs_and_seed_are_honoured(url):
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/chat/completions", json=body(12, temperature=0, logprobs=True, top_logprobs=3))
        assert r.status_code == 200, r.text
        out = r.json()
        steps = out["choices"][0]["logprobs"]["content"]
        assert len(steps) == out["usage"]["completion_tokens"] == 12
        for s in steps:  # greedy: the sampled token is the most likely one
            assert len(s["top_logprobs"]) == 3
            assert s["logprob"] == pytest.approx(s["top_logprobs"][0]["logprob"], abs=1e-4)

        def sampled(seed: int) -> str:
            r = client.post("/v1/chat/completions", json=body(24, temperature=1.0, seed=seed))
            return r.json()["choices"][0]["message"]["content"]

        assert sampled(7) == sampled(7)
        assert sampled(7) != sampled(8)


def test_solve_runs_its_turns_on_the_async_engine(url):
    with httpx.Client(base_url=url, timeout=120) as client:
        r = client.post("/v1/rise/solve", json={"problem": "Find 47: a12 b19 c23 d31 e47 f55", "turns": 3,
                                                  "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        out = r.json()
    assert out["turns_used"] == 3 and len(out["attempts"]) == 3
