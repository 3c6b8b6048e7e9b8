"""jobs/README.md's recipe on a real Ray cluster with token authentication: `ray start --head`,
`ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- rise run ...`, the job's
status, logs and run directory.

The cluster has its own ports, temp dir and token file, runs in its own session and is stopped by
killing that process group: `ray stop` would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from test_driver import TINY  # the tiny sizes of the end-to-end driver test

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `ray` and `rise`: the cluster runs from this venv

STAGES = (
    ["base_model", "iter_0/eval"]
    + [f"iter_1/{s}" for s in ("collect", "dataset", "train", "sync", "eval")]
    + ["report"]
)


@dataclass
class Cluster:
    dashboard: str  # http://127.0.0.1:PORT: the job submission address
    token: str
    # What a client on this machine needs: RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, RAY_ADDRESS.
    env: dict[str, str]
    root: Path


def free_ports(n: int) -> list[int]:
    """n ports free right now (held open together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop_group(proc: subprocess.Popen) -> None:
    """Stop `ray start --block` and everything it started: all of it is in its process group."""
    proc.terminate()  # --block: Ray stops the node's processes (GCS, raylet, workers) in order
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    for _ in range(20):  # whatever is left
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    proc.wait(timeout=10)


@contextmanager
def local_cluster(num_cpus: int = 2):
    # Short root under /tmp: Ray's unix socket paths (ROOT/session_*/sockets/...) must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="rjob", dir="/tmp"))
    token = secrets.token_hex(32)
    token_path = root / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.pop("DS_ACCELERATOR", None)  # as on a user's cluster: the trainer sets it itself without GPUs
    # Token auth from a file of our own: ~/.ray/auth_token stays untouched.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    gcs, dash, client, agent = free_ports(4)
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", f"--temp-dir={root / 'ray'}", f"--num-cpus={num_cpus}",
        "--num-gpus=0", f"--port={gcs}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--object-store-memory={512 * 2**20}", "--disable-usage-stats",
    ]  # fmt: skip
    log = open(root / "ray_start.log", "w")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (root / "ray_start.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "dashboard never answered"
            try:
                auth = {"Authorization": f"Bearer {token}"}
                if requests.get(f"{dashboard}/api/jobs/", headers=auth, timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        yield Cluster(dashboard, token, {**env, "RAY_ADDRESS": dashboard}, root)
    finally:
        stop_group(proc)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def ray_cli(cluster: Cluster, *args: str, timeout: float = 120) -> str:
    cmd = [str(BIN / "ray"), *args]
    out = subprocess.run(cmd, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def submit(cluster: Cluster, submission_id: str, *entrypoint: str) -> None:
    """The recipe of jobs/README.md, from the repository root."""
    recipe = ["job", "submit", "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml"]
    ray_cli(cluster, *recipe, "--no-wait", f"--submission-id={submission_id}", "--", *entrypoint)


def wait(client, submission_id: str, timeout: float):
    """The job's final JobInfo; a job still running at the deadline is stopped and fails the test."""
    deadline = time.monotonic() + timeout
    while not (info := client.get_job_info(submission_id)).status.is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(submission_id)
            logs = client.get_job_logs(submission_id)[-4000:]
            pytest.fail(f"job {submission_id} still {info.status} after {timeout} s:\n{logs}")
        time.sleep(2)
    return info


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rise_run_as_a_ray_job_with_token_auth():
    from ray.job_submission import JobStatus, JobSubmissionClient

    started = time.monotonic()
    with local_cluster() as cluster:
        # Token auth is on: no token, 401; the cluster's token, 200.
        assert requests.get(f"{cluster.dashboard}/api/jobs/", timeout=10).status_code == 401
        client = JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {cluster.token}"})

        # The job imports rise_ray from its uploaded working dir, not from the venv's install.
        submit(cluster, "where", "python", "-c", "import rise_ray; print('RISE_RAY_FROM', rise_ray.__file__)")
        assert wait(client, "where", 120).status == JobStatus.SUCCEEDED, client.get_job_logs("where")
        # The last occurrence: the logs start by echoing the entrypoint.
        where = client.get_job_logs("where").rsplit("RISE_RAY_FROM ", 1)[1].split()[0]
        assert "working_dir_files" in where and not where.startswith(str(REPO)), where

        run_dir = cluster.root / "runs"
        tiny = [o for o in TINY if not o.startswith("iterations=")] + ["iterations=1"]
        submit(cluster, "tiny-run", "rise", "run", f"run_dir={run_dir}", "name=job", *tiny)
        info = wait(client, "tiny-run", 420)
        logs = ray_cli(cluster, "job", "logs", "tiny-run")  # the CLI with the token from RAY_AUTH_TOKEN_PATH
        assert info.status == JobStatus.SUCCEEDED, logs[-5000:]
        assert info.entrypoint.startswith("rise run ")
        assert "succeeded" in ray_cli(cluster, "job", "status", "tiny-run").lower()
        for stage in STAGES[:-1]:
            assert f"[rise] {stage}: start" in logs and f"[rise] {stage}: finished" in logs, stage
        assert "RISE run job" in logs and "m1@t2" in logs  # the final table

        manifest = json.loads((run_dir / "job" / "manifest.json").read_text())
        assert list(manifest["stages"]) == STAGES
        ckpt = run_dir / "job" / manifest["stages"]["iter_1/train"]["output"]  # stored relative to the run
        assert (ckpt / "model.safetensors").exists() and str(ckpt).startswith(str(run_dir / "job" / "iter_1"))
        metrics = json.loads((run_dir / "job" / "metrics.json").read_text())
        assert [m["iteration"] for m in metrics["iterations"]] == [0, 1]
    print(f"\ncluster start, two jobs, stop: {time.monotonic() - started:.0f} s")
