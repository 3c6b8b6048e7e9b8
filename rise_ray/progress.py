"""Progress of long rollouts (collection, evaluation) while they run: in the terminal and as Ray
metrics. Where the numbers travel:
  1. `run_episodes` counts into an `EpisodeTally` wherever it runs (Ray Data task, engine actor,
     this process): each live episode's turn, episodes finished, samples, work done, and tokens as
     the engine makes them (`made`: vLLM every COUNT_EVERY_S, transformers each step), so the line
     moves during a long turn. An engine actor reports each call's tokens itself (one source a call);
  2. a tally with a sender sends its changed snapshot every SEND_EVERY_S (a daemon thread) to one
     `ProgressBoard` actor per pool, where each source's latest replaces its last (no double count);
  3. a driver `Reporter` thread polls the totals and prints a line (TTY: every TTY_REFRESH_S, else
     every LINE_EVERY_S) and sets Ray gauges `ray_rise_progress_*` (tag `stage`).
Progress never fails a run: what cannot be sent, polled or printed is skipped.

Library vs ours: the gauges are Ray's metrics. Ray's tqdm_ray does not fit the line (a bar per tqdm
object and process, not their sums; the log stream, so nothing with log_to_driver off; no metric;
one number a bar): the tally, board and line stay ours. This module imports nothing from rise_ray.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

log = logging.getLogger(__name__)

LINE_EVERY_S = float(os.environ.get("RISE_PROGRESS_EVERY_S", "10"))  # not a TTY: one line per period
TTY_REFRESH_S = 1.0  # a TTY: the line is redrawn this often
SEND_EVERY_S = 1.0  # a tally sends its snapshot (when it changed) this often
POLL_TIMEOUT_S = 10.0  # the driver's wait for the board's totals
ENDED_KEPT = 1024  # the board remembers this many ended runs (to drop their late reports)


class EpisodeTally:
    """What one run_episodes call has done so far; thread-safe. With `send`, a daemon thread sends
    the snapshot when it changed (use it as a context manager: leaving sends the last one)."""

    def __init__(self, send: Callable[[dict], Any] | None = None, every_s: float = SEND_EVERY_S):
        self._lock = threading.Lock()
        self._on: dict[int, int] = {}  # live episode -> the turn it is on (1-based)
        self.finished = self.samples = self.tokens = self.work = 0
        self._version = self._sent = 0
        self._send, self._every = send, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- counting (called by the episode loop) ------------------------------------------------------
    def asks(self, k: int, turn: int) -> None:
        """Episode k waits for its reply to `turn`."""
        with self._lock:
            self._on[k] = turn
            self._version += 1

    def answered(self, k: int, cands: list) -> None:
        """Episode k got its candidates: samples (their tokens were counted by `made`)."""
        with self._lock:
            self.samples += len(cands)
            self.work += len(cands)
            self._version += 1

    def made(self, tokens: int) -> None:
        """The engine generated `tokens` more (told while it generates, or when its call returns)."""
        with self._lock:
            self.tokens += tokens
            self._version += 1

    def ended(self, k: int, skipped: int = 0) -> None:
        """Episode k is over; `skipped`: the samples of the turns it will not take."""
        with self._lock:
            self._on.pop(k, None)
            self.finished += 1
            self.work += skipped
            self._version += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            turns: dict[int, int] = {}
            for t in self._on.values():
                turns[t] = turns.get(t, 0) + 1
            return {"finished": self.finished, "samples": self.samples, "tokens": self.tokens,
                    "work": self.work, "turns": turns}

    # -- sending ----------------------------------------------------------------------------------
    def flush(self) -> None:
        if self._send is None:
            return
        with self._lock:
            version = self._version
        if version == self._sent:
            return
        try:
            self._send(self.snapshot())
            self._sent = version
        except Exception as e:  # progress never fails a run
            log.debug("progress: could not send: %s", e)

    def __enter__(self) -> EpisodeTally:
        if self._send is not None:
            self._thread = threading.Thread(target=self._loop, name="rise-progress-send", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            self.flush()


def merge(tallies: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of tally snapshots (the turn histograms added up)."""
    out: dict[str, Any] = {"finished": 0, "samples": 0, "tokens": 0, "work": 0, "turns": {}}
    for s in tallies:
        for key in ("finished", "samples", "tokens", "work"):
            out[key] += s.get(key, 0)
        for t, n in s.get("turns", {}).items():
            out["turns"][int(t)] = out["turns"].get(int(t), 0) + n
    return out


class ProgressBoard:
    """The latest snapshot of every source of each run (a Ray actor in a pool: `start_board`).
    Keyed by run, so no call has to come first: reports from other processes arrive in any order."""

    def __init__(self, ended_kept: int = ENDED_KEPT) -> None:
        self._runs: dict[str, dict[Any, dict]] = {}
        # Ended runs, oldest first, whose late reports are dropped: only the latest (a pool's board lives long).
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._ended_kept = ended_kept

    def report(self, run: str, source: Any, snapshot: dict) -> None:
        if run not in self._ended:
            self._runs.setdefault(run, {})[source] = snapshot

    def totals(self, run: str) -> dict[str, Any]:
        return merge(list(self._runs.get(run, {}).values()))

    def end(self, run: str) -> None:
        self._runs.pop(run, None)
        self._ended[run] = None
        while len(self._ended) > self._ended_kept:
            self._ended.popitem(last=False)


@functools.lru_cache(maxsize=1)
def _board_class():
    import ray

    return ray.remote(num_cpus=0)(ProgressBoard)


def start_board():
    """A ProgressBoard actor holding no CPU (it must never wait for one the engines hold)."""
    return _board_class().remote()


def remote_tally(progress: tuple | None) -> EpisodeTally:
    """A tally that sends to (board, run, source), not waiting for the board; without it, a local one."""
    if progress is None:
        return EpisodeTally()
    board, run, source = progress
    return EpisodeTally(lambda snapshot: board.report.remote(run, source, snapshot))


# -- the driver's side -------------------------------------------------------------------------------


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class Status:
    elapsed_s: float
    problems: int
    finished: int
    samples: int
    tokens: int
    fraction: float
    tokens_per_s: float
    eta_s: float | None
    turns: dict[int, int] = field(default_factory=dict)  # live episodes by the turn they are on


def eta(elapsed_s: float, fraction: float) -> float | None:
    """Seconds left at the rate so far; None before any work is done."""
    return None if fraction <= 0 or elapsed_s <= 0 else elapsed_s * (1 - min(fraction, 1.0)) / fraction


class Reporter:
    """Polls a run's totals and reports them (see the module's docstring). `poll` gives the totals
    (merge's dict); `per_episode`: the samples of an episode that takes every turn."""

    def __init__(
        self,
        label: str,
        problems: int,
        turns: int,
        per_episode: int,
        poll: Callable[[], dict[str, Any]],
        stream: TextIO | None = None,
        tty: bool | None = None,
        every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: Any = "ray",
    ):
        self.label, self.problems, self.turns, self.per_episode = label, problems, turns, per_episode
        self.poll, self.clock = poll, clock
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.tty = tty
        self.every_s = every_s if every_s is not None else (TTY_REFRESH_S if tty else LINE_EVERY_S)
        self.metrics = metrics
        self.start_time = clock()
        self.began: float | None = None  # when the first episode was seen under way
        self._idle = self.start_time  # the last poll that saw nothing under way
        self._due: float | None = None  # when the next line is due (None: now)
        self.last: Status | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def status(self, totals: dict[str, Any], now: float) -> Status:
        """The numbers; rates and the ETA count from the first poll that saw an episode under way
        (`began`), not from the start, which holds the pipeline's start-up."""
        if self.began is None:
            if totals.get("turns") or totals.get("samples") or totals.get("finished"):
                self.began = self._idle  # it began after the last poll that saw nothing
            else:
                self._idle = now
        elapsed = max(now - self.start_time, 0.0)
        busy = max(now - self.began, 0.0) if self.began is not None else 0.0
        whole = self.problems * self.per_episode
        fraction = min(totals.get("work", 0) / whole, 1.0) if whole else 0.0
        tokens = totals.get("tokens", 0)
        return Status(
            elapsed_s=elapsed,
            problems=self.problems,
            finished=totals.get("finished", 0),
            samples=totals.get("samples", 0),
            tokens=tokens,
            fraction=fraction,
            tokens_per_s=tokens / busy if busy > 0 else 0.0,
            eta_s=eta(busy, fraction),
            turns={int(t): n for t, n in totals.get("turns", {}).items() if n},
        )

    def line(self, st: Status) -> str:
        running = sum(st.turns.values())
        if not st.turns:
            turn = "starting" if self.began is None else "turn -"
        elif len(st.turns) == 1:
            turn = f"turn {next(iter(st.turns))}/{self.turns}"
        else:  # episodes on different turns (async schedule, or batches apart)
            turn = "turns " + " ".join(f"{t}:{n}" for t, n in sorted(st.turns.items())) + f" of {self.turns}"
        rate = f"{st.tokens:,} tokens, {st.tokens_per_s:,.0f} tok/s" if st.tokens_per_s else "tok/s -"
        return (
            f"[rise {self.label}] {st.fraction:4.0%} | {turn} | problems {st.finished}/{st.problems} done, "
            f"{running} running | {st.samples:,} samples | {rate} | {fmt_duration(st.elapsed_s)} | "
            f"ETA {fmt_duration(st.eta_s)}"
        )

    def final_line(self, st: Status) -> str:
        rate = f", {st.tokens:,} tokens, {st.tokens_per_s:,.0f} tok/s" if st.tokens else ""
        return (
            f"[rise {self.label}] done: {st.finished}/{st.problems} problems, {st.samples:,} samples{rate} "
            f"in {fmt_duration(st.elapsed_s)}"
        )

    def tick(self, now: float | None = None) -> str | None:
        """Poll, update the gauges, and print when a line is due; returns what was printed."""
        now = self.clock() if now is None else now
        try:
            totals = self.poll()
        except Exception as e:
            log.debug("progress: could not poll: %s", e)
            return None
        self.last = st = self.status(totals, now)
        self._gauges(st)
        if self._due is not None and now < self._due:
            return None
        # the next line at the next point of the grid start + k * every_s (no drift from polling)
        base = now if self._due is None else self._due
        self._due = base + self.every_s * (1 + int((now - base) // self.every_s))
        text = self.line(st)
        self._write(text, final=False)
        return text

    def start(self) -> Reporter:
        self._due = self.clock() + self.every_s  # the first line one period in (a short run prints only its end)
        self._thread = threading.Thread(target=self._loop, name="rise-progress", daemon=True)
        self._thread.start()
        return self

    def stop(self, ok: bool = True) -> str | None:
        """Stop polling; print the last line (where the run finished)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=POLL_TIMEOUT_S + 5)
        try:
            totals = self.poll()
        except Exception:
            totals = None
        if totals is not None:
            self.last = self.status(totals, self.clock())
            self._gauges(self.last)
        if self.last is None:
            return None
        text = self.final_line(self.last) if ok else self.line(self.last)
        self._write(text, final=True)
        return text

    def __enter__(self) -> Reporter:
        return self.start()

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.stop(ok=exc_type is None)

    def _loop(self) -> None:
        while not self._stop.wait(min(self.every_s, TTY_REFRESH_S)):
            self.tick()

    def _write(self, text: str, final: bool) -> None:
        try:
            if self.tty:
                self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
        except Exception as e:
            log.debug("progress: could not print: %s", e)

    def _gauges(self, st: Status) -> None:
        if self.metrics == "ray":
            self.metrics = _ray_gauges()
        if self.metrics is None:
            return
        try:
            self.metrics.update(self.label, st)
        except Exception as e:
            log.debug("progress: could not set gauges: %s", e)
            self.metrics = None


class RayGauges:
    """The rise_progress_* gauges (ray.util.metrics), made once per process."""

    def __init__(self) -> None:
        from ray.util.metrics import Gauge

        def g(name: str, desc: str) -> Any:
            return Gauge(name, desc, tag_keys=("stage",))

        self.finished = g("rise_progress_problems_finished", "Problems whose episode ended, this rollout")
        self.fraction = g("rise_progress_fraction", "Share of this rollout's work done (0..1)")
        self.samples = g("rise_progress_samples", "Samples generated, this rollout")
        self.tps = g("rise_progress_tokens_per_second", "Generated tokens per second, this rollout")
        self.eta = g("rise_progress_eta_seconds", "Estimated seconds left of this rollout (-1: unknown)")
        self.turn = g("rise_progress_turn", "The highest turn in progress")

    def update(self, label: str, st: Status) -> None:
        tags = {"stage": label}
        self.finished.set(st.finished, tags)
        self.fraction.set(st.fraction, tags)
        self.samples.set(st.samples, tags)
        self.tps.set(st.tokens_per_s, tags)
        self.eta.set(-1 if st.eta_s is None else st.eta_s, tags)
        self.turn.set(max(st.turns, default=0), tags)


@functools.lru_cache(maxsize=1)
def _ray_gauges_made() -> RayGauges:
    return RayGauges()


def _ray_gauges() -> RayGauges | None:
    try:
        import ray

        return _ray_gauges_made() if ray.is_initialized() else None
    except Exception as e:
        log.debug("progress: no Ray gauges: %s", e)
        return None
