"""Config loading: defaults, YAML, overrides, and readable errors for malformed configs."""

import pytest

from rise_ray.config import ConfigError, load_config, parse_overrides


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_and_overrides():
    cfg = load_config(None, ["rollout.turns=3", "eval.context_window=2", "name=x", "env.options.task=muladd"])
    assert cfg.rollout.turns == 3 and cfg.eval.context_window == 2 and cfg.name == "x"
    assert cfg.env.options == {"task": "muladd"}


def test_yaml_then_override(tmp_path):
    path = write(tmp_path, "rollout:\n  turns: 4\n  best_of_n: 2\n")
    cfg = load_config(path, ["rollout.turns=2"])
    assert (cfg.rollout.turns, cfg.rollout.best_of_n) == (2, 2)


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("rollout:\n  turns: 0\n", [], "rollout.turns: Input should be greater than or equal to 1"),
        ("rollout:\n  turns: many\n", [], "rollout.turns"),
        ("rollout:\n  engine: tgi\n", [], "rollout.engine"),
        ("rollout:\n  tunrs: 3\n", [], "rollout.tunrs: unknown field"),
        ("eval:\n  temperature: -1\n", [], "eval.temperature"),
        ("rollout:\n  improve_with: teacher\n", [], "teacher.path is not set"),
        ("", ["model.max_model_len=abc"], "model.max_model_len"),
        ("", ["nosuchsection.x=1"], "nosuchsection: unknown field"),
    ],
)
def test_bad_values_name_the_field(tmp_path, text, overrides, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    assert expected in str(e.value)
    assert path in str(e.value)  # the message names the file


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "rollout:\n  turns: 3\n  best_of_n: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+:\d+: not valid YAML"):
        load_config(path)


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


@pytest.mark.parametrize("item", ["turns", "=3", "a..b=1", ".a=1"])
def test_bad_override_syntax(item):
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides([item])


def test_override_values_are_yaml_scalars():
    assert parse_overrides(["a=1", "b=0.5", "c=true", "d=null", "e=hi", "f=[1,2]"]) == {
        "a": 1, "b": 0.5, "c": True, "d": None, "e": "hi", "f": [1, 2]
    }


def test_cli_reports_config_error(tmp_path, capsys):
    from rise_ray.cli import main

    assert main(["eval", write(tmp_path, "eval:\n  turns: -2\n")]) == 2
    err = capsys.readouterr().err
    assert "eval.turns" in err and "Traceback" not in err


def test_every_shipped_config_loads():
    import glob
    import os

    paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))
    assert len(paths) >= 3
    for path in paths:
        load_config(path)


def test_commands_without_config_use_the_embedded_default():
    from rise_ray.cli import _config

    cfg = _config(["iterations=1"])
    assert cfg.env.name == "search" and cfg.model.path is None and cfg.iterations == 1


def test_empty_mapping_override_clears(tmp_path):
    path = write(tmp_path, "env:\n  options: {num_keys: 6}\n")
    assert load_config(path).env.options == {"num_keys": 6}
    assert load_config(path, ["env.options={}"]).env.options == {}
    assert load_config(path, ["env.options.x=1"]).env.options == {"num_keys": 6, "x": 1}


def test_cli_reports_env_and_data_errors(tmp_path, capsys):
    from rise_ray.cli import main

    assert main(["eval", "env.name=nosuch"]) == 2
    assert "unknown env 'nosuch'" in capsys.readouterr().err
    assert main(["eval", "env.name=gsm8k"]) == 2  # the default's search options do not fit gsm8k
    assert "num_keys" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "no answer"}\n')
    assert main(["eval", "env.name=gsm8k", "env.options={}", f"env.test_path={bad}"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "answer" in err and "Traceback" not in err


def test_tiny_seed_override_draws_another_initialisation(tmp_path):
    """`model.tiny.seed` reaches the tiny model's random initialisation (another draw of a run)."""
    from safetensors.torch import load_file

    from rise_ray.session import resolve_model

    def weights(seed: int, run: str) -> dict:
        tiny = f"model.tiny={{hidden_size: 64, num_layers: 1, num_heads: 1, intermediate_size: 64, seed: {seed}}}"
        return load_file(resolve_model(load_config(None, [tiny]).model, str(tmp_path / run)) + "/model.safetensors")

    a, b, c = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert all(a[k].equal(b[k]) for k in a)  # same seed, same weights
    assert not a["model.embed_tokens.weight"].equal(c["model.embed_tokens.weight"])


# --- rise config show, and where a run departs from the paper's protocol ---------------------------


def test_config_sources_name_where_each_value_came_from(tmp_path):
    from rise_ray.protocol import config_sources, flatten

    path = write(tmp_path, "rollout:\n  turns: 3\n  best_of_n: 2\nenv:\n  options: {a: 1}\n")
    overrides = ["rollout.best_of_n=6", "env.options.b=2", "model.tiny={num_layers: 3}"]
    rows = config_sources(path, overrides)
    got = {k: (v, s) for k, v, s in rows}
    assert got["rollout.turns"] == (3, "file")
    assert got["rollout.best_of_n"] == (6, "override")  # the override wins over the file
    assert got["rollout.max_tokens"] == (256, "default")
    assert got["env.options.a"] == (1, "file") and got["env.options.b"] == (2, "override")  # mappings merge
    assert got["model.tiny.num_layers"] == (3, "override") and got["model.tiny.hidden_size"] == (64, "default")
    # every setting of the resolved config, once, with its value
    cfg = load_config(path, overrides)
    assert [k for k, _, _ in rows] == list(flatten(cfg.model_dump(mode="json")))
    assert {k: v for k, v, _ in rows} == flatten(cfg.model_dump(mode="json"))
    cleared = {k: (v, s) for k, v, s in config_sources(path, ["env.options={}"])}
    assert cleared["env.options"] == ({}, "override") and "env.options.a" not in cleared


def test_rise_config_show_prints_the_resolved_config_and_sources(tmp_path, capsys):
    from rise_ray.cli import main

    path = write(tmp_path, "rollout:\n  turns: 3\nenv:\n  feedback: 'Wrong: try again # 2'\n")
    assert main(["config", "show", path, "data.tau=0.5", "env.options.k=[1, 2]"]) == 0
    out = capsys.readouterr().out
    table, departures = out.split("\n\n", 1)
    rows = {}
    for line in table.splitlines():
        if line.startswith("#"):
            continue
        head, source = line.rsplit("  # ", 1)
        key, value = head.split(None, 1)
        rows[key] = (value.strip(), source)
    assert rows["rollout.turns"] == ("3", "file") and rows["data.tau"] == ("0.5", "override")
    assert rows["train.lr"] == ("1.0e-05", "default")
    # the printed values are the config: fed back as overrides they resolve to the same one
    again = load_config(None, [f"{k}={v}" for k, (v, _) in rows.items()])
    assert again == load_config(path, ["data.tau=0.5", "env.options.k=[1, 2]"])
    assert "rollout.turns" in departures and "data.tau" in departures and "env.feedback" in departures
    assert main(["config", "show", path, "rollout.turns=0"]) == 2  # a bad config: the field, no traceback
    assert "rollout.turns" in capsys.readouterr().err


def test_departures_from_the_papers_protocol_are_the_protocol_fields_that_differ():
    from rise_ray.config import DEFAULT_CONFIG, RunConfig, read_yaml
    from rise_ray.protocol import PROTOCOL_FIELDS, flatten, protocol_departures

    assert protocol_departures(RunConfig()) == []  # the schema's defaults are the paper's protocol
    cfg = load_config(None, ["data.tau=0.5", "rollout.stop_when_correct=false", "rollout.max_tokens=7"])
    assert protocol_departures(cfg) == [("rollout.stop_when_correct", False, True), ("data.tau", 0.5, 0.4)]
    # the embedded default: every protocol field its file sets to another value than the schema's
    paper = flatten(RunConfig().model_dump(mode="json"))
    embedded = flatten(read_yaml(DEFAULT_CONFIG))
    want = [k for k in PROTOCOL_FIELDS if k in embedded and embedded[k] != paper[k]]
    got = protocol_departures(load_config(DEFAULT_CONFIG))
    assert [k for k, _, _ in got] == want and "rollout.stop_when_correct" in want
    assert all(v == embedded[k] and p == paper[k] for k, v, p in got)


def test_rise_run_prints_its_departures_from_the_protocol_at_the_start(tmp_path, capsys):
    from rise_ray.cli import main

    # env.name=nosuch: the run gets past its config and run directory, then stops at make_env (no Ray)
    rc = main(["run", f"run_dir={tmp_path}", "name=p", "env.name=nosuch", "data.tau=0.5", "eval.turns=2"])
    out = capsys.readouterr()
    assert rc == 2 and "unknown env 'nosuch'" in out.err
    lines = [line for line in out.out.splitlines() if line.startswith("[rise] ")]
    assert lines[0].startswith("[rise] protocol: departs from the paper's in")
    departed = {line.split()[1]: line for line in lines[1:] if "(paper:" in line}
    assert "data.tau" in departed and "0.5  (paper: 0.4)" in departed["data.tau"]
    assert "eval.turns" in departed and "(paper: 5)" in departed["eval.turns"]
    assert set(departed) >= {"rollout.stop_when_correct", "data.after_correct_weight"}  # the embedded default's


def test_combinations_that_fail_later_are_refused_at_load():
    """Each is accepted by the schema field by field, and fails only once the run is under way."""
    lora = ["train.lora.enabled=true", "train.lora.merge=false"]
    # The adapter alone reaches the engines at the sync, and the next train stage finds no config.json.
    with pytest.raises(ConfigError, match=r"train.lora.merge=false .* 2 iterations.*iterations=0") as e:
        load_config(None, lora)
    assert "\n" not in str(e.value)  # one line
    assert load_config(None, [*lora, "iterations=0"]).train.lora.merge is False  # `rise train` writes an adapter
    assert load_config(None, ["train.lora.merge=false"]).train.lora.merge is False  # no LoRA: merge unused
    # vLLM's weight transfer between GPUs, asked of engines on CPU: refused by the sync's first call
    for engine in (["rollout.engine=hf"], ["rollout.engine=vllm"]):
        with pytest.raises(ConfigError, match="sync.method 'nccl'.*rollout.num_gpus_per_engine > 0"):
            load_config(None, [*engine, "sync.method=nccl"])
    gpu = ["rollout.engine=vllm", "rollout.num_gpus_per_engine=2", "rollout.tensor_parallel_size=2"]
    with pytest.raises(ConfigError, match="sync.method 'ipc'.*tensor_parallel_size=1"):
        load_config(None, [*gpu, "sync.method=ipc"])
    assert load_config(None, [*gpu, "sync.method=nccl"]).sync.method == "nccl"
    # DeepSpeed's offload without ZeRO: the trainer's first step refuses it
    with pytest.raises(ConfigError, match="train.offload.*zero_stage"):
        load_config(None, ["train.offload=true"])
