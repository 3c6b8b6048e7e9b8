"""`rise run` end to end: the run directory, the manifest, metrics, and resume after SIGKILL.

Both tests run whole `rise run`s (a warm-up, two iterations): they are slow, and CI runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter

import pyarrow.parquet as pq
import pytest

# Tiny sizes: the loop, not the learning, is under test. The warm-up is just long enough (60 steps)
# for the base model to write readable answers, some right: metrics of all-wrong records check little.
TINY = [
    "env.num_train=48", "env.num_test=16", "iterations=2",
    "warmup.num_problems=960", "warmup.train={epochs: 2, lr: 0.003, micro_batch_size: 32}",
    "rollout.best_of_n=2", "rollout.turns=2", "rollout.max_tokens=16", "rollout.batch_size=16",
    "rollout.num_cpus_per_engine=0.5", "eval.turns=2", "eval.parallel=2", "eval.max_tokens=16",
    "eval.batch_size=16", "train.micro_batch_size=16", "train.lr=0.001",
]  # fmt: skip
STAGES = ["base_model", "iter_0/eval"] + [
    f"iter_{k}/{s}" for k in (1, 2) for s in ("collect", "dataset", "train", "sync", "eval")
] + ["report"]

# `rise run` whose process group is SIGKILLed, as a crash or the OOM killer would, the moment the
# stage named by RISE_TEST_KILL_AT begins its work: after the stage's start, before its output.
KILL_AT_STAGE = """
import os, signal, sys
from rise_ray import manifest
from rise_ray.cli import main

victim, run_stage = os.environ["RISE_TEST_KILL_AT"], manifest.Manifest.run_stage

def killed_at(self, stage, fn, *args):
    def work(*a):
        if stage == victim:
            os.killpg(0, signal.SIGKILL)
        return fn(*a)
    return run_stage(self, stage, work, *args)

manifest.Manifest.run_stage = killed_at
sys.exit(main(sys.argv[1:]))
"""


def rise(*args: str, kill_at: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rise_ray.cli"] if kill_at is None else [sys.executable, "-c", KILL_AT_STAGE]
    env = {**os.environ, **({"RISE_TEST_KILL_AT": kill_at} if kill_at else {})}
    return subprocess.Popen([*cmd, *args], start_new_session=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def trajectories(run_dir: str, k: int) -> int:
    return pq.read_table(os.path.join(run_dir, f"iter_{k}", "trajectories")).num_rows


def metrics_of_records(path: str, turns: int, parallel: int, key) -> dict:
    """The evaluation metrics recomputed here from the stored records (rise_ray.eval.metrics's
    definitions: majorities score a j-way tie holding the right answer 1/j; unreadable answers and
    turns not taken do not vote)."""
    recs = pq.read_table(path).to_pylist()
    n = len(recs)

    def vote(answers, correct):
        keys = [key(a) for a in answers]
        counts = Counter(k for k in keys if k is not None)
        if not counts:
            return 0.0, 0
        top = max(counts.values())
        winners = [k for k, c in counts.items() if c == top]
        right = {k for k, c in zip(keys, correct, strict=True) if c and k is not None}
        return sum(w in right for w in winners) / len(winners), len(winners)

    out = dict.fromkeys(["m1@t1", f"m{parallel}@t1", f"p{parallel}@t1", f"m1@t{turns}", f"p1@t{turns}",
                         "wrong_to_right", "right_to_wrong", "tie_rate", "tie_rate_parallel"], 0.0)  # fmt: skip
    acc = [0.0] * turns
    for rec in recs:
        ts = rec["turns"][:turns]
        answers = [t["answer"] for t in ts] + [None] * (turns - len(ts))
        correct = [bool(t["correct"]) for t in ts] + [False] * (turns - len(ts))
        first = rec["turns"][0]
        par = vote(first["candidate_answers"][:parallel], first["candidate_correct"][:parallel])
        seq = vote(answers, correct)
        out["m1@t1"] += correct[0]
        out[f"m{parallel}@t1"] += par[0]
        out[f"p{parallel}@t1"] += any(first["candidate_correct"][:parallel])
        out[f"m1@t{turns}"] += seq[0]
        out[f"p1@t{turns}"] += any(correct)
        out["tie_rate"] += seq[1] >= 2
        out["tie_rate_parallel"] += par[1] >= 2
        for i in range(turns):
            acc[i] += correct[i]
        for i in range(turns - 1):
            out["wrong_to_right"] += (not correct[i] and correct[i + 1]) / (turns - 1)
            out["right_to_wrong"] += (correct[i] and not correct[i + 1]) / (turns - 1)
    return {**{k: v / n for k, v in out.items()}, "acc_by_turn": [a / n for a in acc], "num_problems": n}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_short_run_writes_the_run_directory(tmp_path):
    from rise_ray.config import load_config
    from rise_ray.session import make_env

    out = finish(rise("run", f"run_dir={tmp_path}", "name=short", *TINY, "data.aggregate=true"))
    run_dir = tmp_path / "short"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert list(manifest["stages"]) == STAGES
    # the metrics are the ones the evaluation records give, iteration by iteration
    cfg = load_config(str(run_dir / "config.yaml"))
    key = make_env(cfg.env).answer_key
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [m["iteration"] for m in metrics["iterations"]] == [0, 1, 2] and metrics["wall_s"] > 0
    assert any(m["p1@t2"] > 0 for m in metrics["iterations"])  # right answers to count (not all zeros)
    for k, m in enumerate(metrics["iterations"]):
        records = run_dir / f"iter_{k}" / "eval" / "records.parquet"
        want = metrics_of_records(str(records), cfg.eval.turns, cfg.eval.parallel, key)
        assert want["num_problems"] == 16
        assert m["acc_by_turn"] == pytest.approx(want.pop("acc_by_turn")), f"iteration {k}"
        assert {name: m[name] for name in want} == pytest.approx(want), f"iteration {k}"
        assert m == json.loads((run_dir / f"iter_{k}" / "eval" / "metrics.json").read_text()) | {"iteration": k}
        assert manifest["stages"][f"iter_{k}/eval"]["output"]["m1@t1"] == pytest.approx(want["m1@t1"])
    # data.aggregate (the paper's; the embedded default turns it off): iteration 2 trains on the
    # trajectories of iterations 1 and 2
    stats = json.loads((run_dir / "iter_2" / "dataset" / "stats.json").read_text())
    assert stats["trajectories_in"] == 96 and len(stats["source"]) == 2
    for k in (1, 2):
        assert trajectories(str(run_dir), k) == 48
        ckpt = os.path.join(run_dir, manifest["stages"][f"iter_{k}/train"]["output"])  # stored relative
        assert ckpt.startswith(str(run_dir / f"iter_{k}" / "checkpoint"))
        assert os.path.exists(os.path.join(ckpt, "config.json")) and os.path.exists(os.path.join(ckpt, "model.safetensors"))
        assert manifest["stages"][f"iter_{k}/sync"]["output"]["max_logprob_error"] < 1e-2
    for f in ("config.yaml", "report.md", "turns.png", "iter_0/eval/records.parquet"):
        assert (run_dir / f).exists(), f
    assert "m1@t2" in out  # the terminal table
    assert "[rise] protocol: departs from the paper's in" in out and "rollout.stop_when_correct" in out
    # `rise report` regenerates the report from the run directory: the same metrics
    (run_dir / "metrics.json").unlink()
    finish(rise("report", str(run_dir)))
    again = json.loads((run_dir / "metrics.json").read_text())
    assert again["iterations"] == metrics["iterations"]


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("stage", ["iter_1/collect", "iter_2/train"])
def test_resume_after_sigkill(tmp_path, stage):
    proc = rise("run", f"run_dir={tmp_path}", "name=killed", *TINY, kill_at=stage)
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == -signal.SIGKILL, log[-3000:]
    assert f"[rise] {stage}: start" in log
    run_dir = tmp_path / "killed"
    before = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert list(before) == STAGES[: STAGES.index(stage)]  # everything before it finished; it was cut off
    out = finish(rise("run", "--resume", str(run_dir)))
    for done in before:
        assert f"[rise] {done}: done earlier, skipped" in out  # nothing finished is redone
    after = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert list(after) == STAGES
    for k in (1, 2):  # same number of trajectories as an uninterrupted run (48 per iteration)
        assert trajectories(str(run_dir), k) == 48
