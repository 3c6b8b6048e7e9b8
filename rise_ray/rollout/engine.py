"""The rollout-engine protocol shared by vLLM (GPU or the CPU build) and transformers.

An engine turns chat conversations into sampled assistant replies. Everything above it
(episodes, the rollout pool, evaluation, serving) talks only to this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    logprobs: bool = False  # return each sampled token's log-probability (Completion.logprobs)

    def with_(self, **kw: Any) -> SamplingParams:
        return replace(self, **kw)


@dataclass(frozen=True)
class Completion:
    """A reply and what the engine really did to make it.

    text: the reply's text.
    finished: False when the reply hit max_tokens without a stop token.
    token_ids: the sampled ids, the stop token included when the engine sampled one (the text is
      their decoding without it). Training uses these ids, never a re-tokenization of the text.
    prompt_ids: the ids the engine was given (the chat-templated conversation).
    logprobs: the log-probability of each sampled id, where the engine was asked for them.
    """

    text: str
    finished: bool = True
    token_ids: tuple[int, ...] = ()
    prompt_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Engines hand over lists, numpy ints or tensors: keep plain, hashable, picklable values.
        object.__setattr__(self, "token_ids", tuple(int(i) for i in self.token_ids))
        object.__setattr__(self, "prompt_ids", tuple(int(i) for i in self.prompt_ids))
        if self.logprobs is not None:
            object.__setattr__(self, "logprobs", tuple(float(x) for x in self.logprobs))
            if len(self.logprobs) != len(self.token_ids):
                raise ValueError(f"{len(self.logprobs)} logprobs for {len(self.token_ids)} token ids")


def chat_prompt_ids(tokenizer: Any, conversation: Conversation) -> list[int]:
    """Token ids of the chat-templated conversation with the generation prompt: the ids the model
    sees (vLLM's chat renderer makes the same call). return_dict=False: transformers 5 returns a
    BatchEncoding by default."""
    return list(tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True, return_dict=False))


class PromptTooLong(ValueError):
    """A conversation does not fit the model's context with room to answer."""


@runtime_checkable
class Engine(Protocol):
    max_model_len: int

    def generate(
        self, conversations: list[Conversation], n: int, params: SamplingParams
    ) -> list[list[Completion]]:
        """n completions for each conversation, in order. Raises PromptTooLong for a prompt that
        leaves no room for max_tokens."""
        ...

    def prompt_len(self, conversation: Conversation) -> int:
        """Tokens of the chat-templated conversation, generation prompt included."""
        ...

    def update_weights(self, weights: Any) -> None:
        """Load new weights in place: a {name: tensor} state dict or a checkpoint directory."""
        ...

    def top_logprobs(self, conversation: Conversation, k: int = 8) -> list[tuple[int, float]]:
        """The k most likely next tokens (id, log-probability) after the generation prompt: used
        to check that synced weights match the trained model."""
        ...
