"""The body of /v1/rise/solve (the OpenAI routes use vLLM's request models), and the error every
bad solve request gets.

Bodies are parsed strictly from the raw bytes (`parse`): malformed JSON, a missing field or a
wrong type (a string where a number goes, 1 for a bool) is a 400 whose JSON names the field, in
the OpenAI error shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

M = TypeVar("M", bound=BaseModel)
SEED_MAX = 2**63 - 1  # seeds reach torch's and vLLM's 64-bit generators


class ApiError(Exception):
    """An HTTP error with an OpenAI-style JSON body; `param` names the offending field."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class SolveRequest(BaseModel):
    """POST /v1/rise/solve: one problem, a multi-turn self-improvement episode."""

    model_config = ConfigDict(extra="forbid")  # our own API: a misspelt field is an error

    problem: str = Field(min_length=1)
    model: str | None = None  # a model id of /v1/models; None: the server's default (the latest)
    env: str | None = None  # None: the server's default env
    turns: int | None = Field(None, ge=1)  # None: eval.turns (capped at serve.max_turns)
    oracle: bool = False  # stop at the first correct attempt (needs `answer`)
    answer: str | None = None  # the gold answer, if known: attempts are graded against it
    context_window: int | None = Field(None, ge=1)  # keep only the latest k attempts in the prompt
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)  # None: eval.temperature
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1)  # per attempt; None: eval.max_tokens
    seed: int | None = Field(None, ge=0, le=SEED_MAX)  # turn t samples with seed + t - 1
    stream: bool = False  # each attempt as a server-sent event once graded, then the result, then [DONE]


def param_name(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse(model: type[M], body: bytes) -> M:
    """The request model from raw JSON bytes, or ApiError(400) naming the first bad field."""
    try:
        return model.model_validate_json(body or b"", strict=True)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] in ("json_invalid", "json_type"):
            raise ApiError(400, f"request body is not valid JSON: {err['msg']}", "body", "invalid_json") from None
        if not err["loc"]:
            raise ApiError(400, f"request body: {err['msg']}", "body") from None
        param = param_name(err["loc"])
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise ApiError(400, f"{param}: {msg}", param) from None
