"""Offline clusters: every shipped config runs from a local model directory and local JSONL with
HF_HUB_OFFLINE=1 and no network. Here: the config loads, its problems come from the files, the
model's tokenizer and shape come from the directory and the plan is made, with every connection
that leaves this machine refused (a download attempt fails the test, it does not hang)."""

from __future__ import annotations

import glob
import json
import os
import socket

import pytest

from rise_ray import plan as planmod
from rise_ray.config import load_config
from rise_ray.session import make_env, resolve_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
ROWS = {
    "gsm8k": [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(6)],
    "math": [{"problem": f"What is ${i}+1$?", "solution": f"It is $\\boxed{{{i + 1}}}$."} for i in range(6)],
}


@pytest.fixture
def no_network(monkeypatch):
    """Refuse connections to anything but this machine; HF_HUB_OFFLINE=1 as an offline cluster sets."""
    real = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not host.startswith(("127.", "::1", "localhost", "/")):
            raise OSError(f"network access to {address} during an offline run")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_runs_from_local_files(path, tmp_path, tiny_model_dir, no_network):
    from transformers import AutoTokenizer

    env_name = load_config(path).env.name
    overrides = [f"model.path={tiny_model_dir}", f"run_dir={tmp_path}"]
    if env_name in ROWS:
        data = tmp_path / f"{env_name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[env_name]))
        overrides += [f"env.train_path={data}", f"env.test_path={data}", "env.num_train=4", "env.num_test=2"]
    if load_config(path).rollout.improve_with == "teacher":
        overrides.append(f"teacher.path={tiny_model_dir}")
    cfg = load_config(path, overrides)
    env = make_env(cfg.env)
    if env_name in ROWS:
        assert env.train and env.test and len(env.test) <= 6
    assert resolve_model(cfg.model, str(tmp_path)) == tiny_model_dir
    AutoTokenizer.from_pretrained(cfg.model.path)  # local: no hub lookup
    plan = planmod.build_plan(cfg, cluster=dict(source="test", nodes=1, gpus=16, cpus=64, gpu_type=None,
                                                gpu_memory_gib=80, node_gpus=[8, 8]))
    assert plan["note"] is None  # the shape came from the local config.json


def test_the_guard_refuses_a_hub_download(no_network, tmp_path):
    from rise_ray.envs.base import DataError

    cfg = load_config(None, ["env.name=gsm8k", "env.train_path=openai/gsm8k", "env.test_path=openai/gsm8k"])
    with pytest.raises(DataError, match="openai/gsm8k: not a local file"):
        make_env(cfg.env)
