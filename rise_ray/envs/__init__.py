"""Environments by name: `get_env("gsm8k", test_path=...)` is the one entry point the rest uses.

Options are checked against the builder's signature plus the shared Env fields, so a typo in a
config fails at once with its name instead of being silently ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rise_ray.envs.arithmetic import ArithmeticEnv, check_line, make_arithmetic
from rise_ray.envs.base import DataError, Env, Grade, Problem
from rise_ray.envs.gsm8k import GSM8KEnv, make_gsm8k
from rise_ray.envs.math import MathEnv, make_math
from rise_ray.envs.search import SearchEnv, make_search

if TYPE_CHECKING:
    from rise_ray.config import EnvConfig

# Env fields any builder taking **env_fields accepts (rewards, prompt and feedback text)
ENV_FIELDS = ("system_prompt", "feedback", "repeat_question", "correct_reward", "wrong_reward", "unparsed_reward",
              "grading")

REGISTRY: dict[str, Callable[..., Env]] = {
    "arithmetic": make_arithmetic,
    "gsm8k": make_gsm8k,
    "math": make_math,
    "search": make_search,
}


def register_env(name: str, builder: Callable[..., Env]) -> None:
    """Add an environment; `builder(**options)` returns the Env."""
    REGISTRY[name] = builder


def accepted_options(name: str) -> list[str]:
    """The option names `get_env(name, ...)` accepts (env_options: their values from a config)."""
    params = inspect.signature(REGISTRY[name]).parameters.values()
    names = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_KEYWORD for p in params):
        names += [f for f in ENV_FIELDS if f not in names]
    return names


def get_env(name: str, **options) -> Env:
    """The environment `name` built with `options` (paths, caps, rewards, env-specific settings).

    Unknown name: ValueError listing the known ones. Unknown option: TypeError naming it.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown env {name!r}; known envs: {sorted(REGISTRY)}")
    allowed = accepted_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"env {name!r} got unknown option(s) {unknown}; it accepts {sorted(allowed)}")
    for cap in ("num_train", "num_test"):
        v = options.get(cap)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"env {name!r}: {cap} must be a non-negative int or None, got {v!r}")
    return REGISTRY[name](**options)


def make_env(cfg: EnvConfig, with_data: bool = True):
    """The environment with its problems (without: only what grading and prompting need); a bad
    name or option is a ConfigError naming it."""
    from rise_ray.config import ConfigError

    try:
        return get_env(cfg.name, **env_options(cfg, with_data=with_data))
    except (TypeError, ValueError) as e:
        if type(e).__name__ == "DataError":
            raise
        raise ConfigError(f"env (name={cfg.name!r}, options={cfg.options}): {e}") from None


def env_options(cfg: EnvConfig, with_data: bool = True) -> dict[str, Any]:
    """Options for `get_env` from the config's env section. Without data: only what grading and
    prompting need (cheap to build in every worker)."""
    opts: dict[str, Any] = {
        "unparsed_reward": cfg.unparsed_reward,
        "feedback": cfg.feedback,
        "repeat_question": cfg.repeat_question,
        **cfg.options,
    }
    if cfg.grading != "default":  # only then: envs registered without a `grading` option keep working
        opts["grading"] = cfg.grading
    if with_data:
        opts.update(train_path=cfg.train_path, test_path=cfg.test_path, num_train=cfg.num_train, num_test=cfg.num_test)
    else:
        # Generated envs would otherwise draw their default split sizes in every worker, more than
        # a small problem space (e.g. arithmetic ranges chosen for a 400-problem run) holds.
        opts.update({k: 0 for k in ("num_train", "num_test") if k in accepted_options(cfg.name)})
    return opts


__all__ = [
    "ENV_FIELDS",
    "REGISTRY",
    "ArithmeticEnv",
    "DataError",
    "Env",
    "GSM8KEnv",
    "Grade",
    "MathEnv",
    "Problem",
    "SearchEnv",
    "accepted_options",
    "check_line",
    "env_options",
    "get_env",
    "make_env",
    "register_env",
]
