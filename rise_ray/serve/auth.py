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


def replica_token_digest(token_sha256: str | None, token_env: str, require_token: bool) -> str | None:
    """The digest a replica checks against: the one given at build time, else the SHA-256 of
    $token_env. None (no auth) only when neither is set and the token is not required."""
    if token_sha256 is None and token_env in os.environ:
        token = os.environ[token_env]
        if not token.strip():
            raise ValueError(f"${token_env} is set but blank: refusing to serve without a token")
        token_sha256 = token_digest(token)
    if token_sha256 is None and require_token:
        raise RuntimeError(f"serve.require_token: ${token_env} is not set on this replica: refusing to start")
    return token_sha256
