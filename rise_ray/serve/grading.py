"""Grading for /v1/rise/solve, bounded in time on any thread.

An env's grader may be slow on hostile input (math: a quadratic LaTeX fixer, sympy expanding
towers of powers), and its own signal-based time limit works on the main thread only, while
solve grades on worker threads. So every grading call (extract, grade, answer_key) runs in a
small pool of child processes: a call over the request's budget kills its process (a fresh one
replaces it) and the request gets a 422. Each request has `serve.grade_timeout_s` of grading time
in all, counted only while one of its calls runs.

The children are plain `python -m rise_ray.serve.grading` processes talking JSON over pipes
(multiprocessing's spawn would re-run the Ray worker's own __main__).
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from rise_ray.config import RunConfig
from rise_ray.envs.base import Env, Grade, Problem
from rise_ray.serve.limits import Cancelled
from rise_ray.serve.schemas import ApiError

_LEN = struct.Struct("!Q")
CANCEL_POLL_S = 0.1  # how soon a grading call notices that its client went away
READY_TIMEOUT_S = 120.0  # a fresh child imports the envs and math-verify (sympy) before serving


def _write(f: Any, obj: Any) -> None:
    data = json.dumps(obj).encode()
    f.write(_LEN.pack(len(data)) + data)
    f.flush()


def _read(f: Any) -> Any:
    head = f.read(_LEN.size)
    if len(head) < _LEN.size:
        raise EOFError("grading process closed its pipe")
    (n,) = _LEN.unpack(head)
    return json.loads(f.read(n))


class _Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rise_ray.serve.grading"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.ready = False

    def wait(self, timeout: float) -> bool:
        """Whether a reply is there within `timeout` seconds."""
        import select

        r, _, _ = select.select([self.proc.stdout], [], [], max(timeout, 0.0))
        return bool(r)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()


class GraderPool:
    """`size` grading processes. A caller waits for a free one (callers are solve threads, so at
    most serve.max_ongoing_requests wait); a call that outlives its budget kills its process."""

    def __init__(self, size: int) -> None:
        self._idle: queue.Queue[_Worker] = queue.Queue()
        for _ in range(size):
            self._idle.put(_Worker())

    def warm(self) -> None:
        """Wait until every process has imported what grading needs (start-up, not per request)."""
        workers = [self._idle.get() for _ in range(self._idle.qsize())]
        try:
            for w in workers:
                self._ensure_ready(w)
        finally:
            for w in workers:
                self._idle.put(w)

    def _ensure_ready(self, w: _Worker) -> None:
        if not w.ready:
            if not w.wait(READY_TIMEOUT_S) or _read(w.proc.stdout) != "ready":
                raise RuntimeError("grading process did not start")
            w.ready = True

    def call(
        self, env: Env, method: str, args: tuple[Any, ...], budget_s: float, cancelled: threading.Event | None = None
    ) -> tuple[Any, float]:
        """`env.method(*args)` in a child process: (result, seconds it took). Over `budget_s`:
        GradingTimeout; `cancelled` set meanwhile: Cancelled; either way the process is replaced."""
        w = self._idle.get()
        ok = False
        try:
            self._ensure_ready(w)
            start = time.monotonic()
            _write(w.proc.stdin, [env.serve_spec, method, list(args)])  # type: ignore[attr-defined]
            while not w.wait(min(CANCEL_POLL_S, budget_s - (time.monotonic() - start))):
                if cancelled is not None and cancelled.is_set():
                    raise Cancelled()
                if time.monotonic() - start >= budget_s:
                    raise GradingTimeout()
            status, value = _read(w.proc.stdout)
            ok = True
        finally:
            if not ok:
                w.kill()
                w = _Worker()
            self._idle.put(w)
        if status == "error":
            raise RuntimeError(f"grading failed: {value}")
        return (Grade(**value) if method == "grade" else value), time.monotonic() - start

    def close(self) -> None:
        while not self._idle.empty():
            self._idle.get().kill()


class GradingTimeout(ApiError):
    def __init__(self) -> None:
        super().__init__(
            422, "answer: grading this request's attempts took longer than the server's grading time limit "
            "(serve.grade_timeout_s)", "answer", "grading_timeout"
        )


def serve_env(cfg: RunConfig, name: str) -> Env:
    """The env `name` for grading and prompts, without problems: the training env with its own
    options (the prompts and feedback it was trained on), any other with the shared ones."""
    from rise_ray.envs import REGISTRY, get_env
    from rise_ray.envs import accepted_options as env_options
    from rise_ray.envs import env_options as cfg_env_options

    if name not in REGISTRY:
        raise ApiError(400, f"env: unknown env {name!r}; known: {sorted(REGISTRY)}", "env", "unknown_env")
    e = cfg.env
    if name == e.name:
        opts = cfg_env_options(e, with_data=False)
    else:
        opts = {"feedback": e.feedback, "repeat_question": e.repeat_question, "unparsed_reward": e.unparsed_reward}
    accepted = env_options(name)
    opts.update({k: 0 for k in ("num_train", "num_test") if k in accepted})  # grading needs no problems
    opts = {k: v for k, v in opts.items() if k in accepted}
    env = get_env(name, **opts)
    env.serve_spec = {"name": name, "options": opts}  # type: ignore[attr-defined]  # how a grading process builds it
    return env


class BoundedEnv:
    """An env for one solve request: prompts come from `env`; grading goes through the pool under
    the request's time budget. Grading uses `grade` (answer and correctness), not `grade_problem`:
    a problem typed by a client carries none of the data set's meta that reward shaping reads, and
    a served answer needs no reward."""

    def __init__(self, env: Env, pool: GraderPool, budget_s: float, cancelled: threading.Event | None = None) -> None:
        self.env = env
        self.pool = pool
        self.cancelled = cancelled
        self.left_s = budget_s
        self._keys: dict[str | None, str | None] = {}
        self._lock = threading.Lock()

    def _call(self, method: str, *args: Any) -> Any:
        with self._lock:
            if self.left_s <= 0:
                raise GradingTimeout()
            value, took = self.pool.call(self.env, method, args, self.left_s, self.cancelled)
            self.left_s -= took
            return value

    def __getattr__(self, name: str) -> Any:  # first_prompt, feedback_message, name, ...
        return getattr(self.env, name)

    def grade_problem(self, response: str, problem: Problem) -> Grade:
        if not problem.reference:  # no gold answer: only the answer is read
            answer = self._call("extract", response)
            return Grade(False, answer, self.env.unparsed_reward if answer is None else self.env.wrong_reward)
        return self._call("grade", response, problem.reference)

    def answer_key(self, answer: str | None) -> str | None:
        if answer is None:
            return None
        if answer not in self._keys:
            self._keys[answer] = self._call("answer_key", answer)
        return self._keys[answer]


def _main() -> None:
    """The child: read [env spec, method, args], write ["ok", result] or ["error", text], as JSON
    (a child that grades hostile text never sends the replica anything but data)."""
    parent = os.getppid()

    def orphaned() -> None:  # a replica that died leaves no grading process spinning in sympy
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, not into the reply pipe
    inp = sys.stdin.buffer
    from rise_ray.envs import get_env
    from rise_ray.envs.math import _mv, symbolic_equal

    _mv()
    symbolic_equal("1/2", "0.5", None)  # sympy's first parse is the slow one
    _write(out, "ready")
    envs: dict[str, Env] = {}
    while True:
        try:
            spec, method, args = _read(inp)
        except EOFError:
            return
        try:
            key = json.dumps(spec, sort_keys=True)
            if key not in envs:
                envs[key] = get_env(spec["name"], **spec["options"])
            result = getattr(envs[key], method)(*args)
            reply: list[Any] = ["ok", dataclasses.asdict(result) if isinstance(result, Grade) else result]
        except Exception as e:  # a grader bug answers this call, the process keeps serving
            reply = ["error", f"{type(e).__name__}: {e}"]
        _write(out, reply)


if __name__ == "__main__":
    _main()
