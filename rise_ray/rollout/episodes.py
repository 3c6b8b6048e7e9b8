"""Multi-turn episodes: the RISE MDP run over a batch of problems.

Steps, per turn t = 1..T:
  1. build each live conversation: the question, then the latest attempts, each followed by the
     feedback ("The answer is incorrect. Please try again."), trimmed to a context window;
  2. send all live conversations to the engine in one call (n candidates each);
  3. grade every candidate, drop runaway repetitions, keep one (best by reward when collecting,
     the first when evaluating: choosing by reward would use the gold answer);
  4. with an oracle, a conversation ends at its first correct answer; without one it runs T turns.

That is `schedule="waves"`: every turn waits for the slowest reply of the turn. With
`schedule="async"` each episode advances on its own: its next turn goes to the engine as soon as
its reply is graded. VLLMEngine takes it into its running batch in this process
(`generate_continuous`, stepping vLLM's engine); otherwise each episode runs on a thread of its
own, one engine call per turn, the engine taking one call at a time. An episode
is one generator (`episode`) whichever the schedule. Greedy decoding gives the same trajectories
either way; seeded sampling may not (a wave's i-th conversation is seeded seed + i*n, and which
conversations share a wave changes as episodes end).

Progress: `progress` (rise_ray.progress.EpisodeTally) is told the turn each episode waits on, the
candidates it got and when it ends, whichever the schedule, and the tokens the engine generates:
as it makes them where the engine's generate takes `on_tokens` (VLLMEngine, HFEngine, and
RemoteEngine, whose actor reports them itself), else when its call returns. A pool sends it to the driver.
"""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Literal

from rise_ray.envs.base import Env, Problem
from rise_ray.progress import EpisodeTally
from rise_ray.rollout.engine import Completion, Conversation, Engine, SamplingParams


@dataclass
class Turn:
    response: str  # the kept reply: it goes into the next turn's context
    answer: str | None
    reward: float
    correct: bool
    source: str  # "policy" or "teacher"
    finished: bool  # ended on its own (not cut at max_tokens)
    degenerate: bool  # every candidate was a runaway repetition: never trained on
    candidates: list[str] = field(default_factory=list)
    candidate_answers: list[str | None] = field(default_factory=list)
    candidate_rewards: list[float] = field(default_factory=list)
    candidate_correct: list[bool] = field(default_factory=list)
    # The kept reply as the engine made it (empty where the engine gave none, e.g. hand-made turns):
    # the ids it was given, the ids it sampled (stop token included), their log-probabilities.
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    # Collection with `improve_distinct`: every usable candidate repeated a wrong earlier answer. The
    # turn stays in the context (the episode goes on from it) but is never trained: a copy of a
    # wrong answer is not an improvement.
    repeats_wrong: bool = False


@dataclass
class Trajectory:
    problem_id: str
    question: str
    reference: str
    turns: list[Turn] = field(default_factory=list)
    degenerate_dropped: int = 0  # candidates dropped as runaway repetitions
    stop_reason: str = "turns"  # turns | correct | prompt_too_long
    meta: str = "{}"  # the problem's meta as JSON (keeps the parquet schema fixed)

    def to_record(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_record(rec: dict) -> Trajectory:
        turns = [Turn(**{k: _plain(v) for k, v in t.items() if v is not None or k not in _OPTIONAL_FIELDS}) for t in rec["turns"]]
        fields = {k: rec[k] for k in ("problem_id", "question", "reference", "degenerate_dropped", "stop_reason", "meta")}
        return Trajectory(turns=turns, **fields)


_ID_FIELDS = ("prompt_ids", "token_ids", "logprobs")  # absent (null) in records written before they were kept
_OPTIONAL_FIELDS = (*_ID_FIELDS, "repeats_wrong")


def _plain(v):
    """numpy arrays (from parquet via pandas) back to lists."""
    return v.tolist() if hasattr(v, "tolist") and not isinstance(v, (str, bytes)) else v


@dataclass(frozen=True)
class EpisodeSpec:
    turns: int = 5
    params: SamplingParams = SamplingParams()
    first_n: int = 1  # candidates at turn 1 (evaluation: the parallel samples for m5@t1)
    later_n: int = 1  # candidates at turns >= 2 (collection: best-of-N)
    choose: Literal["best", "first"] = "first"  # best: by reward (collection); first: evaluation
    oracle: bool = False  # stop a conversation at its first correct answer
    context_window: int | None = None  # keep only the latest k attempts in the prompt
    drop_degenerate: bool = False  # collection drops runaway repetitions; evaluation keeps them
    schedule: Literal["waves", "async"] = "waves"  # async: each episode advances on its own
    # choose="best" at turns >= 2: a candidate whose answer repeats a wrong earlier answer of the
    # episode is never the improved response (rollout.improve_distinct)
    improve_distinct: bool = False


def is_degenerate(text: str, finished: bool, min_repeats: int = 4, max_period: int = 64) -> bool:
    """A runaway repetition: the reply hit max_tokens and its tail is one snippet repeated."""
    if finished or len(text) < 2 * min_repeats:
        return False
    for period in range(1, min(max_period, len(text) // min_repeats) + 1):
        unit = text[-period:]
        if text[-period * min_repeats :] == unit * min_repeats:
            return True
    return False


def build_conversation(env: Env, problem: Problem, attempts: list[str], window: int | None) -> Conversation:
    """The prompt for the next turn: the question, then the kept attempts each with feedback."""
    conv = list(env.first_prompt(problem))
    for attempt in attempts[-window:] if window else attempts:
        conv.append({"role": "assistant", "content": attempt})
        conv.append(env.feedback_message(problem))
    return conv


def run_episodes(
    engine: Engine,
    env: Env,
    problems: list[Problem],
    spec: EpisodeSpec,
    improver: Engine | None = None,
    progress: EpisodeTally | None = None,
) -> list[Trajectory]:
    """Run the multi-turn MDP for every problem. `improver` (a teacher) answers turns >= 2;
    `progress` counts turns, samples and finished episodes as they happen."""
    trajs = [Trajectory(p.id, p.question, p.reference, meta=json.dumps(p.meta, default=str)) for p in problems]
    continuous = improver is None and hasattr(engine, "generate_continuous")
    on_threads = spec.schedule == "async" and not continuous
    if on_threads:  # engines that are not thread-safe take one call at a time (one lock per engine)
        locked = {id(e): _OneAtATime(e) for e in (engine, improver) if e}
        engine, improver = locked[id(engine)], improver and locked[id(improver)]
    tally = progress if progress is not None else EpisodeTally()
    episodes = [episode(env, p, t, spec, engine, improver, tally, k)
                for k, (p, t) in enumerate(zip(problems, trajs, strict=True))]
    if spec.schedule == "waves":
        _run_in_waves(episodes, tally)
    elif on_threads:
        _run_on_threads(episodes, tally)
    else:
        _run_continuously(engine, episodes, tally)
    return trajs


def generate_telling(
    engine: Engine, conversations: list[Conversation], n: int, params: SamplingParams, on_tokens: Callable[[int], None]
) -> list[list[Completion]]:
    """engine.generate, with on_tokens told the tokens it generates: as it makes them where its
    generate takes `on_tokens`, else when the call returns."""
    if takes_on_tokens(engine.generate):
        return engine.generate(conversations, n, params, on_tokens=on_tokens)
    outputs = engine.generate(conversations, n, params)
    on_tokens(sum(_tokens(cands) for cands in outputs))
    return outputs


def takes_on_tokens(method: Callable) -> bool:
    """Whether an engine method takes `on_tokens` (a subclass that overrides it may not)."""
    try:
        return "on_tokens" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def _tokens(cands: list[Completion]) -> int:
    return sum(len(c.token_ids) for c in cands)


# A turn's request: the engine that answers it, the conversation, its samples, their settings.
TurnRequest = tuple[Engine, Conversation, int, SamplingParams]


def episode(
    env: Env,
    problem: Problem,
    traj: Trajectory,
    spec: EpisodeSpec,
    policy: Engine,
    teacher: Engine | None,
    tally: EpisodeTally,
    k: int,
) -> Generator[TurnRequest, list[Completion], None]:
    """One episode: yields each turn's request, is sent that turn's candidates, and fills `traj`
    (and the tally, as episode k). The schedules below differ only in how they batch these requests."""
    try:
        for t in range(spec.turns):
            use_teacher = t > 0 and teacher is not None
            producer = teacher if use_teacher else policy
            conv = build_conversation(env, problem, [x.response for x in traj.turns], spec.context_window)
            if producer.prompt_len(conv) + spec.params.max_tokens > producer.max_model_len:
                traj.stop_reason = "prompt_too_long"
                return
            params = spec.params if spec.params.seed is None else spec.params.with_(seed=spec.params.seed + t)
            tally.asks(k, t + 1)
            cands = yield producer, conv, spec.first_n if t == 0 else spec.later_n, params
            tally.answered(k, cands)
            wrong_before = {x.answer for x in traj.turns if not x.correct and x.answer is not None}
            traj.turns.append(_choose(env, problem, cands, spec, "teacher" if use_teacher else "policy", wrong_before))
            traj.degenerate_dropped += sum(
                spec.drop_degenerate and is_degenerate(c.text, c.finished) for c in cands
            )
            if spec.oracle and traj.turns[-1].correct:
                traj.stop_reason = "correct"
                return
    finally:  # the samples of the turns it will not take count as done (for the ETA)
        tally.ended(k, sum(spec.first_n if t == 0 else spec.later_n for t in range(len(traj.turns), spec.turns)))


def samples_per_episode(spec: EpisodeSpec) -> int:
    """Samples of an episode that takes every turn."""
    return spec.first_n + (spec.turns - 1) * spec.later_n


def advance(episode: Generator[TurnRequest, list[Completion], None], cands: list[Completion] | None) -> TurnRequest | None:
    """The episode's next request (None: it is over); `cands` answer its last one."""
    try:
        return next(episode) if cands is None else episode.send(cands)
    except StopIteration:
        return None


def _run_in_waves(episodes: list, tally: EpisodeTally) -> None:
    """schedule="waves": every live episode's turn in one engine call; the next turn starts when
    the whole wave is back. Conversation i of a wave is seeded seed + i*n (the engine's rule)."""
    pending = {i: r for i, e in enumerate(episodes) if (r := advance(e, None)) is not None}
    while pending:
        producer, _, n, params = next(iter(pending.values()))  # one turn: the same for all
        live = list(pending)
        outputs = generate_telling(producer, [pending[i][1] for i in live], n, params, tally.made)
        pending = {i: r for i, cands in zip(live, outputs, strict=True)
                   if (r := advance(episodes[i], cands)) is not None}


def _run_continuously(engine: Engine, episodes: list, tally: EpisodeTally) -> None:
    """schedule="async" on an engine that batches continuously in this process (VLLMEngine): an
    episode's next turn joins the running batch as soon as its reply is graded."""
    first = [(k, r) for k, e in enumerate(episodes) if (r := advance(e, None)) is not None]
    index = [k for k, _ in first]  # the engine numbers the requests it was given first 0..m-1
    counts = takes_on_tokens(engine.generate_continuous)

    def follow_up(j: int, cands: list[Completion]) -> tuple | None:
        if not counts:
            tally.made(_tokens(cands))
        r = advance(episodes[index[j]], cands)
        return None if r is None else r[1:]

    if counts:
        engine.generate_continuous([r[1:] for _, r in first], follow_up, on_tokens=tally.made)
    else:
        engine.generate_continuous([r[1:] for _, r in first], follow_up)


class _OneAtATime:
    """An engine that is not safe to call from several threads, called one call at a time."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.max_model_len, self._lock = engine, engine.max_model_len, threading.Lock()

    def prompt_len(self, conversation: Conversation) -> int:
        with self._lock:
            return self.engine.prompt_len(conversation)

    def generate(
        self, conversations: list[Conversation], n: int, params: SamplingParams,
        on_tokens: Callable[[int], None] | None = None,
    ) -> list[list[Completion]]:
        with self._lock:
            if on_tokens is None:
                return self.engine.generate(conversations, n, params)
            return generate_telling(self.engine, conversations, n, params, on_tokens)


def _run_on_threads(episodes: list, tally: EpisodeTally, max_threads: int = 256) -> None:
    """schedule="async" otherwise: one thread per episode (up to max_threads), each turn one engine
    call (the engines take one call at a time)."""

    def run(k: int, episode) -> None:
        r = advance(episode, None)
        while r is not None:
            producer, conv, n, params = r
            if params.seed is not None:  # as a wave seeds its k-th conversation: distinct per episode
                params = params.with_(seed=params.seed + k * n)
            (cands,) = generate_telling(producer, [conv], n, params, tally.made)  # one list for one conversation
            r = advance(episode, cands)

    if not episodes:
        return
    with ThreadPoolExecutor(min(len(episodes), max_threads), thread_name_prefix="rise-episode") as pool:
        for fut in [pool.submit(run, k, e) for k, e in enumerate(episodes)]:
            fut.result()  # the first failure is raised (the rest still finish first)


def _choose(
    env: Env, problem: Problem, cands: list[Completion], spec: EpisodeSpec, source: str,
    wrong_before: set[str] | frozenset[str] = frozenset(),
) -> Turn:
    grades = [env.grade_problem(c.text, problem) for c in cands]
    bad = [spec.drop_degenerate and is_degenerate(c.text, c.finished) for c in cands]
    usable = [k for k in range(len(cands)) if not bad[k]] or [0]
    repeats_wrong = False
    if spec.improve_distinct and spec.choose == "best" and wrong_before:
        # the env's equivalence, not string equality: "0.5" repeats "1/2"
        fresh = [k for k in usable if grades[k].answer is None
                 or not any(env.is_equivalent(grades[k].answer, w) for w in wrong_before)]
        repeats_wrong = not fresh
        usable = fresh or usable
    # best: by reward, ties to the earliest candidate; first: evaluation never peeks at the gold
    k = max(usable, key=lambda j: (grades[j].reward, -j)) if spec.choose == "best" else usable[0]
    return Turn(
        response=cands[k].text,
        answer=grades[k].answer,
        reward=grades[k].reward,
        correct=grades[k].correct,
        source=source,
        finished=cands[k].finished,
        degenerate=bad[k],
        candidates=[c.text for c in cands],
        candidate_answers=[g.answer for g in grades],
        candidate_rewards=[g.reward for g in grades],
        candidate_correct=[g.correct for g in grades],
        prompt_ids=list(cands[k].prompt_ids),
        token_ids=list(cands[k].token_ids),
        logprobs=list(cands[k].logprobs or ()),
        repeats_wrong=repeats_wrong,
    )


def trajectory_schema():
    """A fixed Arrow schema for trajectory records, so every batch and file agrees."""
    import pyarrow as pa

    turn = pa.struct(
        [
            ("response", pa.string()),
            ("answer", pa.string()),
            ("reward", pa.float64()),
            ("correct", pa.bool_()),
            ("source", pa.string()),
            ("finished", pa.bool_()),
            ("degenerate", pa.bool_()),
            ("candidates", pa.list_(pa.string())),
            ("candidate_answers", pa.list_(pa.string())),
            ("candidate_rewards", pa.list_(pa.float64())),
            ("candidate_correct", pa.list_(pa.bool_())),
            ("prompt_ids", pa.list_(pa.int32())),
            ("token_ids", pa.list_(pa.int32())),
            ("logprobs", pa.list_(pa.float64())),
            ("repeats_wrong", pa.bool_()),
        ]
    )
    return pa.schema(
        [
            ("problem_id", pa.string()),
            ("question", pa.string()),
            ("reference", pa.string()),
            ("turns", pa.list_(turn)),
            ("degenerate_dropped", pa.int64()),
            ("stop_reason", pa.string()),
            ("meta", pa.string()),
        ]
    )


def to_table(trajs: list[Trajectory]):
    import pyarrow as pa

    return pa.Table.from_pylist([t.to_record() for t in trajs], schema=trajectory_schema())
