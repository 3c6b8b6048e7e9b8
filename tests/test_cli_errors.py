"""No traceback for any input (issue 39): every `rise` subcommand, given a broken input, exits 2
with one line naming the field, file or argument, before it starts Ray.

Driven in-process (`main`) for the whole matrix, with ray.init made to fail the test (nothing may
start); and once per subcommand as a real process, whose whole output is checked for a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rise_ray.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Broken inputs, as key=value overrides or a CONFIG path, and a word the message must name.
# {not_a_model}: a directory without config.json; {missing}: a path that does not exist.
BROKEN = {
    "unknown key": (["rollout.tunrs=3"], "rollout.tunrs: unknown field"),
    "wrong type": (["rollout.turns=many"], "rollout.turns"),
    "missing config file": (["{missing}.yaml"], "config file not found"),
    "model path not a model": (["model.path={not_a_model}"], "model.path: model"),
    "teacher engine without a teacher model": (["rollout.improve_with=teacher", "teacher.engine=vllm"],
                                               "teacher.path is not set"),
    "env option the task does not take": (["env.options.bogus=1"], "unknown option(s) ['bogus']"),
    "solver on a task it cannot read": (["env.name=arithmetic", "rollout.improve_with=teacher",
                                         "teacher.engine=solver"], "env.options.task 'linear'"),
}
# How each subcommand takes the broken config: (argv before, argv after, the inputs that apply).
# `rise config show` prints a config whatever its sources hold (`rise run --dry-run` checks those).
ALL = set(BROKEN)
SUBCOMMANDS = {
    "run": (["run"], [], ALL),
    "run --dry-run": (["run"], ["--dry-run"], ALL),
    "eval": (["eval"], [], ALL),
    "train": (["train"], ["data={data}"], ALL),
    "serve": (["serve", "{model}"], [], ALL - {"model path not a model"}),  # serve takes the model as TARGET
    "config show": (["config", "show"], [], ALL - {"model path not a model", "env option the task does not take"}),
    "sweep": (["sweep"], ["--grid", "data.tau=0.2,0.4"], ALL),
}
# Broken arguments of the commands that take no config, and what the message names.
OTHER = {
    "report: no such directory": (["report", "{missing}"], "no such run directory"),
    "report: a directory with no evaluation": (["report", "{not_a_model}"], "no iter_*/eval/metrics.json yet"),
    "model get: no such path": (["model", "get", "{missing}"], "not a model directory"),
    "model get: a directory that is not a model": (["model", "get", "{not_a_model}"], "without config.json"),
    "model get: no such .gguf": (["model", "get", "{missing}.gguf"], "no such GGUF file"),
    "serve: a target that is not a model": (["serve", "{not_a_model}"], "without config.json"),
    "train: no such data": (["train", "data={missing}"], "data={missing}: no such file or directory"),
    "train: no data=": (["train"], "rise train needs data=PATH"),
    "run --dry-run: a model whose config.json is broken": (["run", "model.path={broken_model}", "--dry-run"],
                                                          "config.json is not a model config"),
    "run --resume: not a run directory": (["run", "--resume", "{not_a_model}"], "not a run directory"),
    "run --dry-run: no such cluster file": (["run", "--dry-run", "--cluster-yaml", "{missing}.yaml"],
                                            "--cluster-yaml {missing}.yaml: no such file"),
    "sweep: a grid that is not key=values": (["sweep", "--grid", "data.tau"], "expected key=v1,v2"),
    "run --dry-run: not a cluster file": (["run", "--dry-run", "--cluster-yaml", "{not_a_model}/c.yaml"],
                                          "not a Ray cluster file"),
}


@pytest.fixture
def paths(tmp_path, tiny_model_dir) -> dict[str, str]:
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "c.yaml").write_text("cluster_name: x\n")
    broken_model = tmp_path / "broken-model"
    broken_model.mkdir()
    (broken_model / "config.json").write_text('{"num_hidden_layers": 2,')  # cut short
    data = tmp_path / "trajectories.parquet"
    data.write_bytes(b"")  # only its existence is checked before Ray
    return {"missing": str(tmp_path / "missing"), "not_a_model": str(not_a_model), "data": str(data),
            "model": tiny_model_dir, "broken_model": str(broken_model)}


@pytest.fixture
def no_ray(monkeypatch):
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called: a broken input must be refused before Ray starts")

    monkeypatch.setattr(ray, "init", refuse)


def fill(argv: list[str], paths: dict[str, str]) -> list[str]:
    return [a.format(**paths) for a in argv]


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rise: ") and "Traceback" not in err, err
    return lines[0]


CASES = [(sub, broken) for sub, (_, _, inputs) in SUBCOMMANDS.items() for broken in BROKEN if broken in inputs]


@pytest.mark.parametrize("sub, broken", CASES, ids=[f"{s}: {b}" for s, b in CASES])
def test_a_broken_config_exits_2_with_one_line(sub, broken, paths, no_ray, capsys, monkeypatch):
    monkeypatch.chdir(paths["not_a_model"])  # nothing lands in the repo (rise run's runs/)
    before, after, _ = SUBCOMMANDS[sub]
    args, names = BROKEN[broken]
    assert main(fill([*before, *args, *after], paths)) == 2
    assert names.format(**paths) in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("case", list(OTHER))
def test_a_broken_argument_exits_2_with_one_line(case, paths, no_ray, capsys):
    argv, names = OTHER[case]
    assert main(fill(argv, paths)) == 2
    assert names.format(**paths) in one_line(capsys.readouterr().err)


PROCESSES = {  # one real process per subcommand: its whole output, Ray's and Python's included
    "run": ["run", "rollout.tunrs=3"],
    "run --dry-run": ["run", "env.options.bogus=1", "--dry-run"],
    "eval": ["eval", "rollout.turns=many"],
    "train": ["train", "data={data}", "model.path={missing}"],
    "serve": ["serve", "{model}", "env.options.bogus=1"],
    "report": ["report", "{not_a_model}"],
    "model get": ["model", "get", "{not_a_model}"],
    "config show": ["config", "show", "{missing}.yaml"],
    "sweep": ["sweep", "--grid", "rollout.tunrs=2,3"],
}


@pytest.mark.parametrize("sub", list(PROCESSES))
def test_each_subcommand_as_a_process_prints_one_line_and_no_traceback(sub, paths):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "rise_ray.cli", *fill(PROCESSES[sub], paths)], capture_output=True,
                          text=True, env=env, cwd=paths["not_a_model"], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    one_line(proc.stderr)
    assert all(line.startswith("[rise] ") for line in proc.stdout.splitlines())  # rise run: its departures
