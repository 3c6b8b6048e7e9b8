"""Grading for /v1/rise/solve, bounded in time, off the event loop.

An env's grader may be slow on hostile input (math: a quadratic LaTeX fixer, sympy expanding
towers of powers), and its own signal-based time limit works on the main thread only. So every
grading call (extract, grade, answer_key) runs in a small pool of child processes: a call over the
request's budget kills its process (a fresh one replaces it) and the request gets a 422; a call
whose request is cancelled (its client went away) kills its process too. Each request has `serve.grade_timeout_s` of grading time in all,
counted only while one of its calls runs.

The children are plain `python -m rise_ray.serve.grading` processes talking JSON over pipes
(multiprocessing's spawn would re-run the Ray worker's own __main__).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from rise_ray.config import RunConfig
from rise_ray.envs.base import Env, Grade, Problem
from rise_ray.serve.schemas import ApiError

_LEN = struct.Struct("!Q")
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

    def ensure_ready(self) -> None:
        """Wait (blocking) until the process has imported what grading needs."""
        import select

        if not self.ready:
            r, _, _ = select.select([self.proc.stdout], [], [], READY_TIMEOUT_S)
            if not r or _read(self.proc.stdout) != "ready":
                raise RuntimeError("grading process did not start")
            self.ready = True

    def ask(self, message: Any) -> Any:
        """Send one call, wait (blocking) for its reply."""
        _write(self.proc.stdin, message)
        return _read(self.proc.stdout)

    def kill(self) -> None:  # a thread blocked in ask() then reads EOF
        self.proc.kill()
        self.proc.wait()


class GraderPool:
    """`size` grading processes for the event loop. A call waits for a free process; its blocking
    pipe I/O runs on a thread, so the loop never waits on a grader. A call that outlives its budget,
    or whose request is cancelled (the client went away), kills its process; a fresh one replaces it."""

    def __init__(self, size: int) -> None:
        self._workers = [_Worker() for _ in range(size)]
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        for w in self._workers:
            self._idle.put_nowait(w)

    def warm(self) -> None:
        """Wait until every process is ready (start-up, not per request): a broken one fails here."""
        for w in self._workers:
            w.ensure_ready()

    async def call(self, spec: dict[str, Any], method: str, args: tuple[Any, ...], budget_s: float) -> tuple[Any, float]:
        """`method(*args)` of the env `spec` (serve_env) in a child process: (result, seconds it
        took). Over `budget_s`: GradingTimeout."""
        w = await self._idle.get()
        ok = False
        try:
            await asyncio.to_thread(w.ensure_ready)  # a fresh process: not counted in the budget
            start = time.monotonic()
            status, value = await asyncio.wait_for(asyncio.to_thread(w.ask, [spec, method, list(args)]), budget_s)
            ok = True
        except TimeoutError:
            raise GradingTimeout() from None
        finally:
            if not ok:
                w.kill()
                w = _Worker()
            self._idle.put_nowait(w)
        if status == "error":
            raise RuntimeError(f"grading failed: {value}")
        return (Grade(**value) if method == "grade" else value), time.monotonic() - start


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


class RequestGrader:
    """The env of one solve request. Prompts come from `env`; grading runs in the pool under the
    request's time budget (serve.grade_timeout_s in all, counted while its calls run), awaited by
    the ingress (`grade`, `key`) before the episode, which reads the results (`grade_problem`,
    `answer_key`: the Env methods rise_ray.rollout.episodes and serve.results call).

    Grading uses `grade` (answer and correctness), not `grade_problem`: a problem typed by a client
    carries none of the data set's meta that reward shaping reads, and a served answer needs no reward."""

    def __init__(self, env: Env, pool: GraderPool, budget_s: float) -> None:
        self.env = env
        self.pool = pool
        self.left_s = budget_s
        self._grades: dict[str, Grade] = {}
        self._keys: dict[str | None, str | None] = {None: None}

    def __getattr__(self, name: str) -> Any:  # first_prompt, feedback_message, name, ...
        return getattr(self.env, name)

    async def _call(self, method: str, *args: Any) -> Any:
        if self.left_s <= 0:
            raise GradingTimeout()
        value, took = await self.pool.call(self.env.serve_spec, method, args, self.left_s)  # type: ignore[attr-defined]
        self.left_s -= took
        return value

    async def grade(self, response: str, problem: Problem) -> None:
        if response in self._grades:
            return
        if not problem.reference:  # no gold answer: only the answer is read
            answer = await self._call("extract", response)
            reward = self.env.unparsed_reward if answer is None else self.env.wrong_reward
            self._grades[response] = Grade(False, answer, reward)
        else:
            self._grades[response] = await self._call("grade", response, problem.reference)

    async def key(self, answer: str | None) -> None:
        if answer not in self._keys:
            self._keys[answer] = await self._call("answer_key", answer)

    def grade_problem(self, response: str, problem: Problem) -> Grade:
        return self._grades[response]

    def answer_key(self, answer: str | None) -> str | None:
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
