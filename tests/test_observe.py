"""Observability: stage metrics reach Prometheus through Ray's metrics agent, and tracking writes
scalars that read back.

The module starts its own in-process Ray with the dashboard (tests/conftest.py's ray_local has
none); Ray binds the dashboard's and the metrics export ports itself (the first free one from 8265,
and one the OS gives) and the test reads back which. Ray 2.60 keeps token authentication on: the dashboard's REST API answers 401
without a token, so the test sends the header Ray itself builds for its clients
(get_auth_headers_if_auth_enabled, empty where auth is off). The metrics themselves are served by
the node's metrics agent on the metrics export port, which needs no token; the dashboard's
/api/prometheus/sd is where Prometheus finds that endpoint.
"""

from __future__ import annotations

import json
import os
import struct
import time
import urllib.request

import pytest

from rise_ray.config import ConfigError, load_config
from rise_ray.data.store import write_trajectories
from rise_ray.observe import Observer, rollout_stats
from rise_ray.rollout.episodes import Trajectory, Turn

RUN = "obs-test"


def get(url: str, headers: dict | None = None) -> str:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def ray_dashboard():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ctx = ray.init(address="local", num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    dash = int(ctx.dashboard_url.rsplit(":", 1)[1])  # the ports Ray bound, read back
    (metrics,) = [n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]]
    yield {"dashboard": dash, "metrics": metrics, "node_ip": ctx.address_info["node_ip_address"]}
    ray.shutdown()


def turn(n: int, correct: bool, text: str = "x = 12") -> Turn:
    return Turn(
        response=text, answer="12", reward=float(correct), correct=correct, source="policy", finished=True,
        degenerate=False, candidates=[text] * n, candidate_answers=["12"] * n, candidate_rewards=[float(correct)] * n,
        candidate_correct=[correct] * n,
    )  # fmt: skip


def fake_run(run_dir, model_dir: str) -> dict:
    """Stage outputs of one iteration as the driver produces them, with the files they point at:
    collect: 2 trajectories (1 answer at turn 1, then best-of-3); eval: 2 parallel at turn 1."""
    it = os.path.join(run_dir, "iter_1")
    collect = [
        Trajectory("a", "q", "12", [turn(1, False), turn(3, True)]),
        Trajectory("b", "q", "12", [turn(1, True)]),
    ]
    write_trajectories(collect, os.path.join(it, "trajectories", "part-00000.parquet"))
    evals = [Trajectory(p, "q", "12", [turn(2, False), turn(1, True)]) for p in ("a", "b")]
    write_trajectories(evals, os.path.join(it, "eval", "records.parquet"))
    ckpt = os.path.join(it, "checkpoint")
    os.makedirs(os.path.join(ckpt, "model"))
    with open(os.path.join(ckpt, "train_log.jsonl"), "w") as f:
        for step, loss in ((1, 2.5), (2, 1.5)):
            f.write(
                json.dumps(
                    {"step": step, "loss": loss, "tokens": 100, "tokens_per_s": 400.0, "step_time_s": 0.25}
                )
                + "\n"
            )
    eval_out = {"iteration": 1, "m1@t1": 0.5, "acc_by_turn": [0.5, 0.75], "num_problems": 2, "turns": 2}
    return {
        "base_model": model_dir,
        "iter_1/collect": {"path": os.path.join(it, "trajectories"), "trajectories": 2, "turns": 3},
        "iter_1/dataset": {"path": os.path.join(it, "dataset")},
        "iter_1/train": os.path.join(ckpt, "model"),
        "iter_1/sync": {"seconds": 0.125, "method": "files", "max_logprob_error": 0.001},
        "iter_1/eval": eval_out,
    }


def observe_cfg(*overrides: str):
    return load_config(None, [f"name={RUN}", *overrides])


def prometheus_samples(text: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("ray_rise_"):
                out[
                    (
                        s.name,
                        *sorted(
                            (k, v)
                            for k, v in s.labels.items()
                            if k in ("run", "stage", "iteration", "turn", "le")
                        ),
                    )
                ] = s.value
    return out


def test_stage_metrics_reach_the_prometheus_endpoint(ray_dashboard, tmp_path, tiny_model_dir):
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
    from transformers import AutoTokenizer

    outputs = fake_run(tmp_path, tiny_model_dir)
    obs = Observer(observe_cfg(), str(tmp_path))
    for stage, out in outputs.items():
        obs.stage(stage, out, 2.0)
    obs.finish(10.0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    collect_tokens = 5 * len(tok("x = 12", add_special_tokens=False)["input_ids"])  # 1 + 3 + 1 candidates

    run, it1 = ("run", RUN), ("iteration", "1")
    want = {
        ("ray_rise_stage_seconds", it1, run, ("stage", "train")): 2.0,
        ("ray_rise_stage_seconds", ("iteration", "0"), run, ("stage", "base_model")): 2.0,
        ("ray_rise_rollout_answers", it1, run, ("stage", "collect"), ("turn", "1")): 2.0,
        ("ray_rise_rollout_answers", it1, run, ("stage", "collect"), ("turn", "2")): 3.0,
        ("ray_rise_rollout_answers", it1, run, ("stage", "eval"), ("turn", "1")): 4.0,
        ("ray_rise_rollout_tokens_total", run, ("stage", "collect")): collect_tokens,
        ("ray_rise_rollout_tokens_per_second", it1, run, ("stage", "collect")): collect_tokens / 2.0,
        ("ray_rise_train_loss", it1, run): 1.5,
        ("ray_rise_train_tokens_per_second", it1, run): 400.0,
        ("ray_rise_train_step_seconds_count", run): 2.0,
        ("ray_rise_train_step_seconds_bucket", ("le", "0.25"), run): 2.0,
        ("ray_rise_sync_seconds", it1, run): 0.125,
        ("ray_rise_eval_accuracy", it1, run, ("turn", "2")): 0.75,
    }
    # the dashboard's service discovery names the metrics agent's endpoint (token needed) ...
    sd = json.loads(
        get(
            f"http://127.0.0.1:{ray_dashboard['dashboard']}/api/prometheus/sd",
            get_auth_headers_if_auth_enabled({}),
        )
    )
    deadline = time.monotonic() + 60
    target = f"{ray_dashboard['node_ip']}:{ray_dashboard['metrics']}"
    while target not in sd[0]["targets"]:
        assert time.monotonic() < deadline, sd
        time.sleep(1)
        sd = json.loads(
            get(
                f"http://127.0.0.1:{ray_dashboard['dashboard']}/api/prometheus/sd",
                get_auth_headers_if_auth_enabled({}),
            )
        )
    # ... which serves the values once the driver's worker has exported them (every few seconds)
    while True:
        got = prometheus_samples(get(f"http://127.0.0.1:{ray_dashboard['metrics']}/metrics"))
        if all(k in got for k in want):
            break
        assert time.monotonic() < deadline, f"missing after 60 s: {sorted(set(want) - set(got))}"
        time.sleep(2)
    assert {k: got[k] for k in want} == pytest.approx(want)


def test_rollout_stats_counts_answers_per_turn(tmp_path):
    path = str(tmp_path / "t.parquet")
    write_trajectories(
        [Trajectory("a", "q", "1", [turn(2, False), turn(4, True)]), Trajectory("b", "q", "1", [])], path
    )
    assert rollout_stats(path) == {"answers_by_turn": [2, 4], "answers": 6}


def test_rollout_tokens_are_the_stored_ids_where_a_turn_kept_them(tmp_path):
    """One candidate with sampled ids: its ids count (the text is never re-tokenized); best-of-3
    keeps the ids of one candidate only, so those texts are tokenized."""
    path = str(tmp_path / "t.parquet")
    sampled = turn(1, False, text="x = 12")
    sampled.token_ids = [5, 6, 7, 8, 9, 2]  # what the engine sampled: not what "x = 12" re-tokenizes to
    write_trajectories([Trajectory("a", "q", "1", [sampled, turn(3, True, text="ab")])], path)

    def tokenizer(texts, add_special_tokens=False):  # one id per character
        return {"input_ids": [list(t) for t in texts]}

    assert rollout_stats(path, lambda: tokenizer)["tokens"] == 6 + 3 * 2
    assert rollout_stats(path, lambda: None) == {"answers_by_turn": [1, 3], "answers": 4}  # no tokenizer: not counted


def read_events(logdir: str) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """Scalars (tag -> [(step, value)]) and the other tags (text, images) from TensorBoard event
    files, read as TFRecords: length (8 bytes), its crc (4), an Event proto, its crc (4)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    other: list[str] = []
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    scalars.setdefault(v.tag, []).append((ev.step, v.simple_value))
                else:
                    other.append(v.tag)
    return scalars, other


def test_tensorboard_tracking_reads_back(tmp_path, tiny_model_dir):
    logdir = tmp_path / "tb"
    run_dir = tmp_path / "run"
    outputs = fake_run(run_dir, tiny_model_dir)
    (run_dir / "report.md").write_text("# RISE run report\n")
    cfg = observe_cfg(
        "observe.ray_metrics=false", "observe.tracking=tensorboard", f"observe.tracking_uri={logdir}"
    )
    obs = Observer(cfg, str(run_dir))
    for stage, out in outputs.items():
        obs.stage(stage, out, 2.0)
    obs.finish(10.0)
    got, other = read_events(str(logdir))
    assert got["eval/acc_by_turn_2"] == [(1, 0.75)]
    assert got["eval/m1_at_t1"] == [(1, 0.5)]
    assert got["stage_seconds/collect"] == [(1, 2.0)]
    assert got["collect/answers_turn_2"] == [(1, 3.0)]
    assert got["train/loss"] == [(1, 1.5)]
    assert got["train/iter_1/step_loss"] == [(1, 2.5), (2, 1.5)]
    assert got["sync/seconds"] == [(1, 0.125)]
    assert got["run/wall_s"] == [(cfg.iterations, 10.0)]
    assert {"config/text_summary", "report.md/text_summary"} <= set(other)
    state = json.loads((run_dir / "tracking.json").read_text())
    assert state["backend"] == "tensorboard" and state["uri"] == str(logdir)
    # a resumed run continues the same logdir and does not log the config again
    Observer(cfg, str(run_dir)).finish(11.0)
    again, other = read_events(str(logdir))
    assert sorted(again["run/wall_s"]) == [(cfg.iterations, 10.0), (cfg.iterations, 11.0)]  # 2 event files
    assert other.count("config/text_summary") == 1


def test_mlflow_tracking_reads_back(tmp_path, tiny_model_dir):
    """With the `track` extra: a local MLflow store in the run directory; a resumed run continues
    the same MLflow run."""
    mlflow = pytest.importorskip("mlflow")
    run_dir = tmp_path / "run"
    outputs = fake_run(run_dir, tiny_model_dir)
    (run_dir / "report.md").write_text("# RISE run report\n")
    cfg = observe_cfg("observe.ray_metrics=false", "observe.tracking=mlflow")
    obs = Observer(cfg, str(run_dir))
    for stage, out in outputs.items():
        obs.stage(stage, out, 2.0)
    obs.finish(10.0)
    Observer(cfg, str(run_dir)).stage("iter_2/sync", {"seconds": 0.5}, 1.0)
    state = json.loads((run_dir / "tracking.json").read_text())
    client = mlflow.MlflowClient(state["uri"])
    run = client.get_run(state["run_id"])
    assert run.data.params["name"] == RUN and run.data.metrics["eval/acc_by_turn_2"] == 0.75
    history = {
        k: [(m.step, m.value) for m in client.get_metric_history(state["run_id"], k)]
        for k in ("train/iter_1/step_loss", "sync/seconds")
    }
    assert history == {"train/iter_1/step_loss": [(1, 2.5), (2, 1.5)], "sync/seconds": [(1, 0.125), (2, 0.5)]}
    assert [a.path for a in client.list_artifacts(state["run_id"])] == ["report.md"]
    mlflow.end_run()


def test_disabled_observer_does_nothing_and_never_raises(tmp_path):
    obs = Observer(observe_cfg("observe.ray_metrics=false"), str(tmp_path))
    assert not obs.enabled and obs.tracker is None
    obs.stage("iter_1/collect", {"path": str(tmp_path / "missing")}, 1.0)
    obs.finish(1.0)
    # enabled, a stage whose files are missing is a warning, not an error
    Observer(observe_cfg(), str(tmp_path)).stage("iter_1/collect", {"path": str(tmp_path / "missing")}, 1.0)
    assert not os.path.exists(tmp_path / "tracking.json")


@pytest.mark.parametrize("backend,package", [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_missing_tracking_package_is_a_clear_config_error(tmp_path, backend, package):
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    with pytest.raises(
        ConfigError, match=rf"observe.tracking={backend} needs the '{package}' package.*rise-ray\[track\]"
    ):
        Observer(observe_cfg(f"observe.tracking={backend}"), str(tmp_path))
