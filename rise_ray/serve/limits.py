"""Request limits of the HTTP API: body size, seeds, special tokens."""

from __future__ import annotations

import re
from collections.abc import Iterable

from fastapi import Request

from rise_ray.serve.schemas import SEED_MAX, ApiError


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
