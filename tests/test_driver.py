"""`rise run` end to end: the run directory, the manifest, metrics, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

# Tiny sizes: the loop, not the learning, is under test.
TINY = [
    "env.num_train=48", "env.num_test=16", "iterations=2",
    "warmup.num_problems=96", "warmup.train={epochs: 1, lr: 0.003, micro_batch_size: 32}",
    "rollout.best_of_n=2", "rollout.turns=2", "rollout.max_tokens=16", "rollout.batch_size=16",
    "rollout.num_cpus_per_engine=0.5", "eval.turns=2", "eval.parallel=2", "eval.max_tokens=16",
    "eval.batch_size=16", "train.micro_batch_size=16", "train.lr=0.001",
]
STAGES = ["base_model", "iter_0/eval"] + [
    f"iter_{k}/{s}" for k in (1, 2) for s in ("collect", "dataset", "train", "sync", "eval")
] + ["report"]


def rise(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rise_ray.cli", *args], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def trajectories(run_dir: str, k: int) -> int:
    return pq.read_table(os.path.join(run_dir, f"iter_{k}", "trajectories")).num_rows


@pytest.mark.timeout(900)
def test_short_run_writes_the_run_directory(tmp_path):
    out = finish(rise("run", f"run_dir={tmp_path}", "name=short", *TINY, "data.aggregate=true"))
    run_dir = tmp_path / "short"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert list(manifest["stages"]) == STAGES
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [m["iteration"] for m in metrics["iterations"]] == [0, 1, 2] and metrics["wall_s"] > 0
    for m in metrics["iterations"]:
        for key in ("m1@t1", "m2@t1", "p2@t1", "m1@t2", "p1@t2", "acc_by_turn", "wrong_to_right", "right_to_wrong",
                    "tie_rate", "tie_rate_parallel"):
            assert key in m
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
    # `rise report` regenerates the report from the run directory
    finish(rise("report", str(run_dir)))


def kill_at(marker: str, run_dir, name: str) -> str:
    """Start a run, SIGKILL its whole process group once `marker` is logged, return the log."""
    proc = rise("run", f"run_dir={run_dir}", f"name={name}", *TINY)
    log = []
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        log.append(line)
        if marker in line:  # kill at once: on a fast machine a stage can finish within a second
            os.killpg(proc.pid, signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "marker never appeared"
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(log)[-3000:]
    return "".join(log)


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("stage", ["iter_1/collect", "iter_2/train"])
def test_resume_after_sigkill(tmp_path, stage):
    kill_at(f"[rise] {stage}: start", tmp_path, "killed")
    run_dir = tmp_path / "killed"
    before = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert stage not in before  # it was cut off mid-stage
    out = finish(rise("run", "--resume", str(run_dir)))
    for done in before:
        assert f"[rise] {done}: done earlier, skipped" in out  # nothing finished is redone
    after = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert list(after) == STAGES
    for k in (1, 2):  # same number of trajectories as an uninterrupted run (48 per iteration)
        assert trajectories(str(run_dir), k) == 48
