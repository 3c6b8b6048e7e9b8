"""The Serve app: Ray Serve LLM's OpenAI API (vLLM's own serving code) with RISE's solve on top.

One ingress deployment (`RiseIngress`, a subclass of Ray Serve LLM's `OpenAiIngress`) in front of
one `LLMServer` deployment per model (rise_ray.serve.llm_config). Steps of a request:
  1. `BodyLimit`: a body over serve.max_body_bytes is 413 before anything parses it; `BearerAuth`:
     every route but /healthz and /health needs the bearer token when one is set (both in
     rise_ray.serve.limits, with the error handlers that answer in the OpenAI shape);
  2. the OpenAI routes (/v1/chat/completions, /v1/completions, /v1/models, /tokenize, ...) are
     OpenAiIngress's own: vLLM's request models validate, its serving code generates, streams and
     answers errors. Chat message text first has its special tokens kept text (TextOnly);
  3. /v1/rise/solve drives the episode generator (rise_ray.rollout.episodes.episode) from the
     event loop: each turn is an awaited chat request to the model's LLMServer through the handle
     Serve gave the ingress; grading runs in time-limited child processes (rise_ray.serve.grading).
     With "stream": true each attempt is a server-sent event once graded. Serve's
     max_ongoing_requests admits requests; a client that goes away cancels the task, and with it
     the turn in flight (vLLM aborts it) or the grading call (its process is killed);
  4. /healthz reports the ingress and each model's engine (LLMServer.check_health): 503 when one
     is dead, while Serve's own health check replaces that replica; /health and /metrics answer
     as vLLM's own server's do (/metrics: Ray's Prometheus export of this node).

    serve run rise_ray.serve.deploy:build_app checkpoint=/path/to/model      # or `rise serve`
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest
from starlette.responses import Response
from vllm.entrypoints.serve.engine.protocol import ErrorResponse

from rise_ray.compat import serve_openai_routes
from rise_ray.config import RunConfig
from rise_ray.envs.base import Env, Problem
from rise_ray.progress import EpisodeTally
from rise_ray.rollout.engine import Completion, Conversation, SamplingParams
from rise_ray.rollout.episodes import EpisodeSpec, Trajectory, advance, episode
from rise_ray.serve.auth import replica_token_digest
from rise_ray.serve.grading import GraderPool, RequestGrader, serve_env
from rise_ray.serve.limits import TextOnly, check_seed, http_app
from rise_ray.serve.results import ServeMetrics, solve_result
from rise_ray.serve.schemas import ApiError, SolveRequest, parse

HEALTH_TIMEOUT_S = 10.0  # an engine that cannot answer its health check within this is reported dead


# -- the ingress ----------------------------------------------------------------------------------------
@dataclass
class PromptLength:
    """What an episode asks of its engine before each turn (rise_ray.rollout.engine.Engine's
    prompt_len and max_model_len): the prompt's tokens, by the model's own chat template."""

    tokenizer: Any
    max_model_len: int

    def prompt_len(self, conversation: Conversation) -> int:
        return len(self.tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True,
                                                      return_dict=False))


@dataclass
class Solve:
    """One checked /v1/rise/solve request: what its episode needs."""

    model: str
    env_name: str
    problem: Problem
    spec: EpisodeSpec
    grader: RequestGrader
    graded: bool  # the request gave the gold answer


def sse(obj: Any) -> str:
    """One server-sent event, as OpenAI's streams write them."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


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
        # The engines' deployment handles, as Serve passes them: solve's chat calls stream (LLMServer.chat
        # is a generator), /healthz calls check_health.
        self.engines = dict(llm_deployments)
        self.chat_handles = {m: h.options(stream=True) for m, h in self.engines.items()}
        self.prompts = {m: PromptLength(AutoTokenizer.from_pretrained(d), int(model_cards[m].metadata[
            "max_request_context_length"])) for m, d in model_dirs.items()}
        tok = self.prompts[default_model].tokenizer
        special = {*tok.all_special_tokens,
                   *(t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special)}
        self._text_only = TextOnly(special)
        self._grader = GraderPool(s.grade_workers)  # ends with this replica's process
        self._grader.warm()
        self.default_env = s.env or self.cfg.env.name
        self._envs: dict[str, Env] = {self.default_env: serve_env(self.cfg, self.default_env)}  # broken: fail now
        self.metrics = ServeMetrics()
        self._metrics_url: str | None = None
        self.solving = 0  # solve requests running now (Serve's max_ongoing_requests bounds them)
        self.abandoned = 0  # solve requests stopped because their client went away

    async def _env(self, name: str) -> Env:
        if name not in self._envs:  # built off the loop (an env's first build imports its grader)
            self._envs[name] = await asyncio.to_thread(serve_env, self.cfg, name)
        return self._envs[name]

    async def _chat(self, model: str, conversation: Conversation, n: int, params: SamplingParams) -> list[Completion]:
        """One chat request to the model's LLMServer, through the handle Serve gave this ingress (the
        call the OpenAI route makes; vLLM batches it with every other request). Cancelling the
        awaiting task cancels it in the engine."""
        body = ChatCompletionRequest(model=model, messages=conversation, n=n, temperature=params.temperature,
                                     top_p=params.top_p, max_tokens=params.max_tokens, seed=params.seed)
        (out,) = [o async for o in self.chat_handles[model].chat.remote(body)]  # not streamed: one response
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
        for model, handle in self.engines.items():
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
                "solve": {"in_flight": self.solving, "cancelled": self.abandoned}}
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

    async def solve(self, request: Request) -> Response:
        """/v1/rise/solve: the episode's result as one JSON object, or with "stream": true each attempt
        as a server-sent event the moment it is graded, then the result, then `data: [DONE]`."""
        req = parse(SolveRequest, await request.body())
        run = await self._check(req)
        if req.stream:
            return StreamingResponse(self._events(run), media_type="text/event-stream")
        async for event in self._solve(run):
            result = event
        return JSONResponse(result)

    async def _check(self, req: SolveRequest) -> Solve:
        """The request's episode, or ApiError(4xx) naming what the server's limits refuse."""
        s, ev = self.cfg.serve, self.cfg.eval
        model = req.model or self.default_model
        if model not in self.prompts:
            raise ApiError(404, f"model: {model!r} is not served here; served: {sorted(self.prompts)}",
                           "model", "model_not_found")
        env_name = req.env or self.default_env
        env = await self._env(env_name)
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
        prompt_tokens = self.prompts[model].prompt_len(env.first_prompt(problem))
        context = self.prompts[model].max_model_len
        if prompt_tokens + params.max_tokens > context:
            raise ApiError(400, f"problem: the prompt is {prompt_tokens} tokens; with max_tokens {params.max_tokens} "
                           f"that exceeds the model's context of {context} tokens", "problem", "context_length_exceeded")
        spec = EpisodeSpec(turns=turns, params=params, choose="first", oracle=req.oracle,
                           context_window=req.context_window)
        grader = RequestGrader(env, self._grader, s.grade_timeout_s)
        return Solve(model, env_name, problem, spec, grader, req.answer is not None)

    async def _solve(self, run: Solve) -> AsyncIterator[dict[str, Any]]:
        """The episode (rise_ray.rollout.episodes.episode), driven from the event loop: each turn's
        chat call is awaited, its replies are graded in the grading processes, and the attempt is
        yielded; the last item is the response body. A client that goes away cancels the task:
        the turn in flight stops in the engine, a grading call in progress is killed."""
        traj = Trajectory(run.problem.id, run.problem.question, run.problem.reference)
        steps = episode(run.grader, run.problem, traj, run.spec, self.prompts[run.model], None, EpisodeTally(), 0)
        self.solving += 1
        try:
            turn = advance(steps, None)
            while turn is not None:
                _, conversation, n, params = turn
                replies = await self._chat(run.model, conversation, n, params)
                for reply in replies:
                    await run.grader.grade(reply.text, run.problem)
                turn = advance(steps, replies)  # the episode keeps the attempt (grades read back)
                last = traj.turns[-1]
                yield {"turn": len(traj.turns), "reply": last.response, "answer": last.answer,
                       "correct": last.correct if run.graded else None}
            for answer in {t.answer for t in traj.turns}:
                await run.grader.key(answer)
            out = solve_result(traj, run.grader, run.spec.turns, run.graded)
            self.metrics.solved(run.env_name, run.spec.oracle, out)
            yield {"id": run.problem.id, "model": run.model, "env": run.env_name, **out}
        except (asyncio.CancelledError, GeneratorExit):
            self.abandoned += 1
            raise
        finally:
            steps.close()
            self.solving -= 1

    async def _events(self, run: Solve) -> AsyncIterator[str]:
        """_solve as server-sent events; an error after the first event is an event too (the status
        line is sent)."""
        try:
            async for event in self._solve(run):
                yield sse(event)
        except ApiError as err:
            yield sse(err.body())
        yield sse("[DONE]")


def _metrics_export_url() -> str:
    """Ray's Prometheus export of this process's node (every Ray process's metrics on that node)."""
    import ray

    me = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == me)
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


ENDPOINTS = {
    **serve_openai_routes(),
    "solve": lambda app: app.post("/v1/rise/solve"),
    "healthz": lambda app: app.get("/healthz"),
    "health": lambda app: app.get("/health"),
    "metrics": lambda app: app.get("/metrics"),
}


def ingress_class(cfg: RunConfig, token_sha256: str | None) -> type:
    """RiseIngress as a Serve ingress over its own FastAPI app (one per application: the app carries
    this config's body limit and token)."""
    return make_fastapi_ingress(RiseIngress, endpoint_map=ENDPOINTS, app=http_app(cfg, token_sha256))
