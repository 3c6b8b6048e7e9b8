"""The HTTP layer in front of the routes: the body size limit and bearer auth (pure ASGI
middleware: streamed replies pass through untouched), errors in the OpenAI shape, seeds, and
special tokens kept text. `http_app` is Ray Serve LLM's FastAPI app with these added."""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rise_ray.compat import serve_openai_app
from rise_ray.config import RunConfig
from rise_ray.serve.auth import replica_token_digest, token_digest
from rise_ray.serve.schemas import SEED_MAX, ApiError, param_name


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
    app = serve_openai_app()
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(BodyLimit, limit=cfg.serve.max_body_bytes)
    app.add_middleware(BearerAuth, token_sha256=token_sha256, token_env=cfg.serve.token_env,
                       require_token=cfg.serve.require_token)  # added last: runs first
    return app
