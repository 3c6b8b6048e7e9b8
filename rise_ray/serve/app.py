"""The Ray Serve app: an OpenAI-compatible chat endpoint and RISE's multi-turn solve endpoint.

One deployment (`RiseServer`, a FastAPI ingress) holds one engine per replica, the same Engine
protocol the rollouts use (vLLM when installed, transformers otherwise). Steps of a request:
  1. the bearer token is checked (every route but /healthz), then the body is parsed strictly
     (rise_ray.serve.schemas): a bad request is a 4xx JSON error naming the field;
  2. limits (n, max_tokens, turns) and the prompt's length against the context are checked;
  3. generation goes through one `@serve.batch` queue: concurrent requests with the same sampling
     settings become one engine call, made on the replica's event-loop thread (one at a time:
     engines are not thread-safe);
  4. /v1/rise/solve runs `run_episodes` (on a worker thread, its engine calls fed back into the
     batch queue) and returns every attempt, its answer, and the majority answer (m1@tT).
Overload past max_ongoing_requests per replica plus max_queued_requests at the proxy is Serve's
backpressure: 503 with Retry-After.

    serve run rise_ray.serve.app:build_app checkpoint=/path/to/model      # or `rise serve`
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib.util
import json
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from rise_ray.config import DEFAULT_CONFIG, RunConfig, load_config
from rise_ray.envs.base import Env, Problem
from rise_ray.eval.metrics import majority_index
from rise_ray.rollout.engine import Conversation, PromptTooLong, SamplingParams
from rise_ray.rollout.episodes import EpisodeSpec, Trajectory, run_episodes
from rise_ray.serve.schemas import ApiError, ChatRequest, SolveRequest, parse

ROUTES = ("GET /healthz", "GET /v1/models", "POST /v1/chat/completions", "POST /v1/rise/solve")


def majority_answer(answers: Sequence[str | None], key: Callable[[str | None], str | None]) -> str | None:
    """The majority answer (rise_ray.eval.metrics.majority_index): the most frequent readable
    answer, ties to the latest (a reply must pick one; the metrics score ties as 1/j); None when
    no answer was readable."""
    i = majority_index(answers, key)
    return None if i is None else answers[i]


def resolve_engine(kind: str) -> str:
    """auto -> vllm when importable, else hf."""
    if kind == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    return kind


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def solve_result(traj: Trajectory, env: Env, turns: int, graded: bool) -> dict[str, Any]:
    """The body of a solve response: every attempt, its answer, and the final answer: the majority
    over the attempts (m1@tT, ties to the latest), or the correct attempt's answer when the oracle
    stopped the episode there."""
    answers = [t.answer for t in traj.turns]
    keys = [env.answer_key(a) for a in answers]
    if traj.stop_reason == "correct":
        final, rule = answers[-1], "oracle"
    else:
        final, rule = majority_answer(answers, env.answer_key), f"m1@t{turns}"
    final_correct = None
    if graded:  # the vote's answer is correct when the attempts giving it were graded correct
        final_key = env.answer_key(final)
        final_correct = any(t.correct for t, k in zip(traj.turns, keys, strict=True) if k is not None and k == final_key)
    return {
        "turns": turns,
        "turns_used": len(traj.turns),
        "stop_reason": traj.stop_reason,  # turns | correct | prompt_too_long
        "attempts": [
            {"turn": i + 1, "response": t.response, "answer": t.answer,
             "correct": t.correct if graded else None, "finished": t.finished}
            for i, t in enumerate(traj.turns)
        ],
        "answers": answers,
        "final_answer": final,
        "final_correct": final_correct,
        "rule": rule,
        "answer_changes": sum(a != b for a, b in zip(keys, keys[1:], strict=False)),
    }


# -- the HTTP app -------------------------------------------------------------------------------------
# No /docs or /openapi.json: they would be unguarded routes.
api = FastAPI(title="rise-ray", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = ApiError(exc.status_code, str(exc.detail), None, "not_found" if exc.status_code == 404 else None)
    return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


@dataclass(frozen=True)
class _Job:
    """One conversation to complete n times; the unit the batch queue merges."""

    conversation: Conversation
    n: int
    params: SamplingParams

    def group(self) -> tuple[Any, ...]:
        # A seeded request runs alone: its samples must not depend on what it was batched with.
        alone = id(self) if self.params.seed is not None else None
        return (self.n, self.params.temperature, self.params.top_p, self.params.max_tokens, self.params.seed, alone)


class _LoopEngine:
    """The Engine protocol for run_episodes on a worker thread: generate() goes through the
    replica's batch queue on its event loop, so solve turns are batched with chat requests."""

    def __init__(self, server: RiseServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.max_model_len = server.max_model_len

    def prompt_len(self, conversation: Conversation) -> int:
        return self.server.prompt_len(conversation)

    def generate(self, conversations: list[Conversation], n: int, params: SamplingParams) -> list[list[str]]:
        return asyncio.run_coroutine_threadsafe(self.server.generate(conversations, n, params), self.loop).result()


# serve.ingress freezes the FastAPI app (and the methods' globals) here: whatever a route uses must
# be defined above this point.
@serve.deployment(name="RiseServer")
@serve.ingress(api)
class RiseServer:
    def __init__(self, checkpoint: str, config: dict[str, Any], token_sha256: str | None = None) -> None:
        import torch
        from transformers import AutoTokenizer

        from rise_ray.rollout import make_engine
        from rise_ray.session import engine_kwargs

        self.cfg = RunConfig.model_validate(config)
        s = self.cfg.serve
        self.engine_kind = resolve_engine(s.engine)
        if s.num_gpus_per_replica == 0:
            # A CPU replica gets as many torch threads as CPUs it holds (oversubscribing a shared
            # CPU with spinning OpenMP threads is many times slower on tiny matmuls).
            torch.set_num_threads(max(1, math.ceil(s.num_cpus_per_replica)))
        rollout = self.cfg.rollout.model_copy(
            update={"engine": self.engine_kind, "num_gpus_per_engine": s.num_gpus_per_replica}
        )
        self.engine = make_engine(self.engine_kind, checkpoint, **engine_kwargs(rollout, self.cfg.model, self.cfg.seed, model_path=checkpoint))
        self.max_model_len: int = self.engine.max_model_len
        # Our own tokenizer (under a lock: solve threads use it too) for length checks and usage,
        # separate from the engine's.
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self._tok_lock = threading.Lock()
        self.model_name = s.model_name or os.path.basename(os.path.normpath(checkpoint))
        self.created = int(time.time())
        if token_sha256 is None and os.environ.get(s.token_env):
            token_sha256 = token_digest(os.environ[s.token_env])
        self._token_sha256 = token_sha256
        self._solve_threads = ThreadPoolExecutor(s.max_ongoing_requests, thread_name_prefix="rise-solve")
        self._envs: dict[str, Env] = {}
        self._env_lock = threading.Lock()
        self.default_env = s.env or self.cfg.env.name
        self._env(self.default_env)  # fail at start-up, not at the first request, if it is broken
        self._batched.set_max_batch_size(s.max_batch_size)
        self._batched.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        self._metrics()

    def _metrics(self) -> None:
        from ray.serve import metrics

        self.m_solve = metrics.Counter(
            "rise_solve_requests", "Solve requests served.", tag_keys=("env", "oracle")
        )
        self.m_turns = metrics.Counter("rise_solve_turns", "Turns (attempts) used by solve requests.", tag_keys=("env",))
        self.m_changes = metrics.Counter(
            "rise_solve_answer_changes", "Answer changes between consecutive attempts.", tag_keys=("env",)
        )
        self.m_turns_used = metrics.Histogram(
            "rise_solve_turns_used", "Turns used per solve request.", boundaries=[1, 2, 3, 4, 5, 8, 12, 16],
            tag_keys=("env",),
        )
        self.m_chat = metrics.Counter("rise_chat_requests", "Chat completion requests served.", tag_keys=("stream",))

    # -- helpers --------------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if self._token_sha256 is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(given.strip()), self._token_sha256):
            raise ApiError(401, "missing or wrong bearer token", "authorization", "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def prompt_len(self, conversation: Conversation) -> int:
        with self._tok_lock:
            ids = self.tokenizer.apply_chat_template(
                conversation, tokenize=True, add_generation_prompt=True, return_dict=False
            )
        return len(ids)

    def _count_tokens(self, text: str) -> int:
        with self._tok_lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _env(self, name: str) -> Env:
        from rise_ray.envs import REGISTRY, env_options, get_env
        from rise_ray.session import env_options as cfg_env_options

        with self._env_lock:
            if name in self._envs:
                return self._envs[name]
            if name not in REGISTRY:
                raise ApiError(400, f"env: unknown env {name!r}; known: {sorted(REGISTRY)}", "env", "unknown_env")
            if name == self.cfg.env.name:  # the training env: the same prompts and feedback it was trained on
                opts = cfg_env_options(self.cfg.env, with_data=False)
            else:
                e = self.cfg.env
                opts = {"feedback": e.feedback, "repeat_question": e.repeat_question, "unparsed_reward": e.unparsed_reward}
            accepted = env_options(name)
            opts.update({k: 0 for k in ("num_train", "num_test") if k in accepted})  # grading needs no problems
            self._envs[name] = env = get_env(name, **{k: v for k, v in opts.items() if k in accepted})
            return env

    def _max_tokens(self, value: int | None, default: int, param: str = "max_tokens") -> int:
        limit = self.cfg.serve.max_tokens_limit
        if value is None:
            return min(default, limit)
        if value > limit:
            raise ApiError(400, f"{param}: {value} is above this server's limit of {limit}", param)
        return value

    def _check_fits(self, prompt_tokens: int, max_tokens: int, param: str) -> None:
        if prompt_tokens + max_tokens > self.max_model_len:
            raise ApiError(
                400,
                f"{param}: the prompt is {prompt_tokens} tokens; with max_tokens {max_tokens} that exceeds "
                f"the model's context of {self.max_model_len} tokens",
                param,
                "context_length_exceeded",
            )

    # -- generation: one batch queue, engine calls on the event loop's thread -------------------------
    async def generate(self, conversations: list[Conversation], n: int, params: SamplingParams) -> list[list[str]]:
        """The Engine protocol's generate, through the batch queue (safe to call concurrently)."""
        outs = await asyncio.gather(*(self._batched(_Job(c, n, params)) for c in conversations))
        for out in outs:
            if isinstance(out, BaseException):
                raise out
        return list(outs)

    def _run_engine(self, jobs: Sequence[_Job]) -> list[list[str]]:
        # On the event loop's own thread, blocking it for the batch: requests that arrive meanwhile
        # wait in Serve's (separate) main loop and form the next batch. Measured against an engine
        # thread (bench/serve.py, HF engine, 2 CPUs): 2x the requests/s at 8 and 32 clients, since
        # an engine thread holding the GIL starves the loop that feeds it and batches stay ~1.5.
        return self.engine.generate([j.conversation for j in jobs], jobs[0].n, jobs[0].params)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)  # both reset from the config in __init__
    async def _batched(self, jobs: list[_Job]) -> list[Any]:
        """Jobs that share sampling settings become one engine call. A failure is returned in place
        of that job's result (and raised by `generate`), so it reaches only its own request."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.group(), []).append(i)
        results: list[Any] = [None] * len(jobs)
        for idx in groups.values():
            try:
                outs: list[Any] = self._run_engine([jobs[i] for i in idx])
            except Exception as e:
                if len(idx) == 1:
                    results[idx[0]] = e
                    continue
                outs = []
                for i in idx:  # find the one that fails: each job on its own
                    try:
                        outs.append(self._run_engine([jobs[i]])[0])
                    except Exception as e1:
                        outs.append(e1)
            for i, out in zip(idx, outs, strict=True):
                results[i] = out
        return results

    # -- routes ---------------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, "engine": self.engine_kind, "max_model_len": self.max_model_len}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "rise-ray",
                "max_model_len": self.max_model_len}
        return {"object": "list", "data": [card]}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        self._auth(request)
        req = parse(ChatRequest, await request.body())
        s = self.cfg.serve
        if req.model is not None and req.model != self.model_name:
            raise ApiError(404, f"model: {req.model!r} is not served here; this server serves {self.model_name!r}",
                           "model", "model_not_found")
        n = 1 if req.n is None else req.n
        if n > s.max_n:
            raise ApiError(400, f"n: {n} is above this server's limit of {s.max_n}", "n")
        conv = [{"role": m.role, "content": m.content} for m in req.messages]
        prompt_tokens = self.prompt_len(conv)
        if req.max_completion_tokens is not None:
            given, param = req.max_completion_tokens, "max_completion_tokens"
        else:
            given, param = req.max_tokens, "max_tokens"
        # No max_tokens given: the default, or the room the context leaves (at least 1).
        max_tokens = self._max_tokens(given, min(s.default_max_tokens, max(1, self.max_model_len - prompt_tokens)), param)
        self._check_fits(prompt_tokens, max_tokens, "messages")
        params = SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            max_tokens=max_tokens,
            seed=req.seed,
        )
        try:
            (outs,) = await self.generate([conv], n, params)
        except PromptTooLong as e:
            raise ApiError(400, f"messages: {e}", "messages", "context_length_exceeded") from None
        self.m_chat.inc(tags={"stream": str(bool(req.stream)).lower()})
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        reasons = ["stop" if getattr(o, "finished", True) else "length" for o in outs]
        completion_tokens = sum(self._count_tokens(o) for o in outs)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if req.stream:
            with_usage = bool((req.stream_options or {}).get("include_usage"))
            events = self._sse(rid, created, outs, reasons, usage if with_usage else None)
            return StreamingResponse(events, media_type="text/event-stream")
        choices = [
            {"index": i, "message": {"role": "assistant", "content": str(o)}, "finish_reason": r, "logprobs": None}
            for i, (o, r) in enumerate(zip(outs, reasons, strict=True))
        ]
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": usage}

    async def _sse(
        self, rid: str, created: int, outs: list[str], reasons: list[str], usage: dict[str, int] | None
    ) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format. The engine returns whole replies, so each
        choice comes as one content chunk, then its finish chunk."""

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": choices, **extra}
            return f"data: {json.dumps(body)}\n\n"

        for i, (o, r) in enumerate(zip(outs, reasons, strict=True)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": str(o)}, "finish_reason": None}])
            yield chunk([{"index": i, "delta": {}, "finish_reason": r}])
        if usage is not None:
            yield chunk([], usage=usage)
        yield "data: [DONE]\n\n"

    @api.post("/v1/rise/solve")
    async def solve(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        req = parse(SolveRequest, await request.body())
        s, ev = self.cfg.serve, self.cfg.eval
        env_name = req.env or self.default_env
        env = self._env(env_name)
        if req.turns is not None and req.turns > s.max_turns:
            raise ApiError(400, f"turns: {req.turns} is above this server's limit of {s.max_turns}", "turns")
        turns = req.turns or min(ev.turns, s.max_turns)
        if req.oracle and req.answer is None:
            raise ApiError(400, "answer: oracle: true needs the gold answer to check attempts against", "answer")
        params = SamplingParams(
            temperature=ev.temperature if req.temperature is None else req.temperature,
            top_p=ev.top_p if req.top_p is None else req.top_p,
            max_tokens=self._max_tokens(req.max_tokens, ev.max_tokens),
            seed=req.seed,
        )
        problem = Problem(f"solve-{uuid.uuid4().hex}", req.problem, req.answer or "")
        self._check_fits(self.prompt_len(env.first_prompt(problem)), params.max_tokens, "problem")
        spec = EpisodeSpec(turns=turns, params=params, choose="first", oracle=req.oracle,
                           context_window=req.context_window)
        loop = asyncio.get_running_loop()
        (traj,) = await loop.run_in_executor(
            self._solve_threads, run_episodes, _LoopEngine(self, loop), env, [problem], spec
        )
        out = solve_result(traj, env, turns, graded=req.answer is not None)
        tags = {"env": env_name}
        self.m_solve.inc(tags={**tags, "oracle": str(req.oracle).lower()})
        self.m_turns.inc(out["turns_used"], tags=tags)
        self.m_turns_used.observe(out["turns_used"], tags=tags)
        if out["answer_changes"]:
            self.m_changes.inc(out["answer_changes"], tags=tags)
        return {"id": problem.id, "model": self.model_name, "env": env_name, **out}


# -- building and running the app ---------------------------------------------------------------------
def make_app(checkpoint: str, cfg: RunConfig, token: str | None = None) -> serve.Application:
    """The Serve application for `checkpoint`, with deployment options from `cfg.serve`.

    `token`: the bearer token; only its SHA-256 reaches the cluster. None: each replica reads the
    environment variable named by `cfg.serve.token_env`; neither set: no auth.
    """
    from rise_ray.envs import REGISTRY

    s = cfg.serve
    if (s.env or cfg.env.name) not in REGISTRY:
        raise ValueError(f"serve.env: unknown env {s.env or cfg.env.name!r}; known: {sorted(REGISTRY)}")
    if os.path.exists(checkpoint):
        checkpoint = os.path.abspath(checkpoint)
    options: dict[str, Any] = {
        "autoscaling_config": {
            "min_replicas": s.min_replicas,
            "initial_replicas": max(s.min_replicas, 1),
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        },
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": s.retry_after_s},
        "ray_actor_options": {"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica},
        "health_check_timeout_s": 60,
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
    """The import-path builder for `serve deploy` / `serve run`: rise_ray.serve.app:build_app."""
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(dict(args))
    overrides = a.overrides.split() if isinstance(a.overrides, str) else a.overrides
    return make_app(a.checkpoint, load_config(a.config or DEFAULT_CONFIG, overrides))


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
    import ray

    check_checkpoint(checkpoint)
    s = cfg.serve
    host = s.host if host is None else host
    port = s.port if port is None else port
    dashboard = None
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            dashboard = ray.init(address="local", dashboard_host="127.0.0.1", log_to_driver=True).dashboard_url
    token = os.environ.get(s.token_env) or None
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
