"""`rise serve`'s app (Ray Serve LLM, rise_ray.serve.deploy.make_app) serving SmolLM2-135M-Instruct
on 127.0.0.1, on 2 Ray CPUs: the OpenAI client's chat completions, completions and model list
against vLLM's own serving code, and a solve on the real model. Needs the converted model (`rise model get smollm2-135m-instruct`); on 2 busy CPUs
the app took 3.5 min to become ready (docs/serve_llm.md)."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

pytestmark = [pytest.mark.slow]

READY_S = 600  # deadline for the app to become ready
CALL_S = 120  # per request


def smollm2_dir() -> str:
    from rise_ray.models.source import cache_dir

    return os.path.join(cache_dir(), "smollm2-135m-instruct")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    model = smollm2_dir()
    if not os.path.isfile(os.path.join(model, "config.json")):
        pytest.skip(f"{model}: no SmolLM2 HF directory (run `rise model get smollm2-135m-instruct`)")
    pytest.importorskip("vllm", reason="vLLM is not installed")
    import ray
    from ray import serve

    from rise_ray.config import load_config
    from rise_ray.serve.deploy import make_app

    if ray.is_initialized():
        ray.shutdown()
    # address="local": a Ray of our own even when another runs on this machine; 2 CPUs as on the
    # smallest machines, where the CPU levers are needed for the app to start at all.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    cfg = load_config(overrides=["model.max_model_len=1024", "rollout.kv_cache_memory_bytes=536870912",
                                 "env.name=arithmetic", "serve.token_env=RISE_SERVE_LLM_UNSET_TOKEN"])
    try:
        app = make_app({"smollm2": model}, cfg)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # serve.run waits for the app without a deadline: run it in a thread and give up after READY_S.
        errors: list[BaseException] = []

        def deploy() -> None:
            try:
                serve.run(app, name="llm", route_prefix="/", blocking=False)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t = threading.Thread(target=deploy, daemon=True)
        t.start()
        t.join(READY_S)
        assert not errors, f"deploy failed: {errors[0]!r}"
        assert not t.is_alive(), f"Serve LLM app not ready after {READY_S} s: {serve.status()}"
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=f"{served}/v1", api_key="unused", timeout=CALL_S, max_retries=0)


MESSAGES = [{"role": "user", "content": "What is 7 times 8?"}]


@pytest.mark.timeout(READY_S + 300)
def test_models_lists_the_model(client):
    assert [m.id for m in client.models.list().data] == ["smollm2"]


@pytest.mark.timeout(READY_S + 300)
def test_chat_completion(client):
    t = time.monotonic()
    # n > 1 needs sampling: vLLM answers 400 to n=2 at temperature 0 ("n must be 1 when using greedy
    # sampling")
    r = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=16, temperature=0.8, n=2, seed=0
    )
    assert time.monotonic() - t < CALL_S
    assert len(r.choices) == 2 and all(c.message.content for c in r.choices)
    assert r.usage.completion_tokens <= 32 and r.usage.prompt_tokens > 0


@pytest.mark.timeout(READY_S + 300)
def test_chat_streams_with_usage_and_logprobs(client):
    parts, usage = [], None
    for chunk in client.chat.completions.create(
        model="smollm2",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert parts and usage is not None and usage.completion_tokens == 8
    r = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


@pytest.mark.timeout(READY_S + 300)
def test_completions_echo_logprobs(client):
    r = client.completions.create(
        model="smollm2", prompt="2 + 2 =", max_tokens=4, temperature=0, echo=True, logprobs=1
    )
    choice = r.choices[0]
    assert choice.text.startswith("2 + 2 =")
    assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.tokens) > 4


@pytest.mark.timeout(READY_S + 300)
def test_unknown_model_is_an_openai_error(client):
    import openai

    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)
    assert 400 <= e.value.status_code < 500


@pytest.mark.timeout(READY_S + 300)
def test_solve_on_the_real_model(served):
    import httpx

    r = httpx.post(served + "/v1/rise/solve", timeout=CALL_S * 3,
                   json={"problem": "What is 7*8?", "turns": 2, "answer": "56", "seed": 0, "max_tokens": 64})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "smollm2" and out["turns_used"] == 2
    assert [a["correct"] for a in out["attempts"]] == [a["answer"] == "56" for a in out["attempts"]]
