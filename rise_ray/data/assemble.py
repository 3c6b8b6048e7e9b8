"""A training example's token ids from stored ids: the chat template's texts tokenized, each
assistant reply as the ids the engine sampled, never its text re-tokenized.

The assembly rule. The template renders the conversation ending with the reply; it is cut at each
assistant message: the text up to its generation prompt, its content, the text after it. The texts
are tokenized alone (a text never spans a reply: with the usual templates a special token ends
each reply, so the engine's own tokenization of the rendered prompt splits there too), and each
content is replaced by that reply's sampled ids. Turn 1's context is therefore exactly the ids
the engine was given (`Turn.prompt_ids`); a later context equals the engine's prompt unless a
re-tokenized earlier reply differed from its sampled ids (the engine saw the re-tokenization; the
trained row keeps the sampled ids, so the packed row is one consistent sequence), or the data set
rebuilds the context (dedupe, another window); `contexts_not_engine_prompt` counts those. A
reply that ends with the stop token it sampled keeps it, and the template's copy of that token
is not added again. Replies known only as text (a teacher's, whose vocabulary may differ, or
turns recorded without ids) are tokenized alone and counted in `replies_from_text`. Packed rows
only ever merge examples whose ids are prefixes of one another, so the layouts agree exactly.
"""

from __future__ import annotations

from typing import Any

from rise_ray.rollout.episodes import Turn

ENCODE_BATCH = 4096  # texts per batched tokenizer call


class TemplateError(ValueError):
    """A chat template that does not render a conversation as an extension of each prompt."""


def render(tokenizer: Any, messages: list[dict[str, str]], gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def reply_ids(turn: Turn) -> list[int] | None:
    """The ids the policy sampled for this turn; None for a reply known only as text (a teacher's,
    whose vocabulary may differ, or a turn recorded without ids)."""
    return [int(i) for i in turn.token_ids] if turn.token_ids and turn.source == "policy" else None


def example_segments(
    tokenizer: Any, context: list[dict[str, str]], response: str
) -> list[str | int]:
    """The example for the reply `response` to `context` as template texts and placeholders: an
    int k stands for the ids of the conversation's k-th assistant message (the last: the reply).

    Texts are cut from the rendered conversation at each reply's generation prompt and content,
    so a text never spans a reply; the template must render the conversation as an extension of
    each generation prompt, and each reply verbatim or trimmed."""
    msgs = [*context, {"role": "assistant", "content": response}]
    full = render(tokenizer, msgs, gen=False)
    out: list[str | int] = []
    pos = 0
    for k, j in enumerate(j for j, m in enumerate(msgs) if m["role"] == "assistant"):
        head = render(tokenizer, msgs[:j], gen=True)
        # Some templates trim a reply (Llama 3's `| trim`): the engine then saw the trimmed text,
        # and the row keeps the sampled ids (whitespace included) in its place.
        raw = msgs[j]["content"]
        content = next((c for c in (raw, raw.strip(), raw.lstrip("\n")) if full.startswith(c, len(head))), None)
        if not full.startswith(head) or len(head) < pos or content is None:
            raise TemplateError(
                "the chat template is not prefix-stable: the conversation with the reply does not start with "
                "the generation prompt the model saw followed by the reply, so the reply's tokens cannot be placed "
                f"(prompt ends {head[-40:]!r}, conversation continues {full[len(head) - 40 :][:80]!r})"
            )
        out += [full[pos : len(head)], k]
        pos = len(head) + len(content)
    out.append(full[pos:])  # the template's end of the reply (trained with it)
    return out


def assemble(
    segments: list[str | int], replies: list[list[int]], encode: Any, special: set[int]
) -> tuple[list[int], int]:
    """(ids, start): template texts encoded, placeholders replaced by the replies' ids. A reply
    whose last id is a special token (the stop token it sampled) that the next text also starts
    with keeps its own: the template's copy is dropped."""
    ids: list[int] = []
    start = 0
    after_reply = False
    for seg in segments:
        if isinstance(seg, int):
            start = len(ids)
            ids += replies[seg]
            after_reply = bool(replies[seg])
            continue
        part = encode(seg)
        if after_reply and part and ids[-1] == part[0] and part[0] in special:
            part = part[1:]
        ids += part
        after_reply = False
    return ids, start


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Template texts to ids in batched calls (add_special_tokens=False: the chat template writes
    them, as when the engines tokenize a rendered conversation)."""
    out: list[list[int]] = []
    for start in range(0, len(texts), ENCODE_BATCH):
        enc = tokenizer(texts[start : start + ENCODE_BATCH], add_special_tokens=False)["input_ids"]
        out.extend([int(i) for i in row] for row in enc)
    return out
