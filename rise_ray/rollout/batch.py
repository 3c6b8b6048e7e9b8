"""What one Ray Data task runs: a batch of episodes against the engine actors, through their
handles (RemoteEngine speaks the Engine protocol over an actor), with deadlines on every wait."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
from collections.abc import Callable
from typing import Any

import ray

from rise_ray.envs.base import Problem
from rise_ray.progress import POLL_TIMEOUT_S, Reporter, remote_tally
from rise_ray.rollout.engine import Completion, Conversation, SamplingParams, chat_prompt_ids
from rise_ray.rollout.episodes import EpisodeSpec, run_episodes, samples_per_episode, to_table

CALL_TIMEOUT_S = float(os.environ.get("RISE_ENGINE_CALL_TIMEOUT_S", "3600"))  # one generate / load call


class EngineTimeout(RuntimeError):
    """A wait on engine actors passed its deadline."""


def wait(refs: Any, what: str, timeout: float, env: str = "RISE_ENGINE_CALL_TIMEOUT_S") -> Any:
    """ray.get with a deadline whose error names what was waited for."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise EngineTimeout(f"{what}: no answer within {timeout:.0f} s (raise {env} if it is just slow)") from None


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class RemoteEngine:
    """The Engine protocol over an EngineActor handle (used inside Ray Data tasks). progress:
    (board, run, source): the actor reports each call's tokens there itself, as its engine makes
    them, as source (source, call number); a retried call replaces its own report."""

    def __init__(self, actor, model_path: str | None, max_model_len: int, progress: tuple | None = None):
        self.actor = actor
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.progress = progress
        self._calls = itertools.count()

    def generate(
        self, conversations: list[Conversation], n: int, params: SamplingParams,
        on_tokens: Callable[[int], None] | None = None,
    ) -> list[list[Completion]]:
        report_to = None
        if self.progress is not None:
            board, run, source = self.progress
            report_to = (board, run, (source, next(self._calls)))
        ref = self.actor.generate.remote(conversations, n, params, report_to)
        outputs = wait(ref, f"engine generate ({len(conversations)} conversations x {n})", CALL_TIMEOUT_S)
        if report_to is None and on_tokens is not None:  # not reported by the actor: counted here
            on_tokens(sum(len(c.token_ids) for cands in outputs for c in cands))
        return outputs

    def prompt_len(self, conversation: Conversation) -> int:
        # Tokenised here, not on the actor: one round trip per turn, not per conversation. An
        # engine without a model (model_path None: the arithmetic solver) counts on its actor.
        if self.model_path is None:
            return wait(self.actor.prompt_len.remote(conversation), "engine prompt_len", CALL_TIMEOUT_S)
        return len(chat_prompt_ids(_tokenizer(self.model_path), conversation))

    def update_weights(self, weights: Any) -> None:
        wait(self.actor.update_weights.remote(weights, "manual"), "engine weight load", CALL_TIMEOUT_S)

    def top_logprobs(self, conversation: Conversation, k: int = 8) -> list[tuple[int, float]]:
        return wait(self.actor.top_logprobs.remote(conversation, k), "engine top_logprobs", CALL_TIMEOUT_S)


@functools.lru_cache(maxsize=8)
def cached_env(name: str, options_json: str):
    from rise_ray.envs import get_env

    return get_env(name, **json.loads(options_json))


def episode_batch(
    batch, *, actors, model_path, max_model_len, teacher, env_name, env_options, spec, batch_size, progress=None
):
    """One Ray Data batch: run its episodes on engine actor (batch number mod N): here, one engine
    call per turn, or (rollout.schedule=async, no teacher) inside the actor. progress: (board, run)
    that the batch reports to, as source `batch number`."""
    rows = batch.to_pylist()
    problems = [Problem(r["id"], r["question"], r["reference"], json.loads(r["meta"])) for r in rows]
    number = rows[0]["idx"] // batch_size
    actor = actors[number % len(actors)]
    report_to = None if progress is None else (*progress, number)
    if spec.schedule == "async" and teacher is None:
        ref = actor.run_episodes.remote(env_name, env_options, problems, spec, report_to)
        return to_table(wait(ref, f"engine episodes ({len(problems)} problems x {spec.turns} turns)",
                             CALL_TIMEOUT_S * spec.turns))
    env = cached_env(env_name, env_options)
    # the actors report their calls' tokens (sources (number, "policy" | "teacher", call))
    engine = RemoteEngine(actor, model_path, max_model_len, report_to and (*progress, (number, "policy")))
    improver = None
    if teacher is not None:
        t_actors, t_path, t_len = teacher
        improver = RemoteEngine(t_actors[number % len(t_actors)], t_path, t_len,
                                report_to and (*progress, (number, "teacher")))
    with remote_tally(report_to) as tally:
        trajs = run_episodes(engine, env, problems, spec, improver=improver, progress=tally)
    return to_table(trajs)


# --- the driver's side of a pipeline run: Ray Data's own output off, our progress line on --------------


def quiet_ray_data(ctx: Any, no_progress_bars: bool) -> None:
    """This pipeline's DataContext. A batch answers only when the last turn of its episodes is done:
    on CPUs that can take longer than Ray Data's no-progress guard (30 min) with nothing to show,
    and the guard then kills a healthy run (every engine call inside has its own deadline,
    CALL_TIMEOUT_S). Ray Data's progress block and start-up lines show only batches ("0/1" for the
    whole run, logged every 10 s off a TTY): off where our own progress reports."""
    ctx.execution_no_progress_timeout_s = -1
    if no_progress_bars:
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        # Ray Data warns once per process that its bars are off ("To enable, set ..."): ours replace them.
        from ray.util.debug import log_once

        log_once("ray_data_progress_manager_disabled")


@contextlib.contextmanager
def report_progress(label: str | None, report_to: tuple | None, problems: int, spec: EpisodeSpec):
    """The driver's progress lines while the pipeline runs (nothing where there is no board)."""
    if label is None or report_to is None:
        yield None
        return
    board, run = report_to
    poll = functools.partial(_poll, board, run)
    try:
        with Reporter(label, problems, spec.turns, samples_per_episode(spec), poll) as reporter:
            yield reporter
    finally:
        with contextlib.suppress(Exception):
            board.end.remote(run)  # the board forgets the run


def _poll(board: Any, run: str) -> dict:
    return ray.get(board.totals.remote(run), timeout=POLL_TIMEOUT_S)
