"""Trajectories -> reward-weighted training examples (the RISE SFT data set).

Steps, per trajectory (one problem, one rollout):
  1. prepare: drop empty and repeated responses (the paper's `remove_duplication`) and cut the
     trajectory after its first correct turn (the paper's conversion stops there too);
     optionally skip the trajectory unless it ends correct (`only_successful`);
  2. select the turns to train on with the paper's criteria: `all`, `better` (reward above the
     previous turn's), `best` (no earlier turn did better), `success` (correct turns). As in the
     paper's code the first turn is always kept except under `success`. Degenerate turns (runaway
     repetitions) stay in the context but are never trained;
  3. weight each trained turn `exp(r / tau)` (optionally with the prompt's mean reward subtracted
     first, the AWR-like variant), capped at `max_weight`; a turn after the first correct one
     also times `after_correct_weight`, the first turn times `first_turn_weight` (a turn of weight 0
     is not trained);
  4. assemble each trained turn's ids from stored ids, in the conversation the rollout engine
     built (`build_conversation`: same env feedback, same context window): the chat template's
     texts tokenized, each assistant reply as the ids the engine sampled (rise_ray.data.assemble),
     so every trained reply token is the sampled one. Weights: 0 on context, `weight / n` on the
     n tokens of the reply (the template's end-of-turn tokens after it included);
  5. lay out rows:
       - `prefix` (the paper's code): one row per trained turn, the loss only on its last turn;
       - `packed` (ours): prefix examples that are token-prefixes of one another share one row,
         each turn weighted in place. A causal model sees the same context at every position,
         so a packed row's loss is exactly the sum of its prefix examples' losses.

Step 4 is the one place a turn's weight becomes token weights (rise_ray.data.layout `_row`); rise_ray.train.loop's
`weighted_loss_sum` is the one place they multiply the loss, and its docstring states the
normalisation (by `units`, the prefix examples a row holds).

Too-long examples (more than `max_length` tokens) lose context tokens from the left, or are
dropped (`overflow`); an example whose reply alone does not fit is always dropped. Both are
counted in the stats and logged, never silent.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rise_ray.config import DataConfig, RunConfig
from rise_ray.data.assemble import TemplateError, assemble, encode_texts, example_segments, reply_ids
from rise_ray.data.layout import TurnExample, fit_length, layout_rows
from rise_ray.data.store import FORMAT, BuildError, read_trajectories, write_dataset
from rise_ray.data.store import is_dataset_dir as is_dataset_dir
from rise_ray.data.store import read_rows as read_rows
from rise_ray.data.store import read_stats as read_stats
from rise_ray.envs.base import Env, Problem
from rise_ray.rollout.episodes import Trajectory, Turn, build_conversation

log = logging.getLogger(__name__)


# --- 1. prepare -----------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A trajectory after dropping duplicates and the turns after the first correct one."""

    traj: Trajectory
    turns: list[Turn]
    counts: dict[str, int] = field(default_factory=dict)
    first_correct: int | None = None  # index in `turns` of the first correct one


def prepare(
    traj: Trajectory, dedupe: bool = True, stop_at_correct: bool = True, turns_after_correct: int | None = None
) -> Prepared:
    """Drop empty / repeated responses (compared stripped, kept verbatim) and cut after the first
    correct turn (`stop_at_correct`), or `turns_after_correct` turns after it. Dropped turns leave
    the context too, as in the paper's code, so later turns are rebuilt on the remaining attempts
    (the conversation the model will see from then on)."""
    after = 0 if stop_at_correct else turns_after_correct
    first_correct: int | None = None
    counts = {"dropped_empty": 0, "dropped_duplicate": 0, "dropped_after_correct": 0}
    seen: set[str] = set()
    kept: list[Turn] = []
    for k, turn in enumerate(traj.turns):
        key = turn.response.strip()
        if dedupe and not key:
            counts["dropped_empty"] += 1
            continue
        if dedupe and key in seen:
            counts["dropped_duplicate"] += 1
            continue
        seen.add(key)
        kept.append(turn)
        if turn.correct and first_correct is None:
            first_correct = len(kept) - 1
        if after is not None and first_correct is not None and len(kept) - 1 - first_correct >= after:
            counts["dropped_after_correct"] = len(traj.turns) - k - 1
            break
    return Prepared(traj, kept, counts, first_correct)


# --- 2. select ------------------------------------------------------------------------------------


def select_turns(rewards: list[float], correct: list[bool], criteria: str) -> list[bool]:
    """Which turns the paper's criteria train on (degenerate turns are removed by the caller).

    all: every turn; better: r_i > r_{i-1}; best: r_i >= max(r_0..r_{i-1}); success: correct.
    The first turn is trained under every criteria except `success` (the paper's code)."""
    if criteria not in ("all", "better", "best", "success"):
        raise BuildError(f"data.criteria: unknown criteria {criteria!r} (all | better | best | success)")
    keep = []
    for i, r in enumerate(rewards):
        if criteria == "success":
            keep.append(bool(correct[i]))
        elif i == 0 or criteria == "all":
            keep.append(True)
        elif criteria == "better":
            keep.append(r > rewards[i - 1])
        else:  # best
            keep.append(r >= max(rewards[:i]))
    return keep


# --- 3. weights -----------------------------------------------------------------------------------


def turn_weight(reward: float, tau: float, baseline: float = 0.0, max_weight: float | None = None) -> float:
    """exp((reward - baseline) / tau), capped at max_weight."""
    w = math.exp((reward - baseline) / tau)
    return min(w, max_weight) if max_weight is not None else w


def prompt_baselines(prepared: list[Prepared]) -> dict[str, float]:
    """Mean reward per problem over every prepared turn of every trajectory of that problem."""
    sums: dict[str, list[float]] = defaultdict(list)
    for p in prepared:
        sums[p.traj.problem_id].extend(t.reward for t in p.turns)
    return {k: sum(v) / len(v) for k, v in sums.items() if v}


# --- all together ---------------------------------------------------------------------------------


def _problem(traj: Trajectory) -> Problem:
    try:
        meta = json.loads(traj.meta) if traj.meta else {}
    except json.JSONDecodeError:
        meta = {}
    return Problem(traj.problem_id, traj.question, traj.reference, meta if isinstance(meta, dict) else {})


def build_examples(
    trajectories: Iterable[Trajectory],
    env: Env,
    tokenizer: Any,
    cfg: DataConfig,
    context_window: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, stats). `context_window` is the resolved window (cfg.context_window may say 'rollout')."""
    if isinstance(cfg.context_window, int) or cfg.context_window is None:
        context_window = cfg.context_window
    trajs = list(trajectories)
    stats: dict[str, Any] = defaultdict(int)
    stats["trajectories_in"] = len(trajs)

    prepared: list[Prepared] = []
    for traj in trajs:
        stats["turns_in"] += len(traj.turns)
        p = prepare(traj, cfg.dedupe, cfg.stop_at_correct, cfg.turns_after_correct)
        for k, v in p.counts.items():
            stats[k] += v
        if not p.turns:
            stats["trajectories_empty"] += 1
            continue
        if cfg.only_successful and not p.turns[-1].correct:
            stats["trajectories_unsuccessful_skipped"] += 1
            continue
        prepared.append(p)
    baselines = prompt_baselines(prepared) if cfg.center_rewards else {}

    # Pass 1: the trained turns of each trajectory, with weights and template segments.
    jobs: list[tuple[int, list[tuple[int, float, list[str | int], list[Turn]]]]] = []
    for ti, p in enumerate(prepared):
        problem = _problem(p.traj)
        attempts = [t.response for t in p.turns]
        rewards = [float(t.reward) for t in p.turns]
        selected = select_turns(rewards, [bool(t.correct) for t in p.turns], cfg.criteria)
        turns = []
        for i, turn in enumerate(p.turns):
            if turn.degenerate:
                stats["turns_degenerate_skipped"] += 1
                continue
            if turn.repeats_wrong:  # rollout.improve_distinct found no candidate but copies of wrong answers
                stats["turns_repeating_wrong_skipped"] += 1
                continue
            if not selected[i]:
                stats["turns_not_selected"] += 1
                continue
            stats["turns_selected"] += 1
            w = turn_weight(rewards[i], cfg.tau, baselines.get(p.traj.problem_id, 0.0), cfg.max_weight)
            if p.first_correct is not None and i > p.first_correct:
                w *= cfg.after_correct_weight
            if i == 0:
                w *= cfg.first_turn_weight
            if w == 0:
                stats["turns_zero_weight_skipped"] += 1
                continue
            shown = p.turns[:i][-context_window:] if context_window else p.turns[:i]  # as build_conversation
            conv = build_conversation(env, problem, attempts[:i], context_window)
            try:
                segs = example_segments(tokenizer, conv, turn.response)
            except TemplateError as e:
                raise BuildError(f"problem {p.traj.problem_id!r} turn {i}: {e}") from None
            turns.append((i, w, segs, [*shown, turn]))
        jobs.append((ti, turns))
    # Pass 2: the template texts tokenized once each, in batches; replies are the sampled ids.
    texts = list(
        {seg: None for _, turns in jobs for _, _, segs, _ in turns for seg in segs if isinstance(seg, str)}
        | {t.response: None for _, turns in jobs for *_, shown in turns for t in shown if reply_ids(t) is None}
    )
    encoded = dict(zip(texts, encode_texts(tokenizer, texts), strict=True))
    special = {int(i) for i in tokenizer.all_special_ids}
    rows: list[dict[str, Any]] = []
    prefix_tokens = 0
    weights: list[float] = []
    for ti, turns in jobs:
        pid = prepared[ti].traj.problem_id
        examples: list[TurnExample] = []
        for i, w, segs, shown in turns:
            replies = [reply_ids(t) for t in shown]
            stats["replies_from_text"] += int(replies[-1] is None)
            replies = [encoded[t.response] if r is None else r for r, t in zip(replies, shown, strict=True)]
            ids, start = assemble(segs, replies, encoded.__getitem__, special)
            if start == len(ids):
                raise BuildError(f"problem {pid!r} turn {i}: the reply {shown[-1].response!r} has no tokens to train")
            own = shown[-1].prompt_ids
            stats["contexts_not_engine_prompt"] += int(bool(own) and list(own) != ids[:start])
            ex = fit_length(TurnExample(ti, i, pid, w, ids, start), cfg.max_length, cfg.overflow)
            if ex is None:
                stats["dropped_too_long"] += 1
                continue
            stats["truncated"] += int(ex.truncated > 0)
            examples.append(ex)
            weights.append(w)
            prefix_tokens += len(ex.ids)
        if not examples:
            stats["trajectories_without_trained_turns"] += 1
            continue
        rows.extend(layout_rows(examples, cfg.layout))

    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(rows)
    stats = dict(stats)
    stats.update(
        format=FORMAT,
        layout=cfg.layout,
        criteria=cfg.criteria,
        tau=cfg.tau,
        center_rewards=cfg.center_rewards,
        max_weight=cfg.max_weight,
        max_length=cfg.max_length,
        overflow=cfg.overflow,
        context_window=context_window,
        trajectories_used=len(prepared),
        rows=len(rows),
        examples=sum(r["units"] for r in rows),
        input_tokens=sum(r["num_tokens"] for r in rows),
        trained_tokens=sum(r["trained_tokens"] for r in rows),
        prefix_input_tokens=prefix_tokens,
        max_row_tokens=max((r["num_tokens"] for r in rows), default=0),
        weight_min=min(weights, default=0.0),
        weight_mean=sum(weights) / len(weights) if weights else 0.0,
        weight_max=max(weights, default=0.0),
    )
    if stats.get("truncated") or stats.get("dropped_too_long"):
        log.warning(
            "data: %d example(s) over max_length=%d truncated on the left, %d dropped",
            stats.get("truncated", 0),
            cfg.max_length,
            stats.get("dropped_too_long", 0),
        )
    return rows, stats


def build_dataset(
    trajectories: str | list[str] | list[Trajectory],
    env: Env,
    tokenizer: Any,
    cfg: DataConfig,
    out_dir: str,
    context_window: int | None = None,
) -> dict[str, Any]:
    """Build and write a data set directory; returns its stats. `tokenizer` may be a path;
    `trajectories` a path, several (data.aggregate: every iteration's so far) or the records."""
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if getattr(tokenizer, "chat_template", None) is None:
        raise BuildError(f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template")
    sources = [trajectories] if isinstance(trajectories, str) else list(trajectories)
    trajs = [t for src in sources for t in (read_trajectories(src) if isinstance(src, str) else [src])]
    rows, stats = build_examples(trajs, env, tokenizer, cfg, context_window)
    paths = [os.path.abspath(src) for src in sources if isinstance(src, str)]
    if paths:
        stats["source"] = paths[0] if len(paths) == 1 else paths
    write_dataset(rows, stats, out_dir)
    log.info(
        "data: %d trajectories -> %d %s rows (%d examples, %d tokens, %d trained)",
        stats["trajectories_in"],
        stats["rows"],
        stats["layout"],
        stats["examples"],
        stats["input_tokens"],
        stats["trained_tokens"],
    )
    return stats


def resolve_context_window(cfg: RunConfig) -> int | None:
    w = cfg.data.context_window
    return cfg.rollout.context_window if w == "rollout" else w


def prepare_dataset(cfg: RunConfig, trajectories: str | list[str], model_path: str, out_dir: str) -> str:
    """Build the training set from trajectory parquet files into `out_dir` (cfg.data settings,
    the env's prompts and feedback, the model's chat template)."""
    from rise_ray.envs import env_options, get_env

    env = get_env(cfg.env.name, **env_options(cfg.env, with_data=False))
    stats = build_dataset(trajectories, env, model_path, cfg.data, out_dir, resolve_context_window(cfg))
    print(
        f"[rise train] data: {stats['trajectories_in']} trajectories -> {stats['rows']} {stats['layout']} rows, "
        f"{stats['examples']} examples, {stats['input_tokens']} tokens ({stats['trained_tokens']} trained); "
        f"truncated {stats.get('truncated', 0)}, dropped too long {stats.get('dropped_too_long', 0)}, "
        f"replies from text {stats.get('replies_from_text', 0)}, contexts not the engine's prompt "
        f"{stats.get('contexts_not_engine_prompt', 0)}",
        flush=True,
    )
    return out_dir
