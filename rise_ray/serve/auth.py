"""The bearer token: read from the environment variable serve.token_env, compared by SHA-256."""

from __future__ import annotations

import hashlib
import os

from rise_ray.config import RunConfig


def token_digest(token: str) -> str:
    """SHA-256 of the token without surrounding whitespace (a token read from a file or an
    environment variable often ends in a newline; clients send it without)."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


def read_token(cfg: RunConfig) -> str | None:
    """The bearer token from $serve.token_env (stripped); None when unset. A blank one is an error:
    a deployment meant to have a token never serves without one."""
    s = cfg.serve
    token = os.environ.get(s.token_env)
    if token is None:
        return None
    if not token.strip():
        raise ValueError(f"${s.token_env} is set but blank: refusing to serve without a token")
    return token.strip()
