"""Where a resolved config's values come from (schema default, file, override), and where it
departs from the paper's protocol (`rise config show`, and the list `rise run` prints at start).
"""

from __future__ import annotations

from typing import Any

import yaml

from rise_ray.config import RunConfig, load_config, parse_overrides, read_yaml

# The fields that make up RISE's method as the paper runs it: the feedback, how trajectories are
# collected and improved, how turns are weighted into the training data, the learning rate, and the
# evaluation. The schema's default of each is the paper's value; a config may depart from it (the
# embedded default does, for a tiny model on a laptop), and `rise run` says where it does.
PROTOCOL_FIELDS = (
    "env.feedback", "env.repeat_question", "env.unparsed_reward",
    "rollout.turns", "rollout.best_of_n", "rollout.improve_with", "rollout.stop_when_correct", "rollout.improve_distinct",
    "data.criteria", "data.tau", "data.center_rewards", "data.max_weight", "data.only_successful",
    "data.dedupe", "data.stop_at_correct", "data.turns_after_correct", "data.after_correct_weight",
    "data.aggregate",
    "train.lr",
    "eval.turns", "eval.parallel",
)  # fmt: skip


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1, 'c': {}}} -> {'a.b': 1, 'a.c': {}}: dotted keys of the leaves (lists and empty
    mappings are leaves)."""
    if not isinstance(data, dict) or (not data and prefix):
        return {prefix: data}
    out: dict[str, Any] = {}
    for k, v in data.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _set_in(key: str, keys: set[str]) -> bool:
    """The leaf `key` was given by one of `keys` (itself, or a mapping above it set as a whole)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in keys for i in range(1, len(parts) + 1))


def config_sources(path: str | None = None, overrides: list[str] | None = None) -> list[tuple[str, Any, str]]:
    """The resolved config (load_config) as (dotted key, value, source) rows in schema order; source
    is "default" (the schema's), "file" (the YAML at `path`) or "override" (a key=value)."""
    cfg = load_config(path, overrides)  # validated first: a bad config fails as it does for a run
    from_file = set(flatten(read_yaml(path))) if path else set()
    from_override = set(flatten(parse_overrides(overrides or [])))
    rows = []
    for key, value in flatten(cfg.model_dump(mode="json")).items():
        source = "override" if _set_in(key, from_override) else "file" if _set_in(key, from_file) else "default"
        rows.append((key, value, source))
    return rows


def protocol_departures(cfg: RunConfig) -> list[tuple[str, Any, Any]]:
    """(dotted key, this config's value, the paper's value) for every protocol field where they differ."""
    mine = flatten(cfg.model_dump(mode="json"))
    paper = flatten(RunConfig().model_dump(mode="json"))
    return [(k, mine[k], paper[k]) for k in PROTOCOL_FIELDS if mine[k] != paper[k]]


def format_value(value: Any) -> str:
    """A value as a key=value override would write it (YAML flow style: true, null, [a, b], {k: v})."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def describe_departures(cfg: RunConfig, prefix: str = "") -> str:
    """The settings in which `cfg` is not the paper's protocol, one a line (what `rise run` prints
    at its start)."""
    rows = protocol_departures(cfg)
    if not rows:
        return f"{prefix}protocol: the paper's in every protocol setting"
    width = max(len(k) for k, _, _ in rows)
    lines = [f"{prefix}protocol: departs from the paper's in {len(rows)} setting(s):"]
    lines += [f"{prefix}  {k:<{width}}  {format_value(v)}  (paper: {format_value(p)})" for k, v, p in rows]
    return "\n".join(lines)
