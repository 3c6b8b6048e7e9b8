"""The run directory's guarantees: one run at a time (lock), the config its stages ran with
(fingerprints), clear errors for damage, paths relative to the run, and safe JSONL reading.

No stage here trains or samples: runs are made of tiny fake stages written through the real
Manifest, and `rise run` is driven with env.name=nosuch, so a run that gets past the run
directory's checks stops at once at make_env (exit 2, "unknown env") instead of starting Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rise_ray import cli
from rise_ray.config import DEFAULT_CONFIG, ConfigError, load_config
from rise_ray.envs.base import DataError
from rise_ray.manifest import Manifest

REPO = Path(__file__).resolve().parents[1]
BASE = ["env.name=nosuch", "iterations=1"]  # past the checks, make_env fails fast (no Ray, no model)
STAGES = ["base_model", "iter_0/eval", "iter_1/collect", "iter_1/dataset", "iter_1/train", "iter_1/sync", "iter_1/eval"]


def fake_run(run_dir: Path, overrides: list[str] = ()) -> None:
    """A finished run of tiny stages: each writes where the driver's stage does, records its output."""
    from rise_ray.manifest import open_run_dir

    run_dir = run_dir.absolute()  # as driver.run does: stage outputs are absolute paths
    cfg = load_config(DEFAULT_CONFIG, [f"run_dir={run_dir.parent}", f"name={run_dir.name}", *BASE, *overrides])
    m = open_run_dir(cfg, str(run_dir))

    def write(rel: str, out=None):
        path = run_dir / rel
        path.mkdir(parents=True, exist_ok=True)
        (path / "part").write_text("x")
        return {"path": str(path)} if out is None else out

    def evaluate(k: int) -> dict:
        write(f"iter_{k}/eval")
        (run_dir / f"iter_{k}" / "eval" / "metrics.json").write_text('{"m1@t1": 0.5}')
        return {"iteration": k, "m1@t1": 0.5}

    m.run_stage("base_model", write, "warmup/model", str(run_dir / "warmup" / "model"))
    m.run_stage("iter_0/eval", evaluate, 0)
    m.run_stage("iter_1/collect", write, "iter_1/trajectories")
    m.run_stage("iter_1/dataset", write, "iter_1/dataset")
    m.run_stage("iter_1/train", write, "iter_1/checkpoint/model", str(run_dir / "iter_1" / "checkpoint" / "model"))
    m.run_stage("iter_1/sync", lambda: {"method": "files"})
    m.run_stage("iter_1/eval", evaluate, 1)


def rise(capsys, *args: str) -> tuple[int, str]:
    """`rise ARGS` in this process: exit code and everything printed."""
    rc = cli.main(list(args))
    out = capsys.readouterr()
    return rc, out.out + out.err


def stages(run_dir: Path) -> list[str]:
    return list(json.loads((run_dir / "manifest.json").read_text())["stages"])


def config_value(run_dir: Path, section: str, field: str):
    return load_config(str(run_dir / "config.yaml")).model_dump()[section][field]


# --- 7: the lock ---------------------------------------------------------------------------------

HOLDER = """
import sys, time
from rise_ray.config import load_config
from rise_ray.manifest import RunLock, open_run_dir

run_dir = sys.argv[1]
cfg = load_config(None, sys.argv[2:])
with RunLock(run_dir):
    manifest = open_run_dir(cfg, run_dir)

    def stage():
        print("holding", flush=True)
        time.sleep(600)

    manifest.run_stage("base_model", stage)
"""


def python(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, *args], env=env, cwd=kw.pop("cwd", REPO), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def test_lock_stops_a_second_run_and_is_taken_over_after_sigkill(tmp_path, capsys):
    run_dir = tmp_path / "r"
    holder = python("-c", HOLDER, str(run_dir), *BASE)
    try:
        assert any(line.strip() == "holding" for line in holder.stdout), "the holder never started its stage"
        config = (run_dir / "config.yaml").read_text()
        for args in (["run", f"run_dir={tmp_path}", "name=r", *BASE], ["run", "--resume", str(run_dir)]):
            rc, out = rise(capsys, *args, "rollout.turns=2")  # a second run (this process, its own flock)
            assert rc == 2, out
            assert f"in use by another rise run (pid {holder.pid} on host {socket.gethostname()}" in out, out
            assert "unknown env" not in out, out  # stopped before anything ran
        assert holder.poll() is None  # the holder still runs
        assert (run_dir / "config.yaml").read_text() == config  # nor its directory
        assert not (run_dir / "manifest.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    # The kernel dropped the dead holder's flock: a real `rise run --resume` takes the directory and
    # gets as far as make_env (the config's unknown env), exit 2.
    proc = python("-m", "rise_ray.cli", "run", "--resume", str(run_dir))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert f"taking over the lock of a run that is gone (pid {holder.pid} on host" in out, out
    assert "unknown env 'nosuch'" in out and "Traceback" not in out, out
    assert (run_dir / ".lock").read_text() == ""  # released on exit


# --- 8: config fingerprints -----------------------------------------------------------------------


@pytest.mark.parametrize("change, field, first", [
    ("train.weight_decay=0.5", "train.weight_decay (0.0 -> 0.5)", "base_model"),  # the warm-up trains with it
    ("train.lr=0.5", "train.lr (0.002 -> 0.5)", "iter_1/train"),  # but with warmup.train's lr
    ("eval.turns=3", "eval.turns (5 -> 3)", "iter_0/eval"),
    ("data.tau=0.1", "data.tau (0.4 -> 0.1)", "iter_1/dataset"),
    # the warm-up trains its demonstrations' first turns whatever the RISE data's setting
    ("data.first_turn_weight=0", "data.first_turn_weight (1.0 -> 0.0)", "iter_1/dataset"),
])
def test_a_changed_config_is_refused_naming_the_fields(tmp_path, capsys, change, field, first):
    run_dir = tmp_path / "r"
    fake_run(run_dir)
    before = (run_dir / "config.yaml").read_text()
    for args in (["run", f"run_dir={tmp_path}", "name=r", *BASE, change], ["run", "--resume", str(run_dir), change]):
        rc, out = rise(capsys, *args)
        assert rc == 2, out
        assert field in out and f"add --redo-changed to redo {first} and the stages after it" in out, out
        assert (run_dir / "config.yaml").read_text() == before  # config.yaml still says what is there
        assert stages(run_dir) == STAGES


def test_redo_changed_redoes_the_affected_stages_and_those_after(tmp_path, capsys):
    run_dir = tmp_path / "r"
    fake_run(run_dir)
    rc, out = rise(capsys, "run", f"run_dir={tmp_path}", "name=r", *BASE, "train.lr=0.5", "--redo-changed")
    assert "[rise] iter_1/train: its config changed: redoing it" in out, out
    assert rc == 2 and "unknown env 'nosuch'" in out, out  # got past the run directory's checks
    assert stages(run_dir) == STAGES[:4]  # base_model (its warm-up lr is warmup.train's) .. iter_1/dataset
    assert not (run_dir / "iter_1" / "checkpoint").exists() and (run_dir / "iter_1" / "dataset").exists()
    assert config_value(run_dir, "train", "lr") == 0.5  # config.yaml describes what is in the directory


def test_resource_and_iteration_changes_keep_every_stage(tmp_path, capsys):
    run_dir = tmp_path / "r"
    fake_run(run_dir)
    rc, out = rise(capsys, "run", "--resume", str(run_dir), "rollout.num_engines=2", "train.cpus_per_worker=2",
                   "iterations=3", "observe.ray_metrics=false")
    assert rc == 2 and "unknown env 'nosuch'" in out, out
    assert stages(run_dir) == STAGES
    cfg = load_config(str(run_dir / "config.yaml"))  # config.yaml describes the directory: the new values
    assert cfg.rollout.num_engines == 2 and cfg.train.cpus_per_worker == 2 and cfg.iterations == 3


def test_a_field_the_schema_gained_later_keeps_finished_stages(tmp_path, capsys):
    from rise_ray.manifest import fingerprint, stage_fields

    run_dir = tmp_path / "r"
    fake_run(run_dir)
    # As if iter_1/train ran before train.lr_schedule existed: config.yaml and the fingerprint lack it.
    cfg = load_config(str(run_dir / "config.yaml"))
    text = (run_dir / "config.yaml").read_text()
    assert text.count("  lr_schedule: cosine\n") == 1
    (run_dir / "config.yaml").write_text(text.replace("  lr_schedule: cosine\n", ""))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    fields = stage_fields(cfg, "iter_1/train")
    del fields["train.lr_schedule"]
    manifest["stages"]["iter_1/train"]["fingerprint"] = fingerprint(fields)
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    for _ in range(2):  # the first resume restamps the stage: the second sees the whole config
        rc, out = rise(capsys, "run", "--resume", str(run_dir))
        assert rc == 2 and "unknown env 'nosuch'" in out, out
        assert stages(run_dir) == STAGES
    rc, out = rise(capsys, "run", "--resume", str(run_dir), "train.lr_schedule=constant")
    assert rc == 2 and 'iter_1/train: train.lr_schedule ("cosine" -> "constant")' in out, out


# --- 9: a damaged run directory -------------------------------------------------------------------


def test_a_truncated_manifest_is_a_clear_error(tmp_path, capsys):
    run_dir = tmp_path / "r"
    fake_run(run_dir)
    text = (run_dir / "manifest.json").read_text()
    (run_dir / "manifest.json").write_text(text[: len(text) // 2])
    for args in (["run", "--resume", str(run_dir)], ["run", f"run_dir={tmp_path}", "name=r", *BASE]):
        rc, out = rise(capsys, *args)
        assert rc == 2 and f"{run_dir / 'manifest.json'}: damaged, not valid JSON" in out, out
    broken = json.loads(text)
    del broken["stages"]["iter_1/train"]["output"]
    (run_dir / "manifest.json").write_text(json.dumps(broken))
    rc, out = rise(capsys, "run", "--resume", str(run_dir))
    assert rc == 2 and "manifest.json: damaged record of stage 'iter_1/train'" in out, out
    # A config.yaml cut at a line end is still valid YAML (missing fields take defaults): the
    # fingerprints notice that it no longer describes the finished stages.
    (run_dir / "manifest.json").write_text(text)
    lines = (run_dir / "config.yaml").read_text().splitlines(True)
    cut = lines.index("train:\n") + 4  # in the middle of the train section
    (run_dir / "config.yaml").write_text("".join(lines[:cut]))
    rc, out = rise(capsys, "run", "--resume", str(run_dir))
    assert rc == 2 and "the config differs from the one these finished stages ran with" in out, out
    assert "iter_1/train: (config.yaml does not say which: it no longer matches the stage; edited, or cut short?)" in out


def test_a_missing_output_is_named_and_resume_redoes_its_stage(tmp_path, capsys):
    run_dir = tmp_path / "r"
    fake_run(run_dir)
    shutil.rmtree(run_dir / "iter_1" / "trajectories")
    rc, out = rise(capsys, "run", f"run_dir={tmp_path}", "name=r", *BASE)
    assert rc == 2, out
    assert f"iter_1/collect: {run_dir / 'iter_1' / 'trajectories'}" in out, out
    assert f"`rise run --resume {run_dir}` redoes iter_1/collect" in out, out
    assert stages(run_dir) == STAGES

    rc, out = rise(capsys, "run", "--resume", str(run_dir))
    assert "[rise] iter_1/collect: its outputs are missing: redoing it" in out, out
    assert rc == 2 and "unknown env 'nosuch'" in out, out
    assert stages(run_dir) == STAGES[:2]  # the stages after it used its output: they go too
    m = Manifest(str(run_dir))
    calls = []
    m.run_stage("iter_1/collect", lambda: calls.append(1) or {"path": str(run_dir / "iter_1" / "trajectories")})
    assert calls == [1]  # redone, not skipped


# --- 10: paths relative to the run directory; name stays inside run_dir ---------------------------


def test_recorded_paths_follow_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("a/runs")
    fake_run(Path("a/runs/r"))  # a relative run_dir, as with the default run_dir=runs
    raw = json.loads(Path("a/runs/r/manifest.json").read_text())["stages"]
    assert raw["iter_1/train"]["output"] == os.path.join("iter_1", "checkpoint", "model")
    shutil.move("a/runs/r", "moved")
    os.makedirs("elsewhere")
    monkeypatch.chdir("elsewhere")
    m = Manifest(str(tmp_path / "moved"))
    assert m.output("iter_1/train") == str(tmp_path / "moved" / "iter_1" / "checkpoint" / "model")
    assert m.output("iter_1/collect")["path"] == str(tmp_path / "moved" / "iter_1" / "trajectories")
    assert m.output("iter_1/sync") == {"method": "files"}
    assert m.missing() == {}


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "", "/tmp/x"])
def test_name_cannot_leave_run_dir(tmp_path, capsys, name):
    with pytest.raises(ConfigError, match="name: .*one directory name inside run_dir"):
        load_config(None, [f"run_dir={tmp_path / 'runs'}", f"name={name}"])
    rc, out = rise(capsys, "run", f"run_dir={tmp_path / 'runs'}", f"name={name}", "--dry-run")
    assert rc == 2 and "name: " in out, out


# --- 12: JSONL rows that would crash the reader ---------------------------------------------------

ROW = json.dumps({"question": "1+1?", "answer": "#### 2"})


def test_a_deeply_nested_row_is_a_data_error(tmp_path):
    from rise_ray.envs.gsm8k import load_gsm8k

    for depth in (100_000, 500):  # json's own limit, and deep enough to overflow a later json.dumps
        path = tmp_path / f"deep{depth}.jsonl"
        path.write_text(ROW + "\n" + '{"question": "q", "answer": "#### 1", "x": ' + "[" * depth + "]" * depth + "}\n")
        with pytest.raises(DataError, match=f"^{path}:2: JSON nested more than 64 levels deep"):
            load_gsm8k(str(path), "test")


def test_a_huge_line_is_a_data_error(tmp_path):
    from rise_ray.envs.gsm8k import load_gsm8k

    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:  # line 2: 300 MB (a sparse file: nothing is written to disk)
        f.write(ROW.encode() + b"\n")
        f.seek(300 * 2**20, os.SEEK_CUR)
        f.write(b"\n" + ROW.encode() + b"\n")
    with pytest.raises(DataError, match=f"^{path}:2: line longer than"):
        load_gsm8k(str(path), "test")
