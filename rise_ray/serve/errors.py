"""Every failure answers in the OpenAI error shape: {"error": {"message", "type", "param", "code"}}.

Bad requests raise ApiError (rise_ray.serve.schemas); Starlette's own errors (404, 405) are
rewritten; anything else (a bug, an engine that died) is a 500 `server_error` with the exception's
class and a request id to look up in the replica's log, never Starlette's plain-text 500.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rise_ray.serve.schemas import ApiError

logger = logging.getLogger("ray.serve")


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    err = ApiError(exc.status_code, str(exc.detail), None, "not_found" if exc.status_code == 404 else None)
    return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


class JsonErrors:
    """ASGI middleware: an exception no handler took becomes a JSON 500 (when no response has
    started yet; a stream already sent can only be cut)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as e:
            rid = uuid.uuid4().hex
            logger.exception("request %s failed", rid)
            if started:
                raise
            err = ApiError(500, f"internal error ({type(e).__name__}); request id {rid} in the server's log",
                           None, "internal_error")
            await JSONResponse(err.body(), status_code=500)(scope, receive, send)


def install(api: FastAPI) -> None:
    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_middleware(JsonErrors)
