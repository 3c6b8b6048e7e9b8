"""What every RISE environment provides: problems, a grader and the feedback text.

An environment is a multi-turn MDP over one problem: the model answers, the grader scores the
answer, and if it is wrong the conversation goes on with the feedback message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

INCORRECT_FEEDBACK = "The answer is incorrect. Please try again."


class DataError(ValueError):
    """A data row that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    reference: str  # the data set's own gold field (GSM8K `answer`, MATH `solution`, ...)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Grade:
    correct: bool
    answer: str | None  # the extracted final answer; None when none could be read
    reward: float


@dataclass
class Env:
    """Base class. Subclasses implement `gold` and `is_equivalent` (and `extract` where the last
    \\boxed{} is not the answer), and set the problems."""

    name: str = "base"
    train: list[Problem] = field(default_factory=list)
    test: list[Problem] = field(default_factory=list)
    val: list[Problem] = field(default_factory=list)  # held out from train and test, for tuning
    system_prompt: str | None = None
    feedback: str = INCORRECT_FEEDBACK
    repeat_question: bool = True  # the paper repeats the question after the feedback
    correct_reward: float = 1.0
    wrong_reward: float = 0.0
    unparsed_reward: float = -1.0  # the paper's GSM8K code gives -1 when no answer can be read
    # "paper": the paper's code's answer reading and check, for the envs it has one for (gsm8k, math:
    # they override `paper_grade`; rise_ray.envs.paper_grading), so numbers compare with the paper's tables.
    grading: str = "default"

    def __post_init__(self) -> None:
        allowed = ["default", "paper"] if self.has_paper_grading() else ["default"]
        if self.grading not in allowed:
            raise ValueError(f"env {self.name!r}: grading must be one of {allowed}, got {self.grading!r}")

    def split(self, name: str) -> list[Problem]:
        """The problems of split `name` (train, val or test); an empty split is a ValueError naming it."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}: expected train, val or test")
        problems = getattr(self, name)
        if not problems:
            raise ValueError(f"env {self.name!r} has no {name} problems" + (
                " (only the search env generates a validation split)" if name == "val" else ""))
        return problems

    # --- to implement (extract has a default) -------------------------------------------------
    def extract(self, response: str) -> str | None:
        """The model's final answer in `response`, or None when none can be read: by default the
        content of the last \\boxed{...}."""
        from rise_ray.envs.answers import last_boxed

        if not isinstance(response, str):
            return None
        ans = last_boxed(response)
        return ans.strip() if ans and ans.strip() else None

    def gold(self, reference: str) -> str:
        """The gold answer inside a reference field."""
        raise NotImplementedError

    def is_equivalent(self, answer: str, gold: str) -> bool:
        raise NotImplementedError

    def paper_grade(self, response: str, reference: str) -> Grade:
        """The grade the paper's code gives (`grading: paper`); only envs the paper has code for
        override it, and only they accept grading "paper"."""
        raise NotImplementedError(f"env {self.name!r} has no paper grading")

    @classmethod
    def has_paper_grading(cls) -> bool:
        return cls.paper_grade is not Env.paper_grade

    # --- shared -------------------------------------------------------------------------------
    def grade(self, response: str, reference: str) -> Grade:
        if self.grading == "paper":
            return self.paper_grade(response, reference)
        answer = self.extract(response)
        if answer is None:
            return Grade(False, None, self.unparsed_reward)
        ok = self.is_equivalent(answer, self.gold(reference))
        return Grade(ok, answer, self.correct_reward if ok else self.wrong_reward)

    def grade_problem(self, response: str, problem: Problem) -> Grade:
        """The grade a rollout records for `response` to `problem`. By default `grade` against the
        reference; an env may also grade the written work into the reward (never into `correct`,
        which the metrics read)."""
        return self.grade(response, problem.reference)

    def answer_key(self, answer: str | None) -> str | None:
        """A canonical form used for majority voting (equal keys = same answer)."""
        return None if answer is None else answer.strip()

    def first_prompt(self, problem: Problem) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*msgs, {"role": "user", "content": problem.question}]

    def feedback_message(self, problem: Problem) -> dict[str, str]:
        text = f"{self.feedback}\n\n{problem.question}" if self.repeat_question else self.feedback
        return {"role": "user", "content": text}


MAX_LINE_BYTES = 16 * 2**20  # one problem per line: far more than any real row, far less than memory
MAX_DEPTH = 64  # nesting of a row's values: real rows are flat; deeper ones would overflow the stack later


def iter_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-blank line; a bad line is a DataError naming file and line."""
    import json

    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:  # read no further: the line may be larger than memory
                raise DataError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES} bytes; one problem per line")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte {e.start}: {e.reason})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: JSON nested more than {MAX_DEPTH} levels deep") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            if _depth(row) > MAX_DEPTH:
                raise DataError(f"{path}:{lineno}: JSON nested more than {MAX_DEPTH} levels deep")
            yield lineno, row


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            if d <= MAX_DEPTH:
                stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def require_fields(row: dict[str, Any], fields: Iterable[str], where: str) -> None:
    for name in fields:
        value = row.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where}: row has no '{name}' (fields present: {sorted(row)})")


def load_problems(
    path: str, split: str, limit: int | None, hub_config: str | None, name: str, fields: tuple[str, str],
    check: Callable[[str], str | None],
) -> list[Problem]:
    """Problems `{name}-{split}-{i}` from a local JSONL (or a hub name): `fields` = (question, reference)
    must be strings, `check(reference)` says what is wrong with a reference (None: nothing); the
    row's other fields are the problem's meta."""
    out: list[Problem] = []
    for where, index, row in iter_rows(path, split, hub_config):
        if limit is not None and len(out) >= limit:
            break
        require_fields(row, fields, where)
        question, reference = row[fields[0]], row[fields[1]]
        if not isinstance(question, str) or not isinstance(reference, str):
            raise DataError(f"{where}: fields {fields[0]!r} and {fields[1]!r} must be strings")
        problem = check(reference)
        if problem is not None:
            raise DataError(f"{where}: field {fields[1]!r} {problem}")
        meta = {k: v for k, v in row.items() if k not in fields}
        out.append(Problem(f"{name}-{split}-{index}", question, reference, meta))
    return out


def load_splits(
    load: Callable[..., list[Problem]], train_path: str | None, test_path: str | None,
    num_train: int | None, num_test: int | None, hub_config: str | None,
) -> dict[str, list[Problem]]:
    """A dataset env's train and test problems, `load(path, split, limit, hub_config)` for each; a
    split whose path is None stays empty (the caller names the data)."""
    return {
        "train": load(train_path, "train", num_train, hub_config) if train_path else [],
        "test": load(test_path, "test", num_test, hub_config) if test_path else [],
    }


def is_hub_name(path: str) -> bool:
    """Whether iter_rows reads `path` from the hub: not a local file, and not written as one (a
    mistyped local path is a DataError, never a hub query)."""
    import os

    return not os.path.isfile(path) and not (path.endswith((".jsonl", ".json")) or path.startswith(("/", "./", "../", "~")))


def iter_rows(path: str, split: str, hub_config: str | None = None) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(where, line or row number, row) from a local JSONL file, else from a `datasets` hub name.

    `where` ("file:line" or "name[split]:row") is what DataErrors quote. The hub is only tried
    when `path` is not an existing local file, so a mistyped local path still says so clearly.
    """
    import os

    if os.path.isfile(path):
        for lineno, row in iter_jsonl(path):
            yield f"{path}:{lineno}", lineno, row
        return
    if not is_hub_name(path):
        raise DataError(f"{path}: no such data file")
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise DataError(f"{path}: not a local file, and the `datasets` package is not installed") from None
    local = "set env.train_path / env.test_path to local JSONL files (one JSON object per line)"
    if (endpoint := unreachable_hub()) is not None:
        raise DataError(f"{path}: not a local file, and the hub ({endpoint}) cannot be reached: {local}, "
                        "or set HF_HUB_OFFLINE=1 to read a copy already in the datasets cache")
    try:
        rows = datasets.load_dataset(path, hub_config, split=split)
    except Exception as e:  # any hub failure becomes one clear data error
        raise DataError(f"{path}: not a local file, and loading it from the hub failed: {e}; or {local}") from e
    for i, row in enumerate(rows, start=1):
        yield f"{path}[{split}]:{i}", i, dict(row)


def unreachable_hub(timeout_s: float = 3.0) -> str | None:
    """The hub's address when it cannot be reached (None: reachable, or offline mode is set). Without
    this check an offline machine spends half a minute in the hub client's retries before failing."""
    import os
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
    except OSError:
        return endpoint
    return None
