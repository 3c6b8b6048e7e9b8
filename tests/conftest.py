"""Shared fixtures. GPU tests are skipped where no CUDA device is present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import rise_ray  # noqa: F401  (first: it hides media packages built for another torch)

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "rise-ray" / "torch_extensions"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (none here)")
    skip_cpu = pytest.mark.skip(reason="assumes a machine without GPUs (this one has one)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "cpu_only" in item.keywords and has_gpu:
            item.add_marker(skip_cpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random tiny Llama + its tokenizer, built once per test session."""
    from rise_ray.demo.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def n_tokens():
    """Tokens of a tiny model's reply (its re-tokenized text: never more than the engine generated)."""
    from rise_ray.demo.tiny import build_tokenizer

    tok = build_tokenizer()
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def ray_local():
    """An in-process Ray with a few logical CPUs (actors and tasks hold fractions of them)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


def perturbed_copy(model_dir: str, out: str, scale: float, seed: int) -> str:
    """A copy of a model with Gaussian noise (std `scale`) added to every weight: a 'trained' checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out
