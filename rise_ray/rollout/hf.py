"""A transformers rollout engine: the reference implementation of the Engine protocol.

It runs anywhere torch runs (CPU tests, a GPU without vLLM) and is the ground truth that the vLLM
engine is checked against: same chat template, same weights, same next-token log-probabilities.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from rise_ray.rollout.engine import Completion, Conversation, PromptTooLong, SamplingParams, chat_prompt_ids


def checkpoint_files(path: str) -> list[str]:
    """The safetensors shards of an HF checkpoint directory (or the file itself)."""
    if os.path.isfile(path):
        return [path]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path!r}: save checkpoints with safe_serialization")
    return files


def check_fits(prompt_lens: list[int], max_tokens: int, max_model_len: int, first: int = 0) -> None:
    """Raise PromptTooLong for the first prompt that leaves no room for max_tokens (the prompts are
    conversations first, first + 1, ... of the call)."""
    for i, n in enumerate(prompt_lens, start=first):
        if n + max_tokens > max_model_len:
            raise PromptTooLong(
                f"conversation {i}: prompt of {n} tokens + max_tokens {max_tokens} "
                f"exceeds max_model_len {max_model_len}"
            )


class HFEngine:
    """transformers generate() behind the Engine protocol (fp32 on CPU, bf16 on CUDA by default).
    Tokens are told (`on_tokens`) as generate() makes them, through its streamer hook."""

    def __init__(
        self,
        model_path: str,
        max_model_len: int = 1024,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        max_batch_size: int = 64,
        seed: int | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        if seed is not None:
            # Like vLLM's LLM(seed=...): seed the process RNG once, so a fresh engine's sequence of
            # unseeded calls is reproducible while successive calls still differ.
            torch.manual_seed(seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        self.dtype = str(dtype).removeprefix("torch.")
        self.eos_id: int = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.pad_id: int = self.eos_id if pad is None else pad

    # -- prompts ------------------------------------------------------------------------------------
    def _ids(self, conversation: Conversation) -> list[int]:
        return chat_prompt_ids(self.tokenizer, conversation)

    def prompt_len(self, conversation: Conversation) -> int:
        return len(self._ids(conversation))

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- generation ---------------------------------------------------------------------------------
    def generate(
        self, conversations: list[Conversation], n: int, params: SamplingParams,
        on_tokens: Callable[[int], None] | None = None,
    ) -> list[list[Completion]]:
        """on_tokens: told the tokens generated since it was last told, while the call runs."""
        prompts = [self._ids(c) for c in conversations]
        check_fits([len(p) for p in prompts], params.max_tokens, self.max_model_len)
        # Expanding each prompt n times (rather than num_return_sequences) lets one micro-batch
        # hold at most max_batch_size sequences whatever n is; generate() expands the same way.
        rows = [p for p in prompts for _ in range(n)]
        seed = params.seed
        devices = [self.device] if self.device.type == "cuda" else []
        texts: list[Completion] = []
        # fork_rng: a seeded call is reproducible without resetting the caller's global RNG.
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(rows), self.max_batch_size):
                texts.extend(self._generate_batch(rows[start : start + self.max_batch_size], params, on_tokens))
        return [list(texts[i * n : (i + 1) * n]) for i in range(len(conversations))]

    @torch.inference_mode()
    def _generate_batch(
        self, rows: list[list[int]], params: SamplingParams, on_tokens: Callable[[int], None] | None = None
    ) -> list[Completion]:
        ids, mask = self._left_pad(rows)
        counter = None if on_tokens is None else _TokenCount(self.eos_id, on_tokens)
        sample = params.temperature > 0
        kw: dict[str, Any] = {"do_sample": sample}
        if sample:  # top_k=0: no top-k cut, as in vLLM (a checkpoint's generation_config may set 50)
            kw.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.logprobs:  # raw logits, as vLLM's default logprobs_mode (untouched by temperature/top-p)
            kw.update(output_logits=True, return_dict_in_generate=True)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=params.max_tokens,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            use_cache=True,
            streamer=counter,
            **kw,
        )
        seqs = out.sequences if params.logprobs else out
        new = seqs[:, ids.shape[1] :]
        logprobs = None
        if params.logprobs:
            logits = torch.stack(out.logits, dim=1).float()  # [rows, steps, vocab]
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1).tolist()
        result = []
        for i, (prompt, toks) in enumerate(zip(rows, new.tolist(), strict=True)):
            # The sample ends at its first eos (the stop token is kept in token_ids, not in the
            # text); after it generate() pads the rows that finished before the others.
            finished = self.eos_id in toks
            end = toks.index(self.eos_id) + 1 if finished else len(toks)
            text = self.tokenizer.decode(toks[: end - 1] if finished else toks, skip_special_tokens=True)
            lps = None if logprobs is None else logprobs[i][:end]
            result.append(Completion(text, finished, toks[:end], prompt, lps))
        if counter is not None and (rest := sum(len(c.token_ids) for c in result) - counter.told):
            on_tokens(rest)  # what was told now matches the replies' ids (it already should)
        return result

    @torch.inference_mode()
    def top_logprobs(self, conversation: Conversation, k: int = 8) -> list[tuple[int, float]]:
        ids = torch.tensor([self._ids(conversation)], device=self.device)
        logits = self.model(input_ids=ids).logits[0, -1].float()
        values, indices = torch.log_softmax(logits, dim=-1).topk(k)
        return [(int(i), float(v)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]

    # -- weights ------------------------------------------------------------------------------------
    def update_weights(self, weights: Mapping[str, torch.Tensor] | str | os.PathLike) -> None:
        """Copy new weights into the live parameters (any dtype/device; no re-allocation)."""
        if isinstance(weights, (str, os.PathLike)):
            from safetensors.torch import load_file

            state: dict[str, torch.Tensor] = {}
            for f in checkpoint_files(os.fspath(weights)):
                state.update(load_file(f))
        else:
            state = dict(weights)
        load_state_dict_tied(self.model, state)


class _TokenCount:
    """A transformers streamer (put / end, as generate() calls them) that tells on_tokens each
    step's new tokens: one per row still generating (a row stops after its eos; generate() pads it
    from then on). The first put is the prompt."""

    def __init__(self, eos_id: int, on_tokens: Callable[[int], None]) -> None:
        self.eos_id, self.on_tokens = eos_id, on_tokens
        self.live: torch.Tensor | None = None  # rows still generating
        self.told = 0

    def put(self, value: torch.Tensor) -> None:
        if self.live is None:
            self.live = torch.ones(value.shape[0], dtype=torch.bool)
            return
        tokens = int(self.live.sum())
        self.live &= value.reshape(-1) != self.eos_id
        if tokens:
            self.on_tokens(tokens)
            self.told += tokens

    def end(self) -> None:
        pass


def load_state_dict_tied(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """model.load_state_dict(strict=True), except that a key may be missing when its tensor is tied
    to a loaded one: save_pretrained drops `lm_head.weight` of a tied model, state_dict() keeps it.

    Keys are checked before anything is copied, so a bad state dict leaves the model untouched.
    load_state_dict copies into the existing parameters (param.copy_), so bf16 trainer tensors or
    tensors on another device are cast and moved, and the parameter objects stay the same.
    """
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise KeyError(f"unexpected keys in state dict: {unexpected[:8]}")
    loaded = {own[k].data_ptr() for k in state}
    missing = sorted(k for k in own if k not in state and own[k].data_ptr() not in loaded)
    if missing:
        raise KeyError(f"missing keys in state dict: {missing[:8]}")
    model.load_state_dict(dict(state), strict=False)
