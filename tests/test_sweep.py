"""`rise sweep`: the grid, the concurrency, the flips and copies of the table, and a two-trial grid
of whole tiny runs on Ray Tune (slow), resumed without rerunning its trials."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from synthetic import make_turn

from rise_ray.cli import main
from rise_ray.config import ConfigError
from rise_ray.rollout.episodes import Trajectory
from rise_ray.sweep import default_concurrency, grid_points, parse_grid, trial_name, turn_pairs


def test_grid_is_the_product_of_the_keys_values():
    grid = parse_grid(["data.tau=0.2,0.4", "rollout.best_of_n=4,8,16"])
    points = grid_points(grid)
    assert len(points) == 6 and points[0] == {"data.tau": "0.2", "rollout.best_of_n": "4"}
    assert points[-1] == {"data.tau": "0.4", "rollout.best_of_n": "16"}
    assert len({trial_name(i, p) for i, p in enumerate(points)}) == 6


@pytest.mark.parametrize("specs", [[], ["data.tau"], ["data.tau="], ["data.tau=0.2,"], ["a=1", "a=2"]])
def test_bad_grid_is_an_error_naming_it(specs):
    with pytest.raises(ConfigError):
        parse_grid(specs)


def test_cli_bad_grid_value_exits_2_naming_the_trial_and_field(tmp_path, capsys):
    rc = main(["sweep", "--grid", "data.tau=0.2,-1", "--sweep-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "data.tau" in err and "trial01" in err
    assert not os.path.exists(tmp_path / "tune")  # nothing started


def test_concurrency_is_what_the_cluster_holds_side_by_side():
    laptop = {"CPU": 2.0}
    default_run = {"CPU": 2.0, "GPU": 0.0}  # the embedded default's warm-up takes both CPUs
    assert default_concurrency([default_run], laptop) == 1
    assert default_concurrency([default_run], {"CPU": 64.0}) == 32
    gpu_run = {"CPU": 2.0, "GPU": 2.0}
    assert default_concurrency([gpu_run], {"CPU": 64.0, "GPU": 8.0}) == 4
    assert default_concurrency([gpu_run], {"CPU": 64.0}) == 1  # never zero: Tune then waits for nodes


def test_turn_pairs_count_flips_among_the_pairs_that_could_flip_and_verbatim_copies():
    a = Trajectory("a", "q", "0", [make_turn("x=1", 0.0), make_turn("x=1", 0.0), make_turn("x=0 ok", 1.0)])
    b = Trajectory("b", "q", "0", [make_turn("x=0 ok", 1.0), make_turn(" x=0 ok", 1.0), make_turn("x=2", 0.0)])
    out = turn_pairs([a, b])
    assert out["pairs"] == 4
    assert (out["wrong_to_right"], out["wrong_pairs"]) == (1, 2)
    assert (out["right_to_wrong"], out["right_pairs"]) == (1, 2)
    assert out["copies"] == 2 and out["copy_rate"] == 0.5


TINY = ["env.num_train=32", "env.num_test=8", "iterations=1", "warmup.enabled=false",
        "rollout.engine=hf", "rollout.best_of_n=2", "rollout.turns=2", "rollout.max_tokens=8", "rollout.batch_size=16",
        "rollout.num_cpus_per_engine=0.5", "eval.turns=2", "eval.parallel=2", "eval.max_tokens=8",
        "eval.batch_size=16", "train.micro_batch_size=16", "train.epochs=1", "sync.check=false"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_trial_grid_on_the_tiny_model_writes_the_table_and_resumes(tmp_path):
    cmd = [sys.executable, "-m", "rise_ray.cli", "sweep", *TINY, "--grid", "data.tau=0.3,0.6",
           "--sweep-dir", str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1400)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert [t["point"] for t in result["trials"]] == [{"data.tau": "0.3"}, {"data.tau": "0.6"}]
    for trial in result["trials"]:
        assert (trial["base"]["iteration"], trial["last"]["iteration"]) == (0, 1)
        assert all(0.0 <= trial["last"][m] <= 1.0 for m in ("m1@t1", "m2@t1", "m1@t2", "p1@t2") if m in trial["last"])
        assert trial["last"]["pairs"] == 8  # 8 problems x 1 later turn
        assert os.path.exists(os.path.join(trial["run_dir"], "report.html"))
    page = (tmp_path / "sweep.html").read_text()
    assert page.count("report.html") == 4  # base and last row of each trial link its report
    assert "trial00_tau=0.3" in out.stdout and "trial01_tau=0.6" in out.stdout  # the printed table

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    for trial in result["trials"]:  # finished trials are not run again: one `rise run` each
        log = (tmp_path / "trials" / (os.path.basename(trial["run_dir"]) + ".log")).read_text()
        assert log.count("$ ") == 1


def test_the_embedded_default_runs_one_trial_at_a_time_on_a_two_core_laptop():
    from rise_ray.config import DEFAULT_CONFIG, load_config
    from rise_ray.sweep import run_needs

    need = run_needs(load_config(DEFAULT_CONFIG))
    assert need == {"CPU": 2.0, "GPU": 0.0}  # its warm-up trainer takes both CPUs
    assert default_concurrency([need], {"CPU": 2.0}) == 1
    assert default_concurrency([need], {"CPU": 16.0}) == 8
