"""Hand-made multi-turn trajectories for tests and benchmarks (no model needed)."""

from __future__ import annotations

import random

from rise_ray.rollout.episodes import Trajectory, Turn


def make_turn(response: str, reward: float, correct: bool | None = None, degenerate: bool = False) -> Turn:
    ok = reward >= 1.0 if correct is None else correct
    return Turn(
        response=response,
        answer=None,
        reward=reward,
        correct=ok,
        source="policy",
        finished=True,
        degenerate=degenerate,
    )


def make_trajectory(problem_id: str, question: str, turns: list[tuple[str, float]]) -> Trajectory:
    return Trajectory(problem_id, question, "0", [make_turn(r, w) for r, w in turns])


def arithmetic_trajectories(n: int, turns: int = 5, seed: int = 0, solve_last: float = 0.5) -> list[Trajectory]:
    """`n` addition problems, each with `turns` distinct attempts; wrong until (with probability
    `solve_last`) the last one. Rewards: 1 correct, 0 wrong, -1 unparsed (no number)."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        gold = a + b
        solved = rng.random() < solve_last
        ts = []
        for t in range(turns):
            last = t == turns - 1
            if last and solved:
                ts.append(make_turn(f"Adding {a} and {b} gives {gold}. The answer is {gold}.", 1.0))
            elif rng.random() < 0.15:
                ts.append(make_turn(f"I am not sure how to add {a} and {b} (try {t + 1}).", -1.0))
            else:
                wrong = gold + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11]) * (t + 1)
                ts.append(make_turn(f"Adding {a} and {b} gives {wrong}. The answer is {wrong}.", 0.0))
        out.append(Trajectory(f"add-{k}", f"What is {a} + {b}?", str(gold), ts))
    return out


def bpe_chat_tokenizer(gen_prompt: str = "assistant:\n"):
    """A small byte-level BPE tokenizer trained here (no download) with a chat template whose
    generation prompt is `gen_prompt` ("assistant:" + separator). With a trailing space
    ("assistant: ") a reply starting " Adding" merges across the boundary when a conversation is
    re-tokenized: the re-tokenized reply is not the sequence a model sampled after the prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not gen_prompt.startswith("assistant:"):
        raise ValueError(f"gen_prompt must start with 'assistant:', got {gen_prompt!r}")
    corpus = [
        f"user: What is {a} + {b}?<eot>assistant: Adding {a} and {b} gives {a + b}. The answer is {a + b}.<eot>"
        for a in range(10, 40)
        for b in range(50, 60)
    ]
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eot>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    t.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eot>", pad_token="<pad>")
    sep = gen_prompt[len("assistant:") :]
    hf.chat_template = (
        "{% for m in messages %}{{ m['role'] }}:" + sep + "{{ m['content'] }}<eot>{% endfor %}"
        "{% if add_generation_prompt %}" + gen_prompt + "{% endif %}"
    )
    return hf
