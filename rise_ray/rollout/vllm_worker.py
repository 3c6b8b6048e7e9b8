"""Methods injected into every vLLM worker (via `LLM(worker_extension_cls=...)`) to sync weights.

vLLM mixes this class into its worker class inside the worker process, so `self` is the vLLM
worker (CPU or GPU) and `LLM.collective_rpc("rise_load_weights", args=(paths,))` runs the method
on every tensor-parallel rank. Method names carry a `rise_` prefix because vLLM refuses an
extension whose attribute names clash with the worker's own.

Why files and not tensors: collective_rpc serializes its arguments with msgspec, which turns a
tensor into a nested list. A safetensors file in /dev/shm costs one memcpy to write and is
mmapped back for free, and the same call also takes a checkpoint's own `model.safetensors`.

Why `reload_weights` and not `model.load_weights`: on CPU, vLLM repacks every linear layer's
weight for oneDNN/SGL kernels after loading and *replaces the parameter with an empty tensor*
(`dispatch_cpu_unquantized_gemm(remove_weight=True)`); quantized GPU layers do similar
post-processing. Plain `load_weights` would then fail on shape or silently leave the packed copy
stale. vLLM's in-place reload restores the checkpoint layout, loads, and re-runs that processing.

One gap in that reload (vLLM 0.32, CPU): a tied `lm_head` receives no weights of its own (Llama's
load_weights skips it), so the reload puts its old tensors back and never re-runs its processing;
its packed copy of the *old* embedding keeps producing the logits. `_refresh_embedding_kernels`
re-runs the (idempotent, weight-keeping) embedding post-processing after every reload.

GPU path (sync.method nccl / ipc): vLLM's native weight transfer needs nothing from this class. The
worker methods it calls (`init_weight_transfer_engine`, `start_weight_update`, `update_weights`,
`finish_weight_update`, `shutdown_weight_transfer_engine`) are vLLM's own (vllm/v1/worker/gpu_worker.py,
enabled by `LLM(weight_transfer_config=...)`); its finish re-runs each layer's post-load processing
like `reload_weights` does. What the file path does here around a load is done by VLLMEngine around
the native update: the prefix cache is reset after `finish_weight_update`; the tied-lm_head repair is
a CPU matter (no native backend runs on CPU). See rise_ray/rollout/weight_transfer.py.
"""

from __future__ import annotations

from typing import Any


class WeightSyncExtension:
    """Mixed into the vLLM worker: `self` has `model_runner`, `vllm_config`, `reload_weights`."""

    # ---------------------------------------------------------------------------------------------
    # File path (CPU and GPU): tensors travel through shared memory / the checkpoint on disk.
    # ---------------------------------------------------------------------------------------------
    def rise_load_weights(self, paths: str | list[str]) -> int:
        """Load HF-named tensors from safetensors file(s) into the running model; return their count."""
        from safetensors.torch import load_file

        files = [paths] if isinstance(paths, str) else list(paths)
        tensors: list[tuple[str, Any]] = []
        for f in files:
            tensors.extend(load_file(f).items())  # mmap: no copy until the loader reads
        worker: Any = self
        worker.reload_weights(weights_iterator=iter(tensors), is_checkpoint_format=True)
        _refresh_embedding_kernels(worker.model_runner.get_model())
        return len(tensors)

    def rise_weights_checksum(self) -> float:
        """Sum of every parameter still held in checkpoint layout: a cheap 'did the update land' probe.

        Prepacked CPU linear weights are empty tensors, so this mostly covers embeddings and norms.
        """
        worker: Any = self
        model = worker.model_runner.get_model()
        return float(sum(p.detach().double().sum().item() for p in model.parameters() if p.numel()))

    # ---------------------------------------------------------------------------------------------
    # Sleep mode (colocated with the trainer): is there room on this worker's GPU to wake?
    # ---------------------------------------------------------------------------------------------
    def rise_wake_room(self, tags: list[str] | None = None) -> dict[str, int]:
        """This worker's GPU: its free bytes and the bytes a wake-up with `tags` would map again."""
        import torch

        torch.cuda.empty_cache()  # as vLLM's wake-up does first: this process's cached blocks are free too
        return wake_room(tags, torch.cuda.mem_get_info, _sleep_allocator())


def _sleep_allocator() -> Any:
    from vllm.device_allocator import get_mem_allocator_instance

    return get_mem_allocator_instance()


def sleeping_bytes(allocator: Any, tags: list[str] | None) -> int:
    """Bytes of the allocator's sleeping allocations that `wake_up(tags)` maps again: those with a
    tag in `tags` (all of them for None), and always those vLLM does not defer (its DEFERRABLE_TAGS,
    weights and kv_cache; the same rule as CuMemAllocator.wake_up)."""
    from vllm.device_allocator import DEFERRABLE_TAGS

    return sum(
        int(d.handle[1])
        for d in getattr(allocator, "pointer_to_data", {}).values()
        if d.is_asleep and (tags is None or d.tag in tags or d.tag not in DEFERRABLE_TAGS)
    )


def wake_room(tags: list[str] | None, mem_get_info: Any, allocator: Any) -> dict[str, int]:
    """{"free": free bytes on the GPU (mem_get_info()[0]), "need": what waking with `tags` maps}."""
    free, total = mem_get_info()
    return {"free": int(free), "total": int(total), "need": sleeping_bytes(allocator, tags)}


def _refresh_embedding_kernels(model: Any) -> None:
    """Rebuild every unquantized embedding / LM head's derived kernel state from its current weight.

    A no-op off CPU; on CPU it re-packs the (kept) weight for the logits GEMM.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, UnquantizedEmbeddingMethod) and module.weight.numel():
            method.process_weights_after_loading(module)
