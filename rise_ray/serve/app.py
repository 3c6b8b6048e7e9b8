"""The Ray Serve app: an OpenAI-compatible chat endpoint and RISE's multi-turn solve endpoint.

One deployment (`RiseServer`, a FastAPI ingress) holds one engine per replica, the same Engine
protocol the rollouts use (vLLM when installed, transformers otherwise). Steps of a request:
  1. the bearer token is checked (every route but /healthz), the body read up to
     serve.max_body_bytes (413 past it) and parsed strictly (rise_ray.serve.schemas): a bad
     request is a 4xx JSON error naming the field; any failure is JSON (rise_ray.serve.errors);
  2. limits (n, max_tokens, turns, seed) and the prompt's length against the context are
     checked; special tokens written in message content are kept text (rise_ray.serve.limits);
  3. with vLLM (serve.engine vllm/auto), every request is its own request in the async engine's
     running batch (continuous batching, rise_ray.serve.chat): it joins at the engine's next step,
     streams while it is decoded, and a client that goes away aborts it; the event loop stays free
     (/healthz answers during generation). With transformers (the fallback) generation goes
     through one `@serve.batch` queue: concurrent requests with the same sampling settings become
     one engine call on the event-loop thread (engines are not thread-safe);
  4. /v1/rise/solve runs `run_episodes` (on a worker thread, its engine calls fed back into the
     batch queue; grading in time-limited child processes, rise_ray.serve.grading) and returns
     every attempt, its answer, and the majority answer (m1@tT). A client that goes away
     cancels its queued engine work and its episode stops at the next turn.
Overload past max_ongoing_requests per replica plus max_queued_requests at the proxy is Serve's
backpressure: 503 with Retry-After. /healthz and Serve's health check report a dead engine;
Serve then replaces the replica.

    serve run rise_ray.serve.deploy:build_app checkpoint=/path/to/model      # or `rise serve`
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.util
import math
import os
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from rise_ray.config import RunConfig
from rise_ray.envs.base import Env, Problem
from rise_ray.rollout.engine import Completion, Conversation, PromptTooLong, SamplingParams
from rise_ray.rollout.episodes import EpisodeSpec, run_episodes
from rise_ray.serve import errors
from rise_ray.serve.auth import read_token, token_digest
from rise_ray.serve.chat import chat_async, check_chat, wave_reply
from rise_ray.serve.grading import BoundedEnv, GraderPool, serve_env
from rise_ray.serve.limits import (
    Cancelled,
    CancelToken,
    LoopEngine,
    SolveSlots,
    TextOnly,
    check_seed,
    read_body,
)
from rise_ray.serve.results import ServeMetrics, solve_result
from rise_ray.serve.schemas import ApiError, ChatRequest, SolveRequest, parse


def resolve_engine(kind: str) -> str:
    """auto -> vllm when importable, else hf."""
    if kind == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    return kind


# -- the HTTP app -------------------------------------------------------------------------------------
# No /docs or /openapi.json: they would be unguarded routes.
api = FastAPI(title="rise-ray", docs_url=None, redoc_url=None, openapi_url=None)
errors.install(api)


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
        # Auth first, failing closed: a blank token is an error, and with serve.require_token a
        # replica that has no token to check never starts (rather than serve without one).
        if token_sha256 is None and s.token_env in os.environ:
            token_sha256 = token_digest(read_token(self.cfg) or "")
        if token_sha256 is None and s.require_token:
            raise RuntimeError(f"serve.require_token: ${s.token_env} is not set on this replica: refusing to start")
        self._token_sha256 = token_sha256
        self.engine_kind = resolve_engine(s.engine)
        if s.num_gpus_per_replica == 0:
            # A CPU replica gets as many torch threads as CPUs it holds (oversubscribing a shared
            # CPU with spinning OpenMP threads is many times slower on tiny matmuls).
            torch.set_num_threads(max(1, math.ceil(s.num_cpus_per_replica)))
        rollout = self.cfg.rollout.model_copy(
            update={"engine": self.engine_kind, "num_gpus_per_engine": s.num_gpus_per_replica}
        )
        # vLLM serves through its async engine: continuous batching, streaming, aborts.
        kind = "vllm_async" if self.engine_kind == "vllm" else self.engine_kind
        self.engine = make_engine(kind, checkpoint, **engine_kwargs(rollout, self.cfg.model, self.cfg.seed, model_path=checkpoint))
        self.max_model_len: int = self.engine.max_model_len
        self.is_async = hasattr(self.engine, "agenerate")
        # Our own tokenizer (under a lock: solve threads use it too) for length checks and usage,
        # separate from the engine's.
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self._tok_lock = threading.Lock()
        self.model_name = s.model_name or os.path.basename(os.path.normpath(checkpoint))
        self.created = int(time.time())
        special = {*self.tokenizer.all_special_tokens,
                   *(t.content for t in getattr(self.tokenizer, "added_tokens_decoder", {}).values() if t.special)}
        self._text_only = TextOnly(special)
        self._engine_error: str | None = None  # set when the engine fails a probe: it is dead
        # Solve work is counted while it runs, and the pool has a thread for each: nothing queues.
        self._slots = SolveSlots(s.max_ongoing_requests, s.retry_after_s)
        self._solve_threads = ThreadPoolExecutor(s.max_ongoing_requests, thread_name_prefix="rise-solve")
        # Grading processes end with this replica's process (EOF on their pipe, or orphaned).
        self._grader = GraderPool(s.grade_workers)
        self._grader.warm()
        self._envs: dict[str, Env] = {}
        self._env_lock = threading.Lock()
        self.default_env = s.env or self.cfg.env.name
        self._env(self.default_env)  # fail at start-up, not at the first request, if it is broken
        self._batched.set_max_batch_size(s.max_batch_size)
        self._batched.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        self.metrics = ServeMetrics()

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
        with self._env_lock:
            if name not in self._envs:
                self._envs[name] = serve_env(self.cfg, name)
            return self._envs[name]

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
    async def generate(
        self, conversations: list[Conversation], n: int, params: SamplingParams
    ) -> list[list[Completion]]:
        """The Engine protocol's generate: on the async engine, or through the batch queue."""
        if self.is_async:
            try:
                return await self.engine.agenerate(conversations, n, params)
            except Exception as e:
                self._probe_engine(e)
                raise
        outs = await asyncio.gather(*(self._batched(_Job(c, n, params)) for c in conversations))
        for out in outs:
            if isinstance(out, BaseException):
                raise out
        return list(outs)

    def _run_engine(self, jobs: Sequence[_Job]) -> list[list[Completion]]:
        # On the event loop's own thread, blocking it for the batch: requests that arrive meanwhile
        # wait in Serve's (separate) main loop and form the next batch. Not an engine thread: one
        # holding the GIL starves the loop that feeds it, and batches stay near one request
        # (docs/scaling.md, "Measurements behind the defaults").
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
                self._probe_engine(e)
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

    def _probe_engine(self, error: Exception) -> None:
        """After an engine call failed: a request's own fault (PromptTooLong, ValueError), or an
        engine that can no longer generate? A one-token probe decides; if it fails too the engine
        is dead: /healthz says so and check_health makes Serve replace this replica."""
        if isinstance(error, ValueError) or self._engine_error is not None:
            return
        if self.is_async:  # AsyncLLM knows whether its engine core died
            if self.engine.llm.errored:
                self._engine_error = f"{type(self.engine.llm.dead_error).__name__}: {self.engine.llm.dead_error}"
            return
        try:
            self.engine.generate([[{"role": "user", "content": "ping"}]], 1, SamplingParams(temperature=0, max_tokens=1))
        except Exception as e:
            self._engine_error = f"{type(e).__name__}: {e}"

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose engine died is replaced."""
        if self.is_async and self.engine.llm.errored and self._engine_error is None:  # died between requests
            self._engine_error = f"{type(self.engine.llm.dead_error).__name__}: {self.engine.llm.dead_error}"
        if self._engine_error is not None:
            raise RuntimeError(f"the engine is dead: {self._engine_error}")

    def _live_engine(self) -> None:
        if self._engine_error is not None:
            raise ApiError(503, "this replica's engine is dead; Serve is replacing it: retry later", None,
                           "engine_dead", headers={"Retry-After": "5"})

    # -- routes ---------------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> Any:
        body = {"status": "ok", "model": self.model_name, "engine": self.engine_kind,
                "max_model_len": self.max_model_len,
                "solve": {"in_flight": self._slots.in_flight, "cancelled": self._slots.cancelled},
                "running": self.engine.num_running() if self.is_async else None}
        if self._engine_error is not None:
            return JSONResponse({**body, "status": "engine_dead", "error": self._engine_error}, status_code=503)
        return body

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "rise-ray",
                "max_model_len": self.max_model_len}
        return {"object": "list", "data": [card]}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        self._auth(request)
        s = self.cfg.serve
        req = parse(ChatRequest, await read_body(request, s.max_body_bytes))
        self._live_engine()
        if req.model is not None and req.model != self.model_name:
            raise ApiError(404, f"model: {req.model!r} is not served here; this server serves {self.model_name!r}",
                           "model", "model_not_found")
        stop = check_chat(req, self.is_async)
        n = 1 if req.n is None else req.n
        if n > s.max_n:
            raise ApiError(400, f"n: {n} is above this server's limit of {s.max_n}", "n")
        conv = [{"role": m.role, "content": self._text_only(m.content)} for m in req.messages]
        # The async engine's own ids (templated once): they are what it generates from.
        ids = self.engine.prompt_ids(conv) if self.is_async else None
        prompt_tokens = len(ids) if ids is not None else self.prompt_len(conv)
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
            logprobs=bool(req.logprobs),
        )
        if self.is_async:
            self.metrics.chat.inc(tags={"stream": str(bool(req.stream)).lower()})
            return await chat_async(self.engine, self.model_name, req, ids, n, params, stop)
        try:
            (outs,) = await self.generate([conv], n, params)
        except PromptTooLong as e:
            raise ApiError(400, f"messages: {e}", "messages", "context_length_exceeded") from None
        self.metrics.chat.inc(tags={"stream": str(bool(req.stream)).lower()})
        completion_tokens = sum(self._count_tokens(o.text) for o in outs)
        return wave_reply(self.model_name, req, outs, prompt_tokens, completion_tokens)

    @api.post("/v1/rise/solve")
    async def solve(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        s, ev = self.cfg.serve, self.cfg.eval
        req = parse(SolveRequest, await read_body(request, s.max_body_bytes))
        self._live_engine()
        env_name = req.env or self.default_env
        env = self._env(env_name)
        if req.turns is not None and req.turns > s.max_turns:
            raise ApiError(400, f"turns: {req.turns} is above this server's limit of {s.max_turns}", "turns")
        turns = req.turns or min(ev.turns, s.max_turns)
        check_seed(req.seed, turns)
        if req.answer is not None and len(req.answer) > s.max_answer_chars:
            raise ApiError(400, f"answer: {len(req.answer)} characters is above this server's limit of "
                           f"{s.max_answer_chars}", "answer")
        if req.oracle and req.answer is None:
            raise ApiError(400, "answer: oracle: true needs the gold answer to check attempts against", "answer")
        params = SamplingParams(
            temperature=ev.temperature if req.temperature is None else req.temperature,
            top_p=ev.top_p if req.top_p is None else req.top_p,
            max_tokens=self._max_tokens(req.max_tokens, ev.max_tokens),
            seed=req.seed,
        )
        problem = Problem(f"solve-{uuid.uuid4().hex}", self._text_only(req.problem), req.answer or "")
        self._check_fits(self.prompt_len(env.first_prompt(problem)), params.max_tokens, "problem")
        spec = EpisodeSpec(turns=turns, params=params, choose="first", oracle=req.oracle,
                           context_window=req.context_window)
        cancel = CancelToken()
        self._slots.take()
        try:
            fut = self._solve_threads.submit(self._episode, env, problem, spec, req.answer is not None, cancel,
                                             asyncio.get_running_loop())
        except BaseException:
            self._slots.give(False)
            raise
        try:
            out = await asyncio.wrap_future(fut)
        except asyncio.CancelledError:  # the client went away (Serve cancels the handler)
            cancel.cancel()
            if fut.cancelled():  # it never started, so it gives back no slot itself
                self._slots.give(True)
            raise
        self.metrics.solved(env_name, req.oracle, out)
        return {"id": problem.id, "model": self.model_name, "env": env_name, **out}

    def _episode(self, env: Env, problem: Problem, spec: EpisodeSpec, graded: bool, cancel: CancelToken,
                 loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        """On a solve thread: the episode and its result, grading under the request's time limit."""
        stopped = False
        try:
            bounded: Any = BoundedEnv(env, self._grader, self.cfg.serve.grade_timeout_s, cancel.event)
            (traj,) = run_episodes(LoopEngine(self, loop, cancel), bounded, [problem], spec)
            return solve_result(traj, bounded, spec.turns, graded)
        except Cancelled:
            stopped = True
            raise
        finally:
            self._slots.give(stopped)
