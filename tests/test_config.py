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
