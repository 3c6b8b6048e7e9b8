"""Rollout engines; `make_engine` picks one by name so configs can say `engine: hf | vllm` (a teacher also `solver`)."""

from __future__ import annotations

from typing import Any

from rise_ray.rollout.engine import Engine

ENGINE_KINDS = ("hf", "vllm", "solver")


def make_engine(kind: str | type, model_path: str, **kwargs: Any) -> Engine:
    """Build an engine; imports lazily so `hf` works where vLLM is not installed. `kind` may also be
    an engine class of one's own (called with the model path and the engine kwargs)."""
    if isinstance(kind, type):
        return kind(model_path, **kwargs)
    if kind == "hf":
        from rise_ray.rollout.hf import HFEngine

        return HFEngine(model_path, **kwargs)
    if kind == "vllm":
        from rise_ray.rollout.vllm import VLLMEngine

        return VLLMEngine(model_path, **kwargs)
    if kind == "solver":  # a programmatic teacher for the arithmetic env (distillation)
        from rise_ray.rollout.solver import ArithmeticSolver

        return ArithmeticSolver(model_path, **kwargs)
    raise ValueError(f"unknown engine kind {kind!r}; known kinds: {', '.join(ENGINE_KINDS)}")
