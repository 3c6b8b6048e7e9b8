"""The training-set builder: criteria, dedupe, weights, token weights, layouts, lengths, stored ids, files."""

from __future__ import annotations

import math
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from synthetic import arithmetic_trajectories, bpe_chat_tokenizer, make_trajectory, make_turn

from rise_ray.config import DataConfig, load_config
from rise_ray.data.builder import (
    BuildError,
    build_dataset,
    build_examples,
    prepare,
    read_rows,
    read_stats,
    read_trajectories,
    select_turns,
    turn_weight,
)
from rise_ray.envs.base import DataError, Env
from rise_ray.rollout.episodes import Trajectory, build_conversation

FEEDBACK = "Wrong. Try again."


@pytest.fixture(scope="module")
def tok():
    from rise_ray.demo.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def env() -> Env:
    return Env(feedback=FEEDBACK)


def cfg(**kw) -> DataConfig:
    kw.setdefault("shuffle", False)
    return DataConfig(**kw)


def by_turn(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """prefix rows keyed by (problem, turn)."""
    return {(r["problem_id"], r["turns"][0]): r for r in rows}


def trained_text(tok, row: dict) -> str:
    return tok.decode([t for t, w in zip(row["input_ids"], row["weights"], strict=True) if w > 0])


# --- criteria, dedupe, weights --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("criteria", "expected"),
    [
        ("all", [True, True, True, True, True]),
        ("better", [True, False, True, True, False]),
        ("best", [True, False, True, True, False]),
        ("success", [False, False, False, True, False]),
    ],
)
def test_criteria_on_hand_made_rewards(criteria, expected):
    rewards = [0.0, -1.0, 0.0, 1.0, 0.0]
    correct = [False, False, False, True, False]
    assert select_turns(rewards, correct, criteria) == expected


def test_better_and_best_differ():
    # 1 -> 0 -> 0.5: the third beats the second (better) but not the first (best)
    rewards = [1.0, 0.0, 0.5]
    assert select_turns(rewards, [False] * 3, "better") == [True, False, True]
    assert select_turns(rewards, [False] * 3, "best") == [True, False, False]


def test_unknown_criteria_is_an_error():
    with pytest.raises(BuildError, match="data.criteria"):
        select_turns([0.0], [False], "most")


def test_prepare_drops_empty_duplicates_and_turns_after_correct():
    traj = make_trajectory(
        "p",
        "q?",
        [("a", 0.0), ("  ", 0.0), (" a \n", 0.0), ("b", 1.0), ("c", 0.0)],
    )
    p = prepare(traj)
    assert [t.response for t in p.turns] == ["a", "b"]
    assert p.counts == {"dropped_empty": 1, "dropped_duplicate": 1, "dropped_after_correct": 1}
    kept = prepare(traj, dedupe=False, stop_at_correct=False)
    assert len(kept.turns) == 5


@pytest.mark.parametrize(("after", "responses"), [(0, ["a", "b"]), (1, ["a", "b", "b"]), (2, ["a", "b", "b", "c"])])
def test_turns_after_correct_keeps_that_many_turns_past_the_first_right_one(after, responses):
    traj = make_trajectory("p", "q?", [("a", 0.0), ("b", 1.0), ("b", 1.0), ("c", 0.0), ("b", 1.0)])
    p = prepare(traj, dedupe=False, stop_at_correct=False, turns_after_correct=after)
    assert [t.response for t in p.turns] == responses
    assert p.counts["dropped_after_correct"] == 5 - len(responses)
    # stop_at_correct wins (the paper's cut), and a trajectory never right keeps every turn
    assert len(prepare(traj, dedupe=False, stop_at_correct=True, turns_after_correct=after).turns) == 2
    wrong = make_trajectory("w", "q?", [("a", 0.0), ("c", 0.0), ("d", 0.0)])
    assert len(prepare(wrong, dedupe=False, stop_at_correct=False, turns_after_correct=0).turns) == 3


def test_weights_exp_center_and_cap(env, tok):
    assert turn_weight(1.0, 0.4) == pytest.approx(math.exp(2.5))
    assert turn_weight(-1.0, 0.4) == pytest.approx(math.exp(-2.5))
    assert turn_weight(1.0, 0.4, max_weight=5.0) == 5.0
    assert turn_weight(1.0, 0.5, baseline=0.5) == pytest.approx(math.exp(1.0))

    trajs = [make_trajectory("p", "Q?", [("x", 0.0), ("y", 1.0)]), make_trajectory("p", "Q?", [("z", 1.0)])]
    # baseline for "p" = mean(0, 1, 1) = 2/3
    rows, stats = build_examples(trajs, env, tok, cfg(layout="prefix", center_rewards=True))
    got = sorted(round(sum(r["weights"]), 6) for r in rows)
    want = sorted(round(math.exp((r - 2 / 3) / 0.4), 6) for r in (0.0, 1.0, 1.0))
    assert got == pytest.approx(want, rel=1e-6)
    rows, stats = build_examples(trajs, env, tok, cfg(layout="prefix", max_weight=2.0))
    assert max(sum(r["weights"]) for r in rows) == pytest.approx(2.0)
    assert stats["weight_max"] == 2.0


def test_after_correct_weight_scales_only_the_turns_past_the_first_right_one(env, tok):
    # wrong, right (first correct), right kept, wrong after it: only the last two are scaled
    traj = make_trajectory("p", "Q?", [("a", 0.0), ("b", 1.0), ("b", 1.0), ("c", 0.0)])
    kw = dict(layout="prefix", stop_at_correct=False, dedupe=False)
    rows, _ = build_examples([traj], env, tok, cfg(after_correct_weight=0.25, **kw))
    got = {t: sum(r["weights"]) for (_, t), r in by_turn(rows).items()}
    e = math.exp(1 / 0.4)
    assert got == pytest.approx({0: 1.0, 1: e, 2: 0.25 * e, 3: 0.25}, rel=1e-6)
    # a trajectory never right is untouched
    wrong = make_trajectory("w", "Q?", [("a", 0.0), ("c", 0.0)])
    rows, _ = build_examples([wrong], env, tok, cfg(after_correct_weight=0.25, **kw))
    assert sorted(sum(r["weights"]) for r in rows) == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="after_correct_weight"):
        DataConfig(after_correct_weight=-1)


def test_first_turn_weight_scales_the_first_turn_and_zero_leaves_it_untrained(env, tok):
    traj = make_trajectory("p", "Q?", [("a", 1.0), ("b", 0.0), ("c", 1.0)])
    kw = dict(layout="prefix", stop_at_correct=False, dedupe=False)
    e = math.exp(1 / 0.4)
    rows, _ = build_examples([traj], env, tok, cfg(first_turn_weight=0.5, **kw))
    assert {t: sum(r["weights"]) for (_, t), r in by_turn(rows).items()} == pytest.approx({0: 0.5 * e, 1: 1.0, 2: e})
    rows, stats = build_examples([traj], env, tok, cfg(first_turn_weight=0.0, **kw))
    assert sorted(t for _, t in by_turn(rows)) == [1, 2] and stats["turns_zero_weight_skipped"] == 1
    # the first attempt stays in the later turns' context
    assert all(r["num_tokens"] > r["trained_tokens"] for r in rows)
    with pytest.raises(ValueError, match="first_turn_weight"):
        DataConfig(first_turn_weight=-1)

# --- token weights --------------------------------------------------------------------------------


def test_token_weights_cover_exactly_the_assistant_reply(env, tok):
    traj = make_trajectory("p", "What is 2+2?", [("It is 5.", 0.0), ("It is 4.", 1.0)])
    rows, stats = build_examples([traj], env, tok, cfg(layout="prefix"))
    assert stats["examples"] == 2 and stats["rows"] == 2
    r0, r1 = by_turn(rows)[("p", 0)], by_turn(rows)[("p", 1)]
    # trained tokens: the reply and the end-of-turn token, nothing of prompts or feedback
    assert trained_text(tok, r0) == "It is 5.<|end|>"
    assert trained_text(tok, r1) == "It is 4.<|end|>"
    n1 = len("It is 4.") + 1
    w1 = [w for w in r1["weights"] if w > 0]
    assert w1 == pytest.approx([math.exp(1 / 0.4) / n1] * n1, rel=1e-6)
    # the second example's context is the conversation the model saw at turn 2
    conv = build_conversation(env, traj_problem(traj), ["It is 5."], None)
    prompt = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert r1["input_ids"][: len(prompt)] == list(prompt)
    assert all(w == 0 for w in r1["weights"][: len(prompt)])
    assert FEEDBACK in tok.decode(r1["input_ids"])


def test_tiny_tokenizer_phrases_are_one_token_and_prefixes_agree(tok):
    """The tiny tokenizer's phrase tokens ("\\boxed{", the feedback texts) and digit pairs shorten
    conversations and keep every turn's prompt a token-prefix of the whole conversation (no drift)."""
    from rise_ray.envs.base import INCORRECT_FEEDBACK
    from rise_ray.envs.search import make_search

    for phrase in ("\\boxed{", "Incorrect."):
        assert len(tok(phrase, add_special_tokens=False)["input_ids"]) == 1
    assert len(tok(INCORRECT_FEEDBACK, add_special_tokens=False)["input_ids"]) == 2
    assert tok("a\\boxed{b}", add_special_tokens=False)["input_ids"][1] == tok.convert_tokens_to_ids("\\boxed{")
    for text, pieces in (("a47", ["a", "47"]), ("12345", ["12", "34", "5"]), ("x 05 9", ["x", " ", "05", " ", "9"])):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == pieces and tok.decode(ids) == text
    env = make_search(num_train=4, num_test=1, feedback="Incorrect.", repeat_question=False)
    p = env.train[0]
    attempts = [env.demo_attempt(p, o) or env.demo_attempt(p, -o) for o in (2, 1, 0)]
    traj = make_trajectory(p.id, p.question, [(a, float(o == 0)) for a, o in zip(attempts, (2, 1, 0), strict=True)])
    rows, stats = build_examples([traj], env, tok, cfg(layout="packed", stop_at_correct=False, dedupe=False))
    assert stats["examples"] == 3 and stats["rows"] == 1
    conv = [*build_conversation(env, p, attempts[:-1], None), {"role": "assistant", "content": attempts[-1]}]
    full = tok.apply_chat_template(conv, tokenize=False)
    assert tok.decode(rows[0]["input_ids"]) == full  # decoding gives the text back
    chars = len(full) - sum(len(s) - 1 for s in ("<|user|>", "<|end|>", "<|assistant|>") for _ in range(full.count(s)))
    pairs = len(re.findall(r"\d\d", full))
    assert pairs >= 7 + 3 * 2  # the question's 7 numbers, 2 in each attempt's check
    assert len(rows[0]["input_ids"]) == chars - pairs - 3 * (len("\\boxed{") - 1) - 2 * (len("Incorrect.") - 1)


def traj_problem(traj: Trajectory):
    from rise_ray.envs.base import Problem

    return Problem(traj.problem_id, traj.question, traj.reference)


def test_degenerate_turns_stay_in_context_but_are_not_trained(env, tok):
    traj = Trajectory(
        "p",
        "Q?",
        "0",
        [make_turn("ababababab", -1.0, degenerate=True), make_turn("right", 1.0)],
    )
    rows, stats = build_examples([traj], env, tok, cfg(layout="packed"))
    assert stats["turns_degenerate_skipped"] == 1 and stats["examples"] == 1
    (row,) = rows
    assert "ababababab" in tok.decode(row["input_ids"])
    assert trained_text(tok, row) == "right<|end|>"


def test_only_successful_and_criteria_counts(env, tok):
    good = make_trajectory("g", "Q1?", [("no", 0.0), ("yes", 1.0)])
    bad = make_trajectory("b", "Q2?", [("no", 0.0), ("still no", 0.0)])
    rows, stats = build_examples([good, bad], env, tok, cfg(only_successful=True, layout="prefix"))
    assert {r["problem_id"] for r in rows} == {"g"}
    assert stats["trajectories_unsuccessful_skipped"] == 1
    rows, stats = build_examples([good, bad], env, tok, cfg(criteria="success", layout="prefix"))
    assert [(r["problem_id"], r["turns"]) for r in rows] == [("g", [1])]
    assert stats["turns_not_selected"] == 3


# --- layouts --------------------------------------------------------------------------------------


def test_packed_rows_hold_the_prefix_examples_in_place(env, tok):
    trajs = arithmetic_trajectories(6, turns=5, seed=3)
    prefix, ps = build_examples(trajs, env, tok, cfg(layout="prefix"))
    packed, ks = build_examples(trajs, env, tok, cfg(layout="packed"))
    assert ks["examples"] == ps["examples"] == ps["rows"] == sum(r["units"] for r in packed)
    assert ks["trained_tokens"] == ps["trained_tokens"]
    assert ks["rows"] == len({r["problem_id"] for r in prefix})  # one row per trajectory
    assert ps["input_tokens"] / ks["input_tokens"] > 2.5
    pre = by_turn(prefix)
    for row in packed:
        for t in row["turns"]:
            ex = pre[(row["problem_id"], t)]
            n = len(ex["input_ids"])
            # tokenizing the prefix and the whole conversation agree
            assert row["input_ids"][:n] == ex["input_ids"]
            start = next(i for i, w in enumerate(ex["weights"]) if w > 0)
            assert row["weights"][start:n] == pytest.approx(ex["weights"][start:n])
        assert sum(row["weights"]) == pytest.approx(sum(sum(pre[(row["problem_id"], t)]["weights"]) for t in row["turns"]))


def test_context_window_rebuilds_the_prompt_the_model_saw(env, tok):
    traj = make_trajectory("p", "Q?", [("first", 0.0), ("second", 0.0), ("third", 1.0)])
    rows, _ = build_examples([traj], env, tok, cfg(layout="prefix", context_window=1))
    last = by_turn(rows)[("p", 2)]
    text = tok.decode(last["input_ids"])
    assert "second" in text and "first" not in text
    packed, stats = build_examples([traj], env, tok, cfg(layout="packed", context_window=1))
    # turn 2's context dropped "first": it cannot share a row with turn 1's
    assert stats["rows"] == 2 and sum(r["units"] for r in packed) == 3
    # "rollout" takes the window the caller resolved from rollout.context_window
    r2, _ = build_examples([traj], env, tok, cfg(layout="prefix"), context_window=1)
    assert by_turn(r2)[("p", 2)]["input_ids"] == last["input_ids"]


def test_too_long_examples_are_truncated_left_or_dropped_and_counted(env, tok):
    traj = make_trajectory("p", "Q" * 60 + "?", [("a" * 20, 0.0), ("b" * 20, 1.0)])
    full, _ = build_examples([traj], env, tok, cfg(layout="prefix", max_length=4096))
    lens = sorted(len(r["input_ids"]) for r in full)
    limit = lens[0] + 5  # turn 1 fits, turn 2 does not
    rows, stats = build_examples([traj], env, tok, cfg(layout="prefix", max_length=limit))
    assert stats["truncated"] == 1 and stats.get("dropped_too_long", 0) == 0
    long_row = max(rows, key=lambda r: r["turns"][0])
    assert len(long_row["input_ids"]) == limit
    assert trained_text(tok, long_row) == "b" * 20 + "<|end|>"
    assert long_row["input_ids"] == by_turn(full)[("p", 1)]["input_ids"][-limit:]
    packed, pstats = build_examples([traj], env, tok, cfg(layout="packed", max_length=limit))
    assert pstats["truncated"] == 1 and pstats["rows"] == 2  # a truncated example keeps its own row
    rows, stats = build_examples([traj], env, tok, cfg(layout="prefix", max_length=limit, overflow="drop"))
    assert stats["dropped_too_long"] == 1 and stats["examples"] == 1
    rows, stats = build_examples([traj], env, tok, cfg(layout="prefix", max_length=15))
    assert stats["dropped_too_long"] == 2 and rows == []  # the reply alone does not fit


# --- stored ids with a real BPE tokenizer ---------------------------------------------------------


def test_bpe_packed_rows_hold_the_prefix_examples(env):
    tok = bpe_chat_tokenizer("assistant:\n")
    trajs = arithmetic_trajectories(4, turns=3, seed=5)
    rows, stats = build_examples(trajs, env, tok, cfg(layout="prefix"))
    assert stats["replies_from_text"] == stats["examples"]  # hand-made turns carry no ids
    packed, _ = build_examples(trajs, env, tok, cfg(layout="packed"))
    assert len(packed) == 4
    pre = by_turn(rows)
    for row in packed:
        for t in row["turns"]:
            ids = pre[(row["problem_id"], t)]["input_ids"]
            assert row["input_ids"][: len(ids)] == ids


def sampled_turns(tok, replies: list[str]) -> list:
    """Policy turns whose sampled ids are NOT the re-tokenization of their text: each reply sampled
    one character at a time (a real engine may sample any segmentation), ending on <eot>."""
    eot = tok.convert_tokens_to_ids("<eot>")
    turns = []
    for k, text in enumerate(replies):
        ids = [i for ch in text for i in tok(ch, add_special_tokens=False)["input_ids"]] + [eot]
        assert ids[:-1] != tok(text, add_special_tokens=False)["input_ids"]
        turn = make_turn(text, float(k == len(replies) - 1))
        turn.token_ids = ids
        turns.append(turn)
    return turns


@pytest.mark.parametrize("layout", ["prefix", "packed"])
def test_rows_carry_the_sampled_ids_not_a_re_tokenization(env, layout):
    """A generation prompt ending in a space ("assistant: ") makes re-tokenizing a reply starting
    " Adding" merge across the boundary (the old drift); and replies sampled as other segmentations
    than their text's tokenization. The rows hold the sampled ids, the prompt the engine's ids."""
    from rise_ray.rollout.engine import chat_prompt_ids

    tok = bpe_chat_tokenizer("assistant: ")
    replies = [" Adding 12 and 55 gives 66.", " Adding 12 and 55 gives 67."]
    traj = Trajectory("p", "What is 12 + 55?", "67", sampled_turns(tok, replies))
    rows, stats = build_examples([traj], env, tok, cfg(layout=layout))
    assert stats["replies_from_text"] == 0 and stats["examples"] == 2
    runs = [r for row in rows for r in trained_runs(row)]
    assert [ids for ids, _ in runs] == [t.token_ids for t in traj.turns]  # ids compared, not text
    first = rows[0]["input_ids"] if layout == "packed" else by_turn(rows)[("p", 0)]["input_ids"]
    prompt = chat_prompt_ids(tok, [{"role": "user", "content": traj.question}])
    assert first[: len(prompt)] == prompt  # turn 1's context: the ids the engine was given
    if layout == "packed":  # turn 2's context holds turn 1's sampled ids, not their re-tokenization
        (row,) = rows
        ids = row["input_ids"]
        assert ids[len(prompt) : len(prompt) + len(traj.turns[0].token_ids)] == traj.turns[0].token_ids


def test_a_template_that_trims_replies_keeps_the_sampled_whitespace(env):
    tok = bpe_chat_tokenizer("assistant:\n")
    tok.chat_template = tok.chat_template.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")
    turns = sampled_turns(tok, [" Adding 12 and 55 gives 66.\n", " Adding 12 and 55 gives 67.\n"])
    rows, stats = build_examples([Trajectory("p", "What is 12 + 55?", "67", turns)], env, tok, cfg(layout="packed"))
    assert [ids for row in rows for ids, _ in trained_runs(row)] == [t.token_ids for t in turns]
    assert stats["rows"] == 1


def trained_runs(row: dict) -> list[tuple[list[int], int]]:
    """(ids, start) of each run of trained positions in a row."""
    runs, cur, start = [], [], 0
    for pos, (t, w) in enumerate(zip(row["input_ids"], row["weights"], strict=True)):
        if w > 0:
            start = pos if not cur else start
            cur.append(t)
        elif cur:
            runs.append((cur, start))
            cur = []
    return runs + ([(cur, start)] if cur else [])


def test_template_that_is_not_prefix_stable_is_a_clear_error(env):
    tok = bpe_chat_tokenizer("assistant:\n")
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<eot>{% endfor %}"
        "{% if add_generation_prompt %}bot> {% endif %}"
    )
    with pytest.raises(BuildError, match=r"problem 'p' turn 0: .*prefix-stable"):
        build_examples([make_trajectory("p", "hi", [("hello", 1.0)])], env, tok, cfg())


# --- files ----------------------------------------------------------------------------------------


def write_trajectories(trajs: list[Trajectory], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist([t.to_record() for t in trajs]), path)


def test_dataset_round_trip_from_parquet_trajectories(tmp_path, env, tok):
    trajs = arithmetic_trajectories(5, turns=4, seed=2)
    write_trajectories(trajs[:3], str(tmp_path / "iter_1" / "trajectories" / "part-0.parquet"))
    write_trajectories(trajs[3:], str(tmp_path / "iter_1" / "trajectories" / "part-1.parquet"))
    back = read_trajectories(str(tmp_path / "iter_1"))
    assert [t.problem_id for t in back] == [t.problem_id for t in trajs]
    assert back[0].turns[0].response == trajs[0].turns[0].response
    out = tmp_path / "ds"
    stats = build_dataset(str(tmp_path / "iter_1"), env, tok, cfg(layout="packed"), str(out))
    assert read_stats(str(out))["rows"] == stats["rows"] == len(read_rows(str(out)))
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    rows = read_rows(str(out))
    direct, _ = build_examples(trajs, env, tok, cfg(layout="packed"))
    assert [r["input_ids"] for r in rows] == [r["input_ids"] for r in direct]


def test_bad_inputs_name_the_file(tmp_path, env, tok):
    with pytest.raises(DataError, match="no such"):
        read_trajectories(str(tmp_path / "missing"))
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"problem_id": ["x"], "question": ["q"]}), str(bad))
    with pytest.raises(DataError, match=r"bad\.parquet.*missing column"):
        read_trajectories(str(bad))
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(DataError, match="junk.parquet"):
        read_trajectories(str(junk))
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    with pytest.raises(BuildError, match="chat template"):
        build_dataset(arithmetic_trajectories(1), env, plain, cfg(), str(tmp_path / "x"))
    with pytest.raises(BuildError, match="no training examples"):
        build_dataset(arithmetic_trajectories(2), env, tok, cfg(max_length=8), str(tmp_path / "y"))


def test_config_section_validates():
    c = load_config(None, ["data.criteria=best", "data.layout=prefix", "data.context_window=null"])
    assert c.data.criteria == "best" and c.data.context_window is None
    from rise_ray.config import ConfigError

    with pytest.raises(ConfigError, match="data.criteria"):
        load_config(None, ["data.criteria=most"])
    with pytest.raises(ConfigError, match="data.context_window"):
        load_config(None, ["data.context_window=0"])


def test_data_aggregates_iterations(tmp_path, env, tok):
    """data.aggregate (the default, as the paper's Algorithm 1): iteration k trains on the trajectories of
    iterations 1..k; otherwise on iteration k's alone."""
    from rise_ray.driver import dataset_sources
    from rise_ray.manifest import Manifest

    trajs = arithmetic_trajectories(6, turns=3, seed=4)
    manifest = Manifest(str(tmp_path))
    for k, part in ((1, trajs[:4]), (2, trajs[4:])):
        path = str(tmp_path / f"iter_{k}" / "trajectories")
        write_trajectories(part, os.path.join(path, "part-00000.parquet"))
        manifest.record(f"iter_{k}/collect", {"path": path}, 0.0)
    assert load_config(None).data.aggregate is True
    union = dataset_sources(manifest, 2, aggregate=True)
    assert union == [str(tmp_path / "iter_1" / "trajectories"), str(tmp_path / "iter_2" / "trajectories")]
    assert dataset_sources(manifest, 2, aggregate=False) == union[1:]
    assert dataset_sources(manifest, 1, aggregate=True) == union[:1]
    stats = build_dataset(union, env, tok, cfg(layout="packed"), str(tmp_path / "ds"))
    assert stats["trajectories_in"] == 6 and stats["source"] == union
    direct, _ = build_examples(trajs, env, tok, cfg(layout="packed"))
    assert [r["input_ids"] for r in read_rows(str(tmp_path / "ds"))] == [r["input_ids"] for r in direct]
    alone = build_dataset(union[1:], env, tok, cfg(layout="packed"), str(tmp_path / "ds2"))
    assert alone["trajectories_in"] == 2 and alone["source"] == union[1]


def test_turns_repeating_a_wrong_answer_stay_in_context_but_are_not_trained(env, tok):
    copy = make_turn("wrong", 0.0)
    copy.repeats_wrong = True  # rollout.improve_distinct found only copies of a wrong answer
    traj = Trajectory("p", "Q?", "0", [make_turn("wrong", 0.0), copy, make_turn("right", 1.0)])
    rows, stats = build_examples([traj], env, tok, cfg(layout="packed", dedupe=False, criteria="all"))
    assert stats["turns_repeating_wrong_skipped"] == 1 and stats["examples"] == 2
    (row,) = rows
    assert tok.decode(row["input_ids"]).count("wrong") == 2
