"""The weight-sync check in bf16 (issue: it compared bf16 engines with a bf16 reference at 1e-2 and
failed every correct sync of a real model) and where its reference runs (not the driver process).

The tiny model's final norm is scaled so its logits reach ~10, where bf16 rounds logits to steps of
~0.06, as a real model's do; the engines run in bf16 on CPU (transformers engine)."""

from __future__ import annotations

import os

import pytest
import torch

from rise_ray.rollout.pool import RolloutPool
from rise_ray.rollout.sync import FP32_TOLERANCE, check_engines


def _variant(src: str, out: str, edit) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("bf16")
    old = _variant(tiny_model_dir, str(d / "old"), lambda m: m.model.norm.weight.mul_(10.0))

    def train_step(m):  # a 'trained' checkpoint: every weight nudged, the probe's logprobs by ~0.19,
        g = torch.Generator().manual_seed(1)  # less than the bf16 tolerance but well above rounding
        for p in m.parameters():
            p.add_(3e-4 * torch.randn(p.shape, generator=g))

    new = _variant(old, str(d / "new"), train_step)

    def swap(m):  # what a sync that mixed up two tensors would leave: layer 0's MLP output in layer 1
        layers = m.model.layers
        layers[1].mlp.down_proj.weight.copy_(layers[0].mlp.down_proj.weight)

    wrong = _variant(new, str(d / "wrong"), swap)
    return {"old": old, "new": new, "wrong": wrong}


@pytest.fixture
def bf16_pool(ray_local, models):
    pool = RolloutPool("hf", models["old"], num_engines=1, num_cpus=0.5, engine_kwargs={"dtype": "bfloat16"})
    yield pool
    pool.shutdown()


@pytest.mark.timeout(300)
def test_a_correct_bf16_sync_passes_against_an_fp32_reference_run_outside_the_driver(bf16_pool, models):
    bf16_pool.update_weights(models["new"], "v1")
    check = check_engines(bf16_pool, models["new"], previous=models["old"])
    assert check["engine_dtypes"] == ["bfloat16"]
    # bf16 rounding alone exceeds the fp32 tolerance that failed real runs, but not the bf16 one
    assert FP32_TOLERANCE < check["max_logprob_error"] <= check["tolerance"]
    assert check["conclusive"] and check["moved"] > 2 * check["max_logprob_error"]
    # the fp32 reference model was loaded by a Ray task of its own, not in this (driver) process
    assert check["reference_pid"] != os.getpid()


@pytest.mark.timeout(300)
def test_a_sync_that_did_nothing_fails_the_check(bf16_pool, models):
    # The engine still holds `old`: within the bf16 tolerance of `new` (an absolute check alone would
    # pass it), but much nearer `old` than the two checkpoints are apart.
    with pytest.raises(RuntimeError, match="engine 0 .bfloat16. still holds the previous weights"):
        check_engines(bf16_pool, models["new"], previous=models["old"])


@pytest.mark.timeout(300)
def test_a_wrong_tensor_fails_the_check(bf16_pool, models):
    bf16_pool.update_weights(models["wrong"], "v1")
    with pytest.raises(RuntimeError, match="weight sync check failed: engine 0"):
        check_engines(bf16_pool, models["new"], previous=models["old"])
