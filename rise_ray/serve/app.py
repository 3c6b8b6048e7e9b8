"""The Serve app: Ray Serve LLM's OpenAI API (vLLM's own serving code) with RISE's solve on top.

One ingress deployment (`RiseIngress`, a subclass of Ray Serve LLM's `OpenAiIngress`) in front of
one `LLMServer` deployment per model (rise_ray.serve.llm_config). Steps of a request:
  1. `BodyLimit`: a body over serve.max_body_bytes is 413 before anything parses it; `BearerAuth`:
     every route but /healthz and /health needs the bearer token when one is set (rise_ray.serve.auth);
  2. the OpenAI routes (/v1/chat/completions, /v1/completions, /v1/models, /tokenize, ...) are
     OpenAiIngress's own: vLLM's request models validate, its serving code generates, streams and
     answers errors. Chat message text first has its special tokens kept text (TextOnly);
  3. /v1/rise/solve runs `run_episodes` on a worker thread. Each turn is a chat request to the
     model's LLMServer through its Serve handle, the call the OpenAI route makes; grading runs in
     time-limited child processes (rise_ray.serve.grading). A client that goes away cancels the
     turn in flight (vLLM aborts it) and the episode stops;
  4. /healthz reports the ingress and each model's engine (LLMServer.check_health): 503 when one
     is dead, while Serve's own health check replaces that replica; /health and /metrics answer
     as vLLM's own server's do (/metrics: Ray's Prometheus export of this node).

    serve run rise_ray.serve.deploy:build_app checkpoint=/path/to/model      # or `rise serve`
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, init
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from vllm.entrypoints.serve.engine.protocol import ErrorResponse

from rise_ray.config import RunConfig
from rise_ray.envs.base import Env, Problem
from rise_ray.rollout.engine import Completion, Conversation, SamplingParams
from rise_ray.rollout.episodes import EpisodeSpec, run_episodes
from rise_ray.serve.auth import replica_token_digest, token_digest
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
from rise_ray.serve.schemas import ApiError, SolveRequest, param_name, parse

HEALTH_TIMEOUT_S = 10.0  # an engine that cannot answer its health check within this is reported dead


# -- middleware (pure ASGI: streamed replies pass through untouched) ----------------------------------
async def _send_error(scope: dict[str, Any], receive: Any, send: Any, err: ApiError) -> None:
    await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)


class BodyLimit:
    """413 for a body over `limit` bytes, from Content-Length before reading anything, else while it
    streams in; nothing over the limit is kept. The app then reads the buffered body."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(Request(scope, receive), self.limit)
        except ApiError as err:
            await _send_error(scope, receive, send, err)
            return
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when the client goes away

        await self.app(scope, replay, send)


class BearerAuth:
    """Every route but /healthz and /health needs `Authorization: Bearer <token>` when this replica has a token
    (given at build time as its SHA-256, else read from $token_env: rise_ray.serve.auth). CORS
    preflights pass: they carry no credentials and reach no model."""

    OPEN = ("/healthz", "/health")

    def __init__(self, app: Any, token_sha256: str | None, token_env: str, require_token: bool) -> None:
        self.app = app
        self.token_sha256 = replica_token_digest(token_sha256, token_env, require_token)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (scope["type"] == "http" and self.token_sha256 is not None and scope["method"] != "OPTIONS"
                and scope["path"] not in self.OPEN):
            headers = dict(scope["headers"])
            scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(given.strip()), self.token_sha256):
                await _send_error(scope, receive, send, ApiError(401, "missing or wrong bearer token", "authorization",
                                                 "invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
                return
        await self.app(scope, receive, send)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class _NonFinite(str):
    """NaN, Infinity or -Infinity as Python's json reads them (JSON itself has no such numbers)."""


def _unreadable(body: bytes) -> tuple[str, str]:
    """(message, param) for a body FastAPI did not take as JSON: a non-finite number (NaN, Infinity:
    Python's json reads them, JSON does not allow them) names its field; anything else the body."""

    try:
        obj = json.loads(body, parse_constant=_NonFinite)
    except ValueError as e:
        return f"request body is not valid JSON: {e}", "body"
    for key, value in obj.items() if isinstance(obj, dict) else ():
        if isinstance(value, _NonFinite):
            return f"{key}: must be a finite number, not {value}", key
    return "request body: must be a JSON object", "body"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """A body vLLM's request model rejects: 400 naming the first bad field. (Ray Serve LLM's own
    handler answers 500 when the rejected value is bytes, as for a NaN temperature.)"""
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request body", "type": ""}
    loc = tuple(first.get("loc", ()))
    loc = loc[1:] if loc[:1] == ("body",) else loc
    if not loc and isinstance(exc.body, bytes):  # FastAPI could not read it as JSON: say why
        err = ApiError(400, *_unreadable(exc.body))
        return JSONResponse(err.body(), status_code=400)
    param = "body" if first.get("type") == "json_invalid" or not loc else param_name(loc)
    err = ApiError(400, f"{param}: {first.get('msg', 'invalid')}", param)
    return JSONResponse(err.body(), status_code=400)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's 404/405 (and OpenAiIngress's "no such model") in the OpenAI error shape."""
    assert isinstance(exc, StarletteHTTPException)
    err = ApiError(exc.status_code, str(exc.detail), None, "not_found" if exc.status_code == 404 else None)
    return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


def http_app(cfg: RunConfig, token_sha256: str | None) -> FastAPI:
    """Ray Serve LLM's FastAPI app (its error, CORS and request-id middleware) with ours outside it."""
    app = init()
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(BodyLimit, limit=cfg.serve.max_body_bytes)
    app.add_middleware(BearerAuth, token_sha256=token_sha256, token_env=cfg.serve.token_env,
                       require_token=cfg.serve.require_token)  # added last: runs first
    return app


# -- the ingress ----------------------------------------------------------------------------------------
class RiseIngress(OpenAiIngress):
    """OpenAiIngress plus /v1/rise/solve and /healthz. `model_dirs`: each model id's HF directory
    (its tokenizer: prompt lengths and special tokens); `default_model`: solve's model when the
    request names none."""

    def __init__(self, llm_deployments: Any, model_cards: Any, lora_paths: Any = None, *,
                 config: dict[str, Any], model_dirs: dict[str, str], default_model: str,
                 token_sha256: str | None = None) -> None:
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        from transformers import AutoTokenizer

        self.cfg = RunConfig.model_validate(config)
        s = self.cfg.serve
        # Auth fails closed at start-up too: a blank token, or serve.require_token without one.
        replica_token_digest(token_sha256, s.token_env, s.require_token)
        self.default_model = default_model
        self.tokenizers = {m: AutoTokenizer.from_pretrained(d) for m, d in model_dirs.items()}
        self._tok_lock = threading.Lock()  # solve threads share the tokenizers
        self.max_model_len = {m: int(card.metadata["max_request_context_length"]) for m, card in model_cards.items()}
        tok = self.tokenizers[default_model]
        special = {*tok.all_special_tokens,
                   *(t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special)}
        self._text_only = TextOnly(special)
        # Solve work is counted while it runs, and the pool has a thread for each: nothing queues.
        self._slots = SolveSlots(s.max_ongoing_requests, s.retry_after_s)
        self._solve_threads = ThreadPoolExecutor(s.max_ongoing_requests, thread_name_prefix="rise-solve")
        self._grader = GraderPool(s.grade_workers)  # ends with this replica's process
        self._grader.warm()
        self._envs: dict[str, Env] = {}
        self._env_lock = threading.Lock()
        self.default_env = s.env or self.cfg.env.name
        self._env(self.default_env)  # fail at start-up, not at the first request, if it is broken
        self.metrics = ServeMetrics()
        self._metrics_url: str | None = None

    def _env(self, name: str) -> Env:
        with self._env_lock:
            if name not in self._envs:
                self._envs[name] = serve_env(self.cfg, name)
            return self._envs[name]

    def prompt_len(self, model: str, conversation: Conversation) -> int:
        with self._tok_lock:
            ids = self.tokenizers[model].apply_chat_template(
                conversation, tokenize=True, add_generation_prompt=True, return_dict=False)
        return len(ids)

    async def generate(self, model: str, conversations: list[Conversation], n: int,
                       params: SamplingParams) -> list[list[Completion]]:
        """The Engine protocol's generate, for solve: one chat request per conversation to the model's
        LLMServer (vLLM batches them with every other request it runs)."""
        return list(await asyncio.gather(*(self._chat_once(model, c, n, params) for c in conversations)))

    async def _chat_once(self, model: str, conversation: Conversation, n: int, params: SamplingParams) -> list[Completion]:
        body = ChatCompletionRequest(model=model, messages=conversation, n=n, temperature=params.temperature,
                                     top_p=params.top_p, max_tokens=params.max_tokens, seed=params.seed)
        gen = self._get_response(body=body, call_method="chat")
        try:
            out = await gen.__anext__()
        finally:
            await gen.aclose()
        out = out[0] if isinstance(out, list) else out
        if isinstance(out, ErrorResponse):  # vLLM refused the request or failed
            code = int(out.error.code)
            if code >= 500:
                raise ApiError(503, f"the model's engine failed ({out.error.message}); retry later", None,
                               "engine_error", headers={"Retry-After": "5"})
            raise ApiError(code, f"problem: {out.error.message}", "problem")
        choices = sorted(out.choices, key=lambda c: c.index)
        return [Completion(c.message.content or "", c.finish_reason != "length") for c in choices]

    # -- routes ---------------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        """OpenAiIngress's chat, with special tokens written in message text kept text."""
        for message in body.messages:
            content = message.get("content")
            if isinstance(content, str):
                message["content"] = self._text_only(content)
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        part["text"] = self._text_only(part["text"])
        return await super().chat(body, request)

    async def _engines(self) -> dict[str, str]:
        """Each model's engine: "ok", or "dead: <why>" (LLMServer.check_health through its handle)."""
        engines: dict[str, str] = {}
        for model, handle in self._default_serve_handles.items():
            try:
                await asyncio.wait_for(handle.check_health.remote(), HEALTH_TIMEOUT_S)
                engines[model] = "ok"
            except Exception as e:  # noqa: BLE001 - reported, not raised: this is the health page
                engines[model] = f"dead: {type(e).__name__}: {e}"[:500]
        return engines

    async def healthz(self) -> Any:
        engines = await self._engines()
        dead = any(v != "ok" for v in engines.values())
        body = {"status": "engine_dead" if dead else "ok", "models": engines,
                "solve": {"in_flight": self._slots.in_flight, "cancelled": self._slots.cancelled}}
        return JSONResponse(body, status_code=503 if dead else 200)

    async def health(self) -> Response:
        """vLLM's server's /health: 200 with no body while every engine lives, else 503."""
        dead = any(v != "ok" for v in (await self._engines()).values())
        return Response(status_code=503 if dead else 200)

    async def metrics(self) -> Response:
        """vLLM's server's /metrics: Prometheus text. Ray exports every process's metrics (vLLM's
        engine metrics as ray_vllm_*, ours as ray_rise_*, Serve's) per node; this is this node's."""
        if self._metrics_url is None:  # this replica's node does not change: look it up once
            self._metrics_url = await asyncio.to_thread(_metrics_export_url)
        async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT_S) as client:
            r = await client.get(self._metrics_url)
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    async def solve(self, request: Request) -> dict[str, Any]:
        s, ev = self.cfg.serve, self.cfg.eval
        req = parse(SolveRequest, await request.body())
        model = req.model or self.default_model
        if model not in self.tokenizers:
            raise ApiError(404, f"model: {model!r} is not served here; served: {sorted(self.tokenizers)}",
                           "model", "model_not_found")
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
        if req.max_tokens is not None and req.max_tokens > s.max_tokens_limit:
            raise ApiError(400, f"max_tokens: {req.max_tokens} is above this server's limit of "
                           f"{s.max_tokens_limit}", "max_tokens")
        params = SamplingParams(
            temperature=ev.temperature if req.temperature is None else req.temperature,
            top_p=ev.top_p if req.top_p is None else req.top_p,
            max_tokens=min(ev.max_tokens, s.max_tokens_limit) if req.max_tokens is None else req.max_tokens,
            seed=req.seed,
        )
        problem = Problem(f"solve-{uuid.uuid4().hex}", self._text_only(req.problem), req.answer or "")
        prompt_tokens = self.prompt_len(model, env.first_prompt(problem))
        if prompt_tokens + params.max_tokens > self.max_model_len[model]:
            raise ApiError(400, f"problem: the prompt is {prompt_tokens} tokens; with max_tokens {params.max_tokens} "
                           f"that exceeds the model's context of {self.max_model_len[model]} tokens",
                           "problem", "context_length_exceeded")
        spec = EpisodeSpec(turns=turns, params=params, choose="first", oracle=req.oracle,
                           context_window=req.context_window)
        cancel = CancelToken()
        self._slots.take()
        try:
            fut = self._solve_threads.submit(self._episode, model, env, problem, spec, req.answer is not None,
                                             cancel, asyncio.get_running_loop())
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
        return {"id": problem.id, "model": model, "env": env_name, **out}

    def _episode(self, model: str, env: Env, problem: Problem, spec: EpisodeSpec, graded: bool,
                 cancel: CancelToken, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        """On a solve thread: the episode and its result, grading under the request's time limit."""
        stopped = False
        try:
            bounded: Any = BoundedEnv(env, self._grader, self.cfg.serve.grade_timeout_s, cancel.event)
            engine = LoopEngine(self, model, self.max_model_len[model], loop, cancel)
            (traj,) = run_episodes(engine, bounded, [problem], spec)
            return solve_result(traj, bounded, spec.turns, graded)
        except Cancelled:
            stopped = True
            raise
        finally:
            self._slots.give(stopped)


def _metrics_export_url() -> str:
    """Ray's Prometheus export of this process's node (every Ray process's metrics on that node)."""
    import ray

    me = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == me)
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


ENDPOINTS = {
    **DEFAULT_ENDPOINTS,
    "solve": lambda app: app.post("/v1/rise/solve"),
    "healthz": lambda app: app.get("/healthz"),
    "health": lambda app: app.get("/health"),
    "metrics": lambda app: app.get("/metrics"),
}


def ingress_class(cfg: RunConfig, token_sha256: str | None) -> type:
    """RiseIngress as a Serve ingress over its own FastAPI app (one per application: the app carries
    this config's body limit and token)."""
    return make_fastapi_ingress(RiseIngress, endpoint_map=ENDPOINTS, app=http_app(cfg, token_sha256))
