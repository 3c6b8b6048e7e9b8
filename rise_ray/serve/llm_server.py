"""The LLMServer deployment class of `rise serve`: Ray Serve LLM's own, with /tokenize working
(its engine: rise_ray.compat.serve_tokenizing_engine, which says why)."""

from __future__ import annotations

from ray.serve.llm.deployment import LLMServer

from rise_ray.compat import serve_tokenizing_engine


class RiseLLMServer(LLMServer):
    _default_engine_cls = serve_tokenizing_engine()
