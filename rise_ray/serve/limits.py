"""Request limits of the HTTP API: body size, seeds, special tokens, and solve work in flight."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterable
from concurrent.futures import CancelledError, Future
from typing import Any, Protocol

from fastapi import Request

from rise_ray.rollout.engine import Completion, Conversation, SamplingParams
from rise_ray.serve.schemas import SEED_MAX, ApiError


class _Generates(Protocol):
    """What LoopEngine needs of the ingress (RiseIngress): prompt lengths and its async generate."""

    def prompt_len(self, model: str, conversation: Conversation) -> int: ...

    def generate(self, model: str, conversations: list[Conversation], n: int, params: SamplingParams) -> Any: ...


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, or 413 once it is known to exceed `limit` bytes: from Content-Length before
    reading anything, else while it streams in (nothing over the limit is kept)."""
    too_big = ApiError(413, f"request body: larger than this server's limit of {limit} bytes", "body",
                       "request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def check_seed(seed: int | None, turns: int = 1) -> None:
    """A seed the engines take for every turn (seed + turn - 1), else 400 naming `seed`."""
    if seed is not None and not 0 <= seed <= SEED_MAX - (turns - 1):
        raise ApiError(400, f"seed: must be in [0, {SEED_MAX - (turns - 1)}] (64-bit, room for {turns} turns)", "seed")


class TextOnly:
    """Makes the tokenizer's special tokens ("<|end|>", "<|im_start|>", ...) written inside
    message content stay text: a zero-width space after their first character keeps the chat
    template's own tokens the only structure in the prompt."""

    def __init__(self, special_tokens: Iterable[str]) -> None:
        toks = sorted({t for t in special_tokens if len(t) > 1}, key=len, reverse=True)
        self._re = re.compile("|".join(map(re.escape, toks))) if toks else None

    def __call__(self, text: str) -> str:
        if self._re is None:
            return text
        while self._re.search(text):  # inserting never forms a token, but overlaps can hide one
            text = self._re.sub(lambda m: m.group(0)[0] + "\u200b" + m.group(0)[1:], text)
        return text


class Cancelled(Exception):
    """The client of a solve request went away: its episode stops at the next engine call."""


class SolveSlots:
    """The solve threads' work, counted while it really runs (a cancelled request's thread counts
    until it stops), so a full replica answers 503 instead of queueing without bound."""

    def __init__(self, size: int, retry_after_s: float) -> None:
        self.size = size
        self.in_flight = 0
        self.cancelled = 0  # episodes stopped early because their client went away
        self._lock = threading.Lock()
        self._retry = str(int(retry_after_s)) if float(retry_after_s).is_integer() else str(retry_after_s)

    def take(self) -> None:
        with self._lock:
            if self.in_flight >= self.size:
                raise ApiError(503, f"this replica is running {self.size} solve requests already; retry later",
                               None, "overloaded", headers={"Retry-After": self._retry})
            self.in_flight += 1

    def give(self, cancelled: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            self.cancelled += cancelled


class CancelToken:
    """Shared by a solve handler and its thread: set when the client goes away; cancels the engine
    call the thread waits on (its queued batch job is then dropped) and refuses further calls."""

    def __init__(self) -> None:
        self.event = self._event = threading.Event()
        self._lock = threading.Lock()
        self._current: Future[Any] | None = None

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            if self._current is not None:
                self._current.cancel()

    def run(self, coro: Any, loop: asyncio.AbstractEventLoop) -> Any:
        """Run `coro` on `loop` from a worker thread, unless cancelled."""
        with self._lock:
            if self._event.is_set():
                coro.close()
                raise Cancelled()
            fut = self._current = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return fut.result()
        except (CancelledError, asyncio.CancelledError):
            raise Cancelled() from None
        finally:
            with self._lock:
                self._current = None


class LoopEngine:
    """The Engine protocol for run_episodes on a worker thread: generate() runs the ingress's async
    generate for `model` on its event loop, cancelled with the request."""

    def __init__(self, server: _Generates, model: str, max_model_len: int, loop: asyncio.AbstractEventLoop,
                 cancel: CancelToken) -> None:
        self.server, self.model, self.max_model_len = server, model, max_model_len
        self.loop = loop
        self.cancel = cancel

    def prompt_len(self, conversation: Conversation) -> int:
        return self.server.prompt_len(self.model, conversation)

    def generate(self, conversations: list[Conversation], n: int, params: SamplingParams) -> list[list[Completion]]:
        return self.cancel.run(self.server.generate(self.model, conversations, n, params), self.loop)
