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

GPU path (later, behind the same Engine.update_weights interface): vLLM's native weight transfer
(`WeightTransferConfig` with the NCCL or CUDA-IPC backend, then `LLM.init_weight_transfer_engine`,
`start_weight_update` / `update_weights` / `finish_weight_update`) streams tensors from the trainer
without touching the file system. Nothing here implements it yet.
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
    # GPU path (not implemented): vLLM native weight transfer (WeightTransferConfig, NCCL / IPC,
    # LLM.update_weights) will plug in here, keeping VLLMEngine.update_weights' signature.
    # ---------------------------------------------------------------------------------------------


def _refresh_embedding_kernels(model: Any) -> None:
    """Rebuild every unquantized embedding / LM head's derived kernel state from its current weight.

    A no-op off CPU; on CPU it re-packs the (kept) weight for the logits GEMM.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, UnquantizedEmbeddingMethod) and module.weight.numel():
            method.process_weights_after_loading(module)
