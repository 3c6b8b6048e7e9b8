"""vLLM's async engine (`AsyncLLM`) behind the Engine protocol: continuous batching.

A request joins the running batch at the engine's next step and leaves it when it finishes (or is
aborted), so nobody waits for a whole wave. Async callers (the Serve replica, async episodes) use
`stream` / `agenerate` on one event loop, the engine's home loop (the first loop that calls it);
sync callers (the Engine protocol's `generate`, from any other thread) hand their call to that loop.
Without a home loop the first sync call starts a private one on a daemon thread.

The engine core runs in its own process (AsyncLLM always uses one); on CPU vLLM adds a worker
process for the model (its CPU platform forbids the in-process executor once the core is a process).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import sys
import threading
import types
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping
from typing import Any

import torch

from rise_ray.rollout.engine import Completion, Conversation, SamplingParams, chat_prompt_ids
from rise_ray.rollout.hf import check_fits, checkpoint_files
from rise_ray.rollout.vllm import (
    _completions,
    _import_vllm,
    _unaliased_cpu,
    rendered_prompt,
    shm_dir,
    vllm_engine_args,
)


@contextlib.contextmanager
def _children_import_rise_ray() -> Iterator[None]:
    """A spawned child runs its parent's `__main__` before anything else. Inside a Ray actor (where
    vLLM always spawns) that is Ray's worker script, and the engine process would import
    transformers, and with it the CUDA-linked torchvision, before rise_ray could hide it: while the
    engine starts, `__main__` names rise_ray.rollout.spawn_main (grandchildren inherit it)."""
    main = sys.modules.get("__main__")
    stub = types.ModuleType("__main__")
    stub.__spec__ = importlib.util.find_spec("rise_ray.rollout.spawn_main")
    sys.modules["__main__"] = stub
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


class AsyncVLLMEngine:
    """AsyncLLM with the VLLMEngine's CPU defaults (fp32, eager, a fixed KV cache, whole prefills,
    32-token blocks) and in-place weight sync through the same worker extension."""

    concurrent = True  # generate() may be called from many threads at once (async episodes)

    def __init__(self, model_path: str, **engine_args: Any) -> None:
        vllm = _import_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._vllm = vllm
        for name in ("weight_transfer", "sleep_mode"):  # the offline engine's (VLLMEngine) only
            if engine_args.pop(name, None):
                raise ValueError(f"{name}: not supported by vLLM's async engine (the server's); "
                                 "weights sync through files (sync.method=files)")
        kw = vllm_engine_args(model_path, **engine_args)
        kw.setdefault("disable_log_stats", True)
        with _children_import_rise_ray():
            self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))
        self.tokenizer = self.llm.get_tokenizer()
        self._tok_lock = threading.Lock()  # fast tokenizers are not safe to share across threads
        self.dtype = str(self.llm.model_config.dtype).removeprefix("torch.")
        self.max_model_len = kw["max_model_len"]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()

    # -- loops --------------------------------------------------------------------------------------
    def _bind(self) -> None:
        """Make the running loop the home loop (the first async caller's); AsyncLLM's output handler
        lives there, so every request must be made from it."""
        loop = asyncio.get_running_loop()
        with self._loop_lock:
            if self._loop is None:
                self._loop = loop
        if self._loop is not loop:
            raise RuntimeError("AsyncVLLMEngine: async calls must come from its home event loop; "
                               "call generate() from other threads")

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a coroutine of this engine on its home loop from a thread that is not that loop's."""
        with self._loop_lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="rise-async-vllm", daemon=True).start()
            loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise RuntimeError("AsyncVLLMEngine.generate called on its own event loop: await agenerate instead")
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    # -- prompts ------------------------------------------------------------------------------------
    def prompt_ids(self, conversation: Conversation) -> list[int]:
        with self._tok_lock:
            return chat_prompt_ids(self.tokenizer, conversation)

    def prompt_len(self, conversation: Conversation) -> int:
        return len(self.prompt_ids(conversation))

    def sampling(self, params: SamplingParams, n: int = 1, seed_offset: int = 0, **extra: Any) -> Any:
        """vLLM SamplingParams for ours; `extra` (stop, logprobs, output_kind, ...) goes to vLLM as is.
        vLLM refuses n > 1 when greedy: callers repeat a greedy sample themselves."""
        kw: dict[str, Any] = dict(
            n=n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens,
            seed=None if params.seed is None else params.seed + seed_offset,
            logprobs=0 if params.logprobs else None,
        )
        kw.update(extra)
        return self._vllm.SamplingParams(**kw)

    # -- generation ---------------------------------------------------------------------------------
    async def stream(self, prompt_ids: list[int], sampling: Any, request_id: str | None = None) -> AsyncIterator[Any]:
        """vLLM RequestOutputs of one request as they come. Closing or cancelling the iterator aborts
        the request in the engine (its KV blocks and batch slot are freed at the next step)."""
        self._bind()
        rid = request_id or uuid.uuid4().hex
        gen = self.llm.generate(rendered_prompt(self.llm, prompt_ids), sampling, rid)
        try:
            async for out in gen:
                yield out
        finally:  # closed early (a consumer that stopped reading): abort now, not at garbage collection
            await gen.aclose()

    async def agenerate(self, conversations: list[Conversation], n: int, params: SamplingParams) -> list[list[Completion]]:
        """The Engine protocol's generate, one engine request per conversation, all in the running
        batch. Seeds as VLLMEngine's: conversation i's samples get seed + i*n + j."""
        prompts = [self.prompt_ids(c) for c in conversations]
        check_fits([len(p) for p in prompts], params.max_tokens, self.max_model_len)
        if n < 1:
            return [[] for _ in prompts]
        greedy = params.temperature <= 0

        async def one(i: int, prompt: list[int]) -> list[Completion]:
            final = None
            async for out in self.stream(prompt, self.sampling(params, 1 if greedy else n, i * n)):
                final = out
            assert final is not None
            return _completions(final, prompt, n, params)

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

    def generate(self, conversations: list[Conversation], n: int, params: SamplingParams) -> list[list[Completion]]:
        return self.run(self.agenerate(conversations, n, params))

    def num_running(self) -> int:
        """Requests in the engine now (running or waiting for a batch slot)."""
        return int(self.llm.get_num_unfinished_requests())

    async def _top_logprobs(self, conversation: Conversation, k: int) -> list[tuple[int, float]]:
        sp = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=k)
        final = None
        async for out in self.stream(self.prompt_ids(conversation), sp):
            final = out
        first = final.outputs[0].logprobs[0]
        ranked = sorted(first.items(), key=lambda kv: kv[1].logprob, reverse=True)[:k]
        return [(int(t), float(lp.logprob)) for t, lp in ranked]

    def top_logprobs(self, conversation: Conversation, k: int = 8) -> list[tuple[int, float]]:
        return self.run(self._top_logprobs(conversation, k))

    # -- weights ------------------------------------------------------------------------------------
    async def _load(self, files: list[str]) -> None:
        await self.llm.collective_rpc("rise_load_weights", args=(files,))
        # KV cached for old weights would be reused; the reset fails while requests hold blocks.
        if not await self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update (requests running?)")

    def update_weights(self, weights: Mapping[str, torch.Tensor] | str | os.PathLike) -> None:
        if isinstance(weights, (str, os.PathLike)):
            self.run(self._load(checkpoint_files(os.fspath(weights))))
            return
        import tempfile

        from safetensors.torch import save_file

        fd, path = tempfile.mkstemp(prefix="rise-weights-", suffix=".safetensors", dir=shm_dir())
        os.close(fd)
        try:
            save_file(_unaliased_cpu(weights), path)
            self.run(self._load([path]))
        finally:
            os.unlink(path)

    def close(self) -> None:
        self.llm.shutdown()
