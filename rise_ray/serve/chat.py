"""/v1/chat/completions on the async engine (vLLM's AsyncLLM, continuous batching).

Each request is its own engine request in the running batch: streamed replies go out as SSE chunks
while tokens are decoded (vLLM's DELTA outputs), a client that goes away cancels the handler, which
closes the engine stream and so aborts the request (its batch slot and KV blocks are freed at the
next step). `stop`, `logprobs` / `top_logprobs` and `seed` go to vLLM as OpenAI defines them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from rise_ray.rollout.engine import Completion, SamplingParams
from rise_ray.serve.results import sse_events
from rise_ray.serve.schemas import ApiError, ChatRequest

MAX_STOP = 4  # OpenAI's limit on stop sequences


def check_chat(req: ChatRequest, async_engine: bool) -> list[str]:
    """400 for a parameter this server would not honour; returns the stop sequences."""
    name = req.unsupported()
    if name is not None:
        raise ApiError(400, f"{name}: not supported by this server (supported: messages, model, n, temperature, "
                       "top_p, max_tokens, max_completion_tokens, seed, stop, logprobs, top_logprobs, stream, "
                       "stream_options, user)", name, "unsupported_parameter")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise ApiError(400, f"stop: at most {MAX_STOP} non-empty strings", "stop")
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
    if not async_engine:
        for param, given in (("stop", bool(stop)), ("logprobs", bool(req.logprobs))):
            if given:
                raise ApiError(400, f"{param}: not supported by the transformers engine (serve.engine=vllm has it)",
                               param, "unsupported_parameter")
    return stop


def _token_logprobs(o: Any, k: int) -> list[dict[str, Any]]:
    """OpenAI's logprobs.content entries for the tokens of one (delta) output."""
    out = []
    for tid, step in zip(o.token_ids, o.logprobs or [], strict=False):
        chosen = step[tid]
        top = sorted((lp for lp in step.values() if lp.rank is not None and lp.rank <= k), key=lambda lp: lp.rank)[:k]
        out.append({"token": chosen.decoded_token or "", "logprob": chosen.logprob,
                    "bytes": list((chosen.decoded_token or "").encode()),
                    "top_logprobs": [{"token": t.decoded_token or "", "logprob": t.logprob,
                                      "bytes": list((t.decoded_token or "").encode())} for t in top]})
    return out


def _reason(o: Any) -> str:
    return "stop" if o.finish_reason == "stop" else "length"


class ChatRun:
    """One chat request on the async engine: its vLLM sampling settings and the response, whole or
    streamed. Greedy with n > 1 runs once and repeats the reply (vLLM refuses n > 1 when greedy)."""

    def __init__(self, engine: Any, model: str, req: ChatRequest, prompt_ids: list[int], n: int,
                 params: SamplingParams, stop: list[str], stream: bool) -> None:
        from vllm.sampling_params import RequestOutputKind

        self.engine, self.model, self.prompt_ids, self.n = engine, model, prompt_ids, n
        self.fan = n if params.temperature <= 0 else 1
        self.k = req.top_logprobs or 0
        self.want_logprobs = bool(req.logprobs)
        self.with_usage = bool((req.stream_options or {}).get("include_usage"))
        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        self.sampling = engine.sampling(params, n // self.fan, stop=stop or None, output_kind=kind,
                                        logprobs=self.k if self.want_logprobs else None)
        self.rid, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def _indexes(self, o: Any) -> range:
        return range(o.index * self.fan, o.index * self.fan + self.fan)

    async def start(self) -> AsyncIterator[Any]:
        """The engine stream with its first output already taken: a request vLLM refuses is a 400
        here, before any response has started."""
        stream = self.engine.stream(self.prompt_ids, self.sampling, self.rid)
        try:
            first = await stream.__anext__()
        except ValueError as e:
            await stream.aclose()
            raise ApiError(400, f"request refused by the engine: {e}", None) from None

        async def rest() -> AsyncIterator[Any]:
            try:
                yield first
                async for out in stream:
                    yield out
            finally:  # a response cut short (client gone) aborts the engine request now
                await stream.aclose()

        return rest()

    def _usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": completion_tokens,
                "total_tokens": len(self.prompt_ids) + completion_tokens}

    def whole(self, final: Any) -> dict[str, Any]:
        choices, tokens = [], 0
        for o in sorted(final.outputs, key=lambda o: o.index):
            lp = {"content": _token_logprobs(o, self.k)} if self.want_logprobs else None
            for i in self._indexes(o):
                tokens += len(o.token_ids)
                choices.append({"index": i, "message": {"role": "assistant", "content": o.text},
                                "finish_reason": _reason(o), "logprobs": lp})
        return {"id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage(tokens)}

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"

    async def events(self, outputs: AsyncIterator[Any]) -> AsyncIterator[str]:
        """SSE chunks as vLLM decodes: the role first, then each delta, each choice's finish."""
        tokens = 0
        yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                           for i in range(self.n)])
        async for out in outputs:
            for o in out.outputs:
                tokens += len(o.token_ids) * self.fan
                lp = {"content": _token_logprobs(o, self.k)} if self.want_logprobs else None
                if o.text or o.token_ids:
                    yield self._chunk([{"index": i, "delta": {"content": o.text}, "finish_reason": None,
                                        "logprobs": lp} for i in self._indexes(o)])
                if o.finish_reason is not None:
                    yield self._chunk([{"index": i, "delta": {}, "finish_reason": _reason(o)} for i in self._indexes(o)])
        if self.with_usage:
            yield self._chunk([], usage=self._usage(tokens))
        yield "data: [DONE]\n\n"


async def chat_async(engine: Any, model: str, req: ChatRequest, prompt_ids: list[int], n: int,
                     params: SamplingParams, stop: list[str]) -> Any:
    """A chat request on the async engine: the whole response, or a StreamingResponse of SSE."""
    run = ChatRun(engine, model, req, prompt_ids, n, params, stop, bool(req.stream))
    outputs = await run.start()
    if req.stream:
        return StreamingResponse(run.events(outputs), media_type="text/event-stream")
    final = None
    async for out in outputs:
        final = out
    return run.whole(final)


def wave_reply(
    model: str, req: ChatRequest, outs: list[Completion], prompt_tokens: int, completion_tokens: int
) -> Any:
    """The response to a chat request the transformers engine answered whole (streamed: one content
    chunk per choice)."""
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    texts = [o.text for o in outs]
    reasons = ["stop" if o.finished else "length" for o in outs]
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if req.stream:
        with_usage = bool((req.stream_options or {}).get("include_usage"))
        events = sse_events(model, rid, created, texts, reasons, usage if with_usage else None)
        return StreamingResponse(events, media_type="text/event-stream")
    choices = [
        {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": r, "logprobs": None}
        for i, (text, r) in enumerate(zip(texts, reasons, strict=True))
    ]
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage}
