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
     first, the AWR-like variant), capped at `max_weight`;
  4. assemble each trained turn's ids from stored ids, in the conversation the rollout engine
     built (`build_conversation`: same env feedback, same context window): the chat template's
     texts (system, question, feedback, role markers, generation prompts) tokenized, and each
     assistant reply - earlier attempts in the context and the trained reply - as the ids the
     engine sampled (`Turn.token_ids`), never as its text re-tokenized. So every trained reply
     token is the sampled one, by construction. Weights: 0 on context, `weight / n` on the n
     tokens of the reply (the template's end-of-turn tokens after it included);
  5. lay out rows:
       - `prefix` (the paper's code): one row per trained turn, the loss only on its last turn;
       - `packed` (ours): prefix examples that are token-prefixes of one another share one row,
         each turn weighted in place. A causal model sees the same context at every position,
         so a packed row's loss is exactly the sum of its prefix examples' losses.

The loss (rise_ray.train.loop.weighted_loss_sum) is sum(weight x token CE) / sum(units), where
`units` counts the prefix examples in a row (1 for `prefix` rows). With the whole data set as one
batch this is (1/N) sum_e w_e mean_t CE_e,t: the paper's normalisation (each example's mean token
CE times its weight, averaged over examples) for both layouts, to float rounding. With
micro-batches, each optimizer step divides by the units it holds, so `prefix` is the paper's
per-batch mean and `packed` an estimate of the same objective that groups turns differently.

The assembly rule. The template renders the conversation ending with the reply; it is cut at each
assistant message: the text up to its generation prompt, its content, the text after it. The texts
are tokenized alone (a text never spans a reply: with the usual templates a special token ends
each reply, so the engine's own tokenization of the rendered prompt splits there too), and each
content is replaced by that reply's sampled ids. Turn 1's context is therefore exactly the ids
the engine was given (`Turn.prompt_ids`); a later context equals the engine's prompt unless a
re-tokenized earlier reply differed from its sampled ids (the engine saw the re-tokenization; the
trained row keeps the sampled ids, so the packed row is one consistent sequence), or the data set
rebuilds the context (dedupe, another window); `contexts_not_engine_prompt` counts those. A
reply that ends with the stop token it sampled keeps it, and the template's copy of that token
is not added again. Replies known only as text (a teacher's, whose vocabulary may differ, or
turns recorded without ids) are tokenized alone and counted in `replies_from_text`. Packed rows
only ever merge examples whose ids are prefixes of one another, so the layouts agree exactly.

Too-long examples (more than `max_length` tokens) lose context tokens from the left, or are
dropped (`overflow`); an example whose reply alone does not fit is always dropped. Both are
counted in the stats and logged, never silent.

A data set directory holds `examples.parquet` (input_ids, weights, units, ...) and `stats.json`.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rise_ray.config import DataConfig
from rise_ray.data.assemble import TemplateError, assemble, encode_texts, example_segments, reply_ids
from rise_ray.envs.base import DataError, Env, Problem
from rise_ray.rollout.episodes import Trajectory, Turn, build_conversation

log = logging.getLogger(__name__)

FORMAT = "rise-ray-sft-v1"
EXAMPLES_FILE = "examples.parquet"
STATS_FILE = "stats.json"
TRAJECTORY_FIELDS = ("problem_id", "question", "reference", "turns")
TURN_FIELDS = ("response", "reward", "correct")


class BuildError(ValueError):
    """Trajectories or a tokenizer that cannot make a training set; the message says why."""


# --- 1. prepare -----------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A trajectory after dropping duplicates and the turns after the first correct one."""

    traj: Trajectory
    turns: list[Turn]
    counts: dict[str, int] = field(default_factory=dict)


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
    return Prepared(traj, kept, counts)


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


# --- 4. assemble ----------------------------------------------------------------------------------


@dataclass
class TurnExample:
    """One trained turn as a prefix-layout example: ids, first trained position, weight."""

    traj_index: int
    turn_index: int
    problem_id: str
    weight: float
    ids: list[int]
    start: int  # ids[start:] are the reply's tokens (trained); ids[:start] the context
    truncated: int = 0  # context tokens cut from the left


def fit_length(ex: TurnExample, max_length: int, overflow: str) -> TurnExample | None:
    """The example within max_length tokens: context cut from the left, or None (dropped)."""
    n = len(ex.ids)
    if n <= max_length:
        return ex
    reply = n - ex.start
    if overflow == "drop" or reply >= max_length:  # the reply needs >= 1 context token before it
        return None
    cut = n - max_length
    return TurnExample(
        ex.traj_index, ex.turn_index, ex.problem_id, ex.weight, ex.ids[cut:], ex.start - cut, cut
    )


# --- 5. layout ------------------------------------------------------------------------------------


def _row(ids: list[int], members: list[TurnExample]) -> dict[str, Any]:
    weights = [0.0] * len(ids)
    trained = 0
    for ex in members:
        n = len(ex.ids) - ex.start
        per_token = ex.weight / n
        for pos in range(ex.start, len(ex.ids)):
            weights[pos] += per_token
        trained += n
    return {
        "input_ids": ids,
        "weights": weights,
        "units": len(members),
        "num_tokens": len(ids),
        "trained_tokens": trained,
        "problem_id": members[0].problem_id,
        "turns": sorted(ex.turn_index for ex in members),
    }


def layout_rows(examples: list[TurnExample], layout: str) -> list[dict[str, Any]]:
    """Rows for `examples` (prefix-layout examples of one trajectory, already length-fitted).

    prefix: one row each. packed: longest first, each example joins the first row whose ids
    start with its ids (and whose position 0 is its position 0: never a truncated example)."""
    if layout == "prefix":
        return [_row(ex.ids, [ex]) for ex in examples]
    if layout != "packed":
        raise BuildError(f"data.layout: unknown layout {layout!r} (packed | prefix)")
    groups: list[tuple[list[int], list[TurnExample]]] = []
    for ex in sorted(examples, key=lambda e: (-len(e.ids), e.turn_index)):
        home = None
        if not ex.truncated:
            for ids, members in groups:
                if not members[0].truncated and ids[: len(ex.ids)] == ex.ids:
                    home = members
                    break
        if home is None:
            groups.append((ex.ids, [ex]))
        else:
            home.append(ex)
    return [_row(ids, members) for ids, members in groups]


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
            if not selected[i]:
                stats["turns_not_selected"] += 1
                continue
            stats["turns_selected"] += 1
            w = turn_weight(rewards[i], cfg.tau, baselines.get(p.traj.problem_id, 0.0), cfg.max_weight)
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


# --- files ----------------------------------------------------------------------------------------


def trajectory_files(path: str) -> list[str]:
    """Parquet files under `path` (a file, or a directory searched recursively), sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such trajectories file or directory")
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    files = [f for f in files if not os.path.basename(f).startswith(".")]
    if not files:
        raise DataError(f"{path}: no .parquet trajectory files found")
    return files


def read_trajectories(path: str) -> list[Trajectory]:
    """Trajectories from parquet files (one row per trajectory, as the collector writes them)."""
    import pyarrow.parquet as pq

    out: list[Trajectory] = []
    for f in trajectory_files(path):
        try:
            table = pq.read_table(f)
        except Exception as e:  # a corrupt or foreign file becomes a clear data error
            raise DataError(f"{f}: not a readable parquet file ({e})") from None
        missing = [c for c in TRAJECTORY_FIELDS if c not in table.column_names]
        if missing:
            raise DataError(f"{f}: not a trajectories file: missing column(s) {missing} (has {table.column_names})")
        for k, rec in enumerate(table.to_pylist()):
            rec.setdefault("degenerate_dropped", 0)
            rec.setdefault("stop_reason", "turns")
            rec.setdefault("meta", "{}")
            for j, t in enumerate(rec["turns"] or []):
                miss = [c for c in TURN_FIELDS if t.get(c) is None]
                if miss:
                    raise DataError(f"{f}: row {k} turn {j}: missing field(s) {miss}")
            try:
                out.append(Trajectory.from_record(rec))
            except TypeError as e:
                raise DataError(f"{f}: row {k}: not a trajectory record ({e})") from None
    return out


def write_dataset(rows: list[dict[str, Any]], stats: dict[str, Any], out_dir: str) -> str:
    """examples.parquet + stats.json, each written to a temp file then moved into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rise_ray.files import atomic_write_json

    if not rows:
        raise BuildError(f"no training examples: every turn was filtered out (stats: {stats})")
    os.makedirs(out_dir, exist_ok=True)
    schema = pa.schema(
        [
            ("input_ids", pa.list_(pa.int32())),
            ("weights", pa.list_(pa.float32())),
            ("units", pa.int32()),
            ("num_tokens", pa.int32()),
            ("trained_tokens", pa.int32()),
            ("problem_id", pa.string()),
            ("turns", pa.list_(pa.int32())),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    tmp = os.path.join(out_dir, f".tmp-{os.getpid()}-{EXAMPLES_FILE}")
    pq.write_table(table, tmp)
    os.replace(tmp, os.path.join(out_dir, EXAMPLES_FILE))
    atomic_write_json(os.path.join(out_dir, STATS_FILE), stats)
    return out_dir


def is_dataset_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, EXAMPLES_FILE)) and os.path.isfile(os.path.join(path, STATS_FILE))


def read_stats(path: str) -> dict[str, Any]:
    f = os.path.join(path, STATS_FILE)
    try:
        with open(f, encoding="utf-8") as fh:
            stats = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{f}: cannot read the data set stats ({e})") from None
    if stats.get("format") != FORMAT:
        raise DataError(f"{f}: not a {FORMAT} data set (format={stats.get('format')!r})")
    return stats


def read_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a data set directory (for tests and the non-Ray baseline)."""
    import pyarrow.parquet as pq

    read_stats(path)
    return pq.read_table(os.path.join(path, EXAMPLES_FILE)).to_pylist()


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
