"""The Ray Serve app (rise_ray.serve: Ray Serve LLM's OpenAI API + /v1/rise/solve), over HTTP on
127.0.0.1.

One Ray + Serve per module, started with `serve_command(..., blocking=False)` (what `rise serve`
runs). The checkpoint is the tiny Llama trained here for a few seconds to answer any prompt with
"\\boxed{x}", x drawn from a-f: its answers are readable and vary from turn to turn, so the solve
tests can check the majority vote and the oracle's stop for real. It is served twice, as two models
side by side ("iter_0" and "tiny-rise", each its own vLLM engine, CPU build), as `rise serve RUN_DIR
serve.iterations=all` serves a run's models. Every test that needs the app is marked slow (a
checkpoint trained, Ray and Serve started): CI runs them.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest

from rise_ray.config import load_config
from rise_ray.serve.results import majority_answer

TOKEN = "test-token-4f1c"
TOKEN_ENV = "RISE_SERVE_TEST_TOKEN"
LETTERS = "abcdef"
QUESTION = "Find 47: a12 b19 c23 d31 e47 f55"
MODELS = ("iter_0", "tiny-rise")  # the same checkpoint twice; solve's default is the last
OVERRIDES = [
    f"serve.token_env={TOKEN_ENV}",
    "serve.num_cpus_per_replica=0.5",
    "serve.max_ongoing_requests=4",  # with max_queued_requests: > 12 at once and the rest get 503
    "serve.max_queued_requests=8",
    "serve.retry_after_s=2",
    "serve.max_n=4",
    "serve.max_tokens_limit=64",
    "serve.max_turns=6",
    "model.max_model_len=512",
    "rollout.kv_cache_memory_bytes=268435456",  # 256 MiB per engine
    "eval.max_tokens=16",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_boxed_model(out_dir: str, steps: int = 80, seed: int = 0) -> str:
    """The tiny Llama, trained to reply "\\boxed{x}" (x uniform over a-f) to search questions with
    0-2 earlier attempts: a real checkpoint whose answers the env can read."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rise_ray.demo.tiny import build_tiny_model
    from rise_ray.envs import get_env
    from rise_ray.rollout.episodes import build_conversation

    build_tiny_model(out_dir, hidden_size=64, num_layers=2, num_heads=1, intermediate_size=192, seed=seed)
    tok = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    env = get_env("search", num_train=64, num_test=0)
    rng = random.Random(seed)
    torch.manual_seed(seed)

    def example() -> tuple[list[int], list[int]]:
        attempts = [f"\\boxed{{{rng.choice(LETTERS)}}}" for _ in range(rng.randrange(3))]
        conv = build_conversation(env, rng.choice(env.train), attempts, None)
        prompt = list(tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=False))
        reply = tok(f"\\boxed{{{rng.choice(LETTERS)}}}", add_special_tokens=False)["input_ids"]
        return prompt, [*reply, tok.eos_token_id]

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            batch = [example() for _ in range(16)]
            width = max(len(p) + len(r) for p, r in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (p, r) in enumerate(batch):
                ids[i, : len(p) + len(r)] = torch.tensor(p + r)
                mask[i, : len(p) + len(r)] = 1
                labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@dataclass
class Server:
    url: str
    metrics_url: str
    model: str
    checkpoint: str

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def boxed_model(tmp_path_factory) -> str:
    return train_boxed_model(str(tmp_path_factory.mktemp("serve") / "boxed"))


@pytest.fixture(scope="module")
def server(boxed_model):
    import ray
    from ray import serve

    from rise_ray.serve.deploy import serve_command

    if ray.is_initialized():
        ray.shutdown()
    os.environ[TOKEN_ENV] = TOKEN
    # address="local": a Ray of our own even when another is running on this machine. Ray binds the
    # metrics export port itself (read back below); Serve's HTTP port cannot be read back that way.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    (metrics_port,) = [n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]]
    port = free_port()
    try:
        models = dict.fromkeys(MODELS, boxed_model)
        url = serve_command(models, load_config(overrides=OVERRIDES), "127.0.0.1", port, blocking=False)
        yield Server(url, f"http://127.0.0.1:{metrics_port}/metrics", "tiny-rise", boxed_model)
    finally:
        os.environ.pop(TOKEN_ENV, None)
        serve.shutdown()
        ray.shutdown()


def chat_body(content: str = QUESTION, **kw) -> dict:
    return {"model": "tiny-rise", "messages": [{"role": "user", "content": content}], "max_tokens": 16, **kw}


def solve(client: httpx.Client, **body) -> dict:
    r = client.post("/v1/rise/solve", json={"problem": QUESTION, **body})
    assert r.status_code == 200, r.text
    return r.json()


# -- unit -------------------------------------------------------------------------------------------
def test_majority_answer_ties_go_to_the_latest():
    key = lambda a: None if a is None else a.strip()  # noqa: E731
    assert majority_answer(["a", "b", "b", None, "a"], key) == "a"  # 2-2: the latest of the tied wins
    assert majority_answer(["a", "b", "b", "c"], key) == "b"
    assert majority_answer([" a", "a "], key) == "a "  # equal keys are one answer; the latest text
    assert majority_answer([None, None], key) is None


def test_haproxy_block_in_jobs_serve_md_is_a_serve_config_and_matches_rise_serve():
    """The `controller_options` block jobs/serve.md gives for `serve deploy` is one Ray accepts, and
    sets what `rise serve` sets for serve.proxy=haproxy."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from rise_ray.serve.deploy import proxy_env

    path = os.path.join(os.path.dirname(__file__), "..", "jobs", "serve.md")
    with open(path) as f:
        blocks = re.findall(r"```yaml\n(.*?)```", f.read(), re.S)
    (block,) = [b for b in blocks if "controller_options" in b]
    schema = ServeDeploySchema.model_validate({**yaml.safe_load(block), "applications": []})
    env = schema.controller_options.runtime_env["env_vars"]
    if proxy_env("auto"):
        assert env == proxy_env("haproxy")


def test_serve_proxy_haproxy_without_a_binary_is_an_error_naming_the_setting(tmp_path):
    """serve.proxy=haproxy where Ray finds no HAProxy binary fails before anything starts, naming
    the setting; auto falls back to Ray's proxy (and `rise serve` prints which it took). Ray reads
    RAY_SERVE_HAPROXY_BINARY_PATH at import, hence a fresh process."""
    import subprocess
    import sys

    code = """
from rise_ray.serve.deploy import proxy_env
assert proxy_env("auto") == {} and proxy_env("ray") == {}
proxy_env("haproxy")
"""
    env = {**os.environ, "RAY_SERVE_HAPROXY_BINARY_PATH": str(tmp_path / "no-haproxy")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "ValueError: serve.proxy=haproxy:" in out.stderr and "no-haproxy" in out.stderr, out.stderr[-2000:]


# -- routes -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_health_and_models(server):
    r = httpx.get(server.url + "/healthz", timeout=30)  # no token needed
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    assert r.json()["models"] == dict.fromkeys(MODELS, "ok")  # each model's engine answered its health check
    with server.client() as c:
        models = c.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == list(MODELS)
        assert c.get("/v1/models/iter_0").json()["metadata"]["max_request_context_length"] == 512


def haproxy_sessions() -> dict[str, int]:
    """Sessions HAProxy has sent to each server of Serve's backends ({server name: total}), from its
    stats page (CSV)."""
    import csv

    from ray.serve._private.constants import RAY_SERVE_HAPROXY_STATS_PORT

    text = httpx.get(f"http://127.0.0.1:{RAY_SERVE_HAPROXY_STATS_PORT}/stats;csv", timeout=10).text
    rows = csv.DictReader(text.lstrip("# ").splitlines())
    return {r["svname"]: int(r["stot"] or 0) for r in rows if r["svname"].startswith("SERVE_")}


@pytest.mark.slow
def test_haproxy_sends_requests_straight_to_the_ingress_replica(server):
    """serve.proxy=auto where Ray finds an HAProxy binary (ray[serve] bundles one on Linux): HAProxy
    routes to the ingress replica's own HTTP server. Ray's Python proxy is only HAProxy's backup
    server, and a request that reached it would mean the fast path is not in use."""
    from rise_ray.serve.deploy import proxy_env

    if not proxy_env("auto"):
        pytest.skip("no HAProxy binary here: rise serve uses Ray's proxy")
    before = haproxy_sessions()
    with server.client() as c:
        for _ in range(3):
            assert c.post("/v1/chat/completions", json=chat_body(max_tokens=4)).status_code == 200
    after = haproxy_sessions()
    sent = {name: after[name] - before.get(name, 0) for name in after}
    ingress = {name: n for name, n in sent.items() if "RiseIngress" in name}
    assert sum(ingress.values()) >= 3, sent
    assert all(n == 0 for name, n in sent.items() if "fallback" in name), sent


@pytest.mark.slow
def test_tokenize_and_completions_are_vllms(server, n_tokens):
    with server.client() as c:
        tok = c.post("/tokenize", json={"model": "tiny-rise", "prompt": QUESTION, "add_special_tokens": False})
        assert tok.status_code == 200, tok.text
        assert tok.json()["count"] == len(tok.json()["tokens"]) == n_tokens(QUESTION)
        done = c.post("/v1/completions", json={"model": "iter_0", "prompt": QUESTION, "max_tokens": 3,
                                               "echo": True, "logprobs": 1})
        assert done.status_code == 200, done.text
        choice = done.json()["choices"][0]
        assert choice["text"].startswith(QUESTION) and choice["logprobs"]["tokens"]


@pytest.mark.slow
def test_openai_client_chat_completion(server, n_tokens):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == list(MODELS)
    greedy = client.chat.completions.create(
        model="tiny-rise", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=16
    )
    (choice,) = greedy.choices
    assert re.fullmatch(r"\\boxed\{[a-f]\}", choice.message.content) and choice.finish_reason == "stop"
    # vLLM counts the end-of-sequence token it sampled
    assert greedy.usage.prompt_tokens > n_tokens(QUESTION)
    assert greedy.usage.completion_tokens in (n_tokens(choice.message.content), n_tokens(choice.message.content) + 1)

    sampled = client.chat.completions.create(
        model="tiny-rise", messages=[{"role": "user", "content": QUESTION}], n=3, max_tokens=2, seed=7
    )  # 2 tokens: cut before "\boxed{x}" ends
    assert len(sampled.choices) == 3 and [c.index for c in sampled.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" and 0 < n_tokens(c.message.content) <= 2 for c in sampled.choices)
    assert sampled.usage.completion_tokens == 3 * 2

    # Same seed, same samples; streamed as server-sent events the openai client reads.
    again = client.chat.completions.create(
        model="tiny-rise", messages=[{"role": "user", "content": QUESTION}], n=3, max_tokens=2, seed=7, stream=True
    )
    streamed = ["", "", ""]
    for chunk in again:
        for ch in chunk.choices:
            streamed[ch.index] += ch.delta.content or ""
    assert streamed == [c.message.content for c in sampled.choices]


@pytest.mark.slow
def test_solve_without_oracle_votes_over_all_turns(server):
    with server.client() as c:
        out = solve(c, turns=5, seed=3)
    answers = out["answers"]
    assert out["turns_used"] == len(out["attempts"]) == 5 and out["stop_reason"] == "turns"
    assert answers == [a["answer"] for a in out["attempts"]]
    assert sum(a in LETTERS for a in answers if a) >= 3  # the trained model's answers are readable
    assert all(a["correct"] is None for a in out["attempts"]) and out["final_correct"] is None
    counts = Counter(a for a in answers if a is not None)
    top = max(counts.values())
    expected = next(a for a in reversed(answers) if a is not None and counts[a] == top)  # ties: latest
    assert out["final_answer"] == expected and out["rule"] == "m1@t5"
    assert out["answer_changes"] == sum(a != b for a, b in zip(answers, answers[1:], strict=False))


@pytest.mark.slow
def test_solve_runs_on_the_model_it_names(server):
    with server.client() as c:
        named = solve(c, turns=2, seed=11, model="iter_0")
        default = solve(c, turns=2, seed=11)
        assert named["model"] == "iter_0" and default["model"] == "tiny-rise"
        assert named["answers"] == default["answers"]  # the same checkpoint, the same seeds
        r = c.post("/v1/rise/solve", json={"problem": QUESTION, "model": "gpt-9"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"


@pytest.mark.slow
def test_solve_with_oracle_stops_at_the_first_correct_attempt(server):
    with server.client() as c:
        # Seeded attempts replay exactly: find a seed whose episode reaches a new answer after turn 1.
        for seed in range(20):
            free = solve(c, turns=5, seed=seed)
            answers = free["answers"]
            later = [j for j in range(1, 5) if answers[j] is not None and answers[j] not in answers[:j]]
            if later:
                break
        else:
            pytest.fail(f"no seed gave a new answer after turn 1: {answers}")
        j, gold = later[0], answers[later[0]]

        graded = solve(c, turns=5, seed=seed, answer=gold)  # graded, but no oracle: all turns run
        assert graded["turns_used"] == 5 and [a["correct"] for a in graded["attempts"]] == [
            a == gold for a in answers
        ]
        oracle = solve(c, turns=5, seed=seed, answer=gold, oracle=True)
    assert oracle["stop_reason"] == "correct" and oracle["turns_used"] == j + 1 and oracle["rule"] == "oracle"
    assert [a["response"] for a in oracle["attempts"]] == [a["response"] for a in free["attempts"][: j + 1]]
    assert [a["correct"] for a in oracle["attempts"]] == [False] * j + [True]
    assert oracle["final_answer"] == gold and oracle["final_correct"] is True


BAD = [
    # (route, raw body, status, field named). Chat bodies are vLLM's request model (its lax parsing:
    # "2" for n is 2); a field it rejects is named by the app's validation handler, a value vLLM's
    # serving code refuses is named in vLLM's message.
    ("/v1/chat/completions", b'{"messages": [', 400, "body"),
    ("/v1/chat/completions", b"[1, 2]", 400, "body"),
    ("/v1/chat/completions", b"{}", 400, "messages"),
    ("/v1/chat/completions", b'{"model": "tiny-rise", "messages": [{"role": "user", "content": "hi"}], "n": "two"}', 400, "n"),
    ("/v1/chat/completions", b'{"model": "tiny-rise", "messages": [{"role": "user", "content": "hi"}], "n": 5}', 400, "n"),
    ("/v1/chat/completions", b'{"model": "tiny-rise", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 600}', 400, "max_tokens"),
    ("/v1/chat/completions", b'{"model": "tiny-rise", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}', 400, "temperature"),
    ("/v1/chat/completions", b'{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}', 404, "gpt-9"),
    ("/v1/rise/solve", b"not json", 400, "body"),
    ("/v1/rise/solve", b'{"turns": 2}', 400, "problem"),
    ("/v1/rise/solve", b'{"problem": ""}', 400, "problem"),
    ("/v1/rise/solve", b'{"problem": "' + b"x" * 600 + b'"}', 400, "problem"),
    ("/v1/rise/solve", b'{"problem": "q", "turns": "3"}', 400, "turns"),
    ("/v1/rise/solve", b'{"problem": "q", "turns": 7}', 400, "turns"),
    ("/v1/rise/solve", b'{"problem": "q", "env": "chess"}', 400, "env"),
    ("/v1/rise/solve", b'{"problem": "q", "oracle": true}', 400, "answer"),
    ("/v1/rise/solve", b'{"problem": "q", "oracle": 1, "answer": "a"}', 400, "oracle"),
    ("/v1/rise/solve", b'{"problem": "q", "max_tokens": 100}', 400, "max_tokens"),
    ("/v1/rise/solve", b'{"problem": "q", "context_window": 0}', 400, "context_window"),
    ("/v1/rise/solve", b'{"problem": "q", "turnz": 3}', 400, "turnz"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("route", "body", "status", "field"), BAD, ids=[f"{r.rsplit('/', 1)[-1]}-{f}-{i}" for i, (r, _, _, f) in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_the_field_and_the_server_keeps_serving(server, route, body, status, field):
    with server.client() as c:
        r = c.post(route, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/json")
        err = r.json()["error"]
        assert err["param"] == field or field in err["message"], err
        good = c.post("/v1/chat/completions", json=chat_body(max_tokens=4))
        assert good.status_code == 200 and len(good.json()["choices"]) == 1


@pytest.mark.slow
def test_prompt_too_long_says_so(server):
    with server.client() as c:
        # vLLM fits max_tokens to the room a prompt leaves; a prompt over the context is a 400
        r = c.post("/v1/chat/completions", json=chat_body("y " * 600, max_tokens=30))
        assert r.status_code == 400 and "512" in r.json()["error"]["message"], r.text
        r = c.post("/v1/rise/solve", json={"problem": "y" * 490, "max_tokens": 30})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "512" in r.json()["error"]["message"]


@pytest.mark.slow
def test_token_guards_every_route_but_health(server):
    routes = [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", chat_body()),
              ("POST", "/v1/completions", {"model": "tiny-rise", "prompt": "a", "max_tokens": 2}),
              ("POST", "/tokenize", {"model": "tiny-rise", "prompt": "a"}),
              ("POST", "/v1/rise/solve", {"problem": QUESTION, "turns": 1})]
    for token in (None, "wrong-token"):
        with server.client(token) as c:
            for method, path, body in routes:
                r = c.request(method, path, json=body)
                assert r.status_code == 401, (token, path, r.text)
                assert r.json()["error"]["param"] == "authorization" and r.headers["www-authenticate"] == "Bearer"
            assert c.get("/healthz").status_code == 200
    with httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Basic {TOKEN}"}) as c:
        assert c.get("/v1/models").status_code == 401  # the right secret in the wrong scheme
    with server.client() as c:
        for method, path, body in routes:
            assert c.request(method, path, json=body).status_code == 200


async def _burst(url: str, total: int, concurrency: int, deadline_s: float, **body) -> list[httpx.Response]:
    """`total` chat requests with at most `concurrency` in flight, all done within deadline_s."""
    body = {"max_tokens": 8, **body}
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=deadline_s, limits=limits) as c:

        async def one(i: int) -> httpx.Response:
            async with sem:
                return await c.post("/v1/chat/completions", json=chat_body(f"Find {i}: a1 b2", **body))

        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(total))), deadline_s)


@pytest.mark.slow
def test_200_requests_within_capacity_all_succeed(server, n_tokens):
    # 8 in flight <= 4 ongoing + 8 queued: no request is turned away, and none fails.
    responses = asyncio.run(_burst(server.url, total=200, concurrency=8, deadline_s=120))
    assert [r.status_code for r in responses] == [200] * 200
    assert all(n_tokens(r.json()["choices"][0]["message"]["content"]) <= 8 for r in responses)


@pytest.mark.slow
def test_200_concurrent_requests_overload_gives_503_with_retry_after(server):
    # Long replies (temperature 2 rarely ends early): requests outlast the client opening 200 connections.
    responses = asyncio.run(
        _burst(server.url, total=200, concurrency=200, deadline_s=120, max_tokens=48, temperature=2.0)
    )
    codes = Counter(r.status_code for r in responses)
    print(f"status codes of 200 concurrent requests: {dict(codes)}")
    assert set(codes) <= {200, 503}, codes  # no other error, no hang
    assert codes[200] >= 4 and codes[503] > 0, codes  # over 4 ongoing + 8 queued: backpressure
    assert all(r.headers.get("retry-after") == "2" for r in responses if r.status_code == 503)
    with server.client() as c:  # and it keeps serving
        assert c.post("/v1/chat/completions", json=chat_body(max_tokens=4)).status_code == 200


def _metric_total(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _settled(read: Callable[[], float], quiet_s: float = 15.0, deadline_s: float = 120.0) -> float:
    """READ's value once it has not moved for quiet_s: more than Ray's metrics export interval
    (metrics_report_interval_ms, 10 s), so what earlier requests did has been exported."""
    end = time.monotonic() + deadline_s
    value, since = read(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < end, f"the metric kept moving: {value}"
        time.sleep(2)
        if (now := read()) != value:
            value, since = now, time.monotonic()
    return value


@pytest.mark.slow
def test_prometheus_metrics_count_solves_turns_and_changes(server):
    # Only this test's requests count: its solves use env=arithmetic, which no other test here
    # solves (the RISE counters are labelled by env), and Serve's HTTP count (no env label) is
    # read against a baseline taken once earlier tests' requests are all exported.
    def http_solves() -> float:
        text = httpx.get(server.metrics_url, timeout=10).text
        return _metric_total(text, "ray_serve_num_http_requests_total", application="rise", route="/v1/rise/solve")

    before = _settled(http_solves)
    with server.client() as c:
        outs = [solve(c, env="arithmetic", turns=4, seed=s) for s in (100, 101)]
    want = (2, sum(o["turns_used"] for o in outs), sum(o["answer_changes"] for o in outs), before + 2)
    deadline = time.monotonic() + 60  # Ray exports metrics every 10 s
    while True:
        text = httpx.get(server.metrics_url, timeout=10).text
        got = (
            _metric_total(text, "ray_rise_solve_requests_total", application="rise", env="arithmetic"),
            _metric_total(text, "ray_rise_solve_turns_total", env="arithmetic"),
            _metric_total(text, "ray_rise_solve_answer_changes_total", env="arithmetic"),
            _metric_total(text, "ray_serve_num_http_requests_total", application="rise", route="/v1/rise/solve"),
        )
        if got == want:
            break
        assert time.monotonic() < deadline, f"metrics: {got}, this test's requests: {want}"
        time.sleep(2)


@pytest.mark.slow
def test_serve_config_file_builds_the_app(server):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from rise_ray.serve.deploy import build_app

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "serve", "deploy.yaml")
    with open(path) as f:
        schema = ServeDeploySchema.model_validate(yaml.safe_load(f))
    (app_cfg,) = schema.applications
    assert app_cfg.import_path == "rise_ray.serve.deploy:build_app" and schema.http_options.host == "127.0.0.1"
    args = {**app_cfg.args, "checkpoint": server.checkpoint, "config": None}
    app = build_app(args)  # builds the bound deployments (ingress + one LLMServer); nothing is deployed
    assert type(app).__name__ == "Application"
    with pytest.raises(ValueError, match="max_replicas"):
        build_app({**args, "overrides": ["serve.max_replicas=0"]})
