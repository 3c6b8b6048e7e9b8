"""Token ids from the engine to the loss: every reply token of a training row is the id the engine
sampled (ids compared, not text), for multi-turn best-of-N trajectories, on the tiny model's
tokenizer and on real BPE tokenizers (SmolLM2's where it is cached, a locally trained one always)."""

from __future__ import annotations

import dataclasses
import os
import pickle

import pytest
import torch
from synthetic import bpe_chat_tokenizer

from rise_ray.config import DataConfig
from rise_ray.data.builder import build_examples, read_trajectories
from rise_ray.data.store import write_trajectories
from rise_ray.envs.base import Env, Grade, Problem
from rise_ray.rollout.engine import Completion, SamplingParams, chat_prompt_ids
from rise_ray.rollout.episodes import EpisodeSpec, Trajectory, run_episodes
from rise_ray.rollout.hf import HFEngine

SMOLLM2 = os.path.expanduser("~/.cache/rise-ray/models/smollm2-135m-instruct")
HAS_SMOLLM2 = os.path.isfile(os.path.join(SMOLLM2, "model.safetensors"))


class VaryingEnv(Env):
    """Rewards that differ between candidates (a random model never answers right), so best-of-N
    keeps candidates other than the first."""

    def grade_problem(self, response: str, problem: Problem) -> Grade:
        return Grade(False, None, float(len(response) % 5))


ENV = VaryingEnv(name="varying", feedback="Wrong. Try again.", repeat_question=False)
PROBLEMS = [Problem(f"p{k}", f"What is {k} + {k + 11}?", str(2 * k + 11)) for k in range(3)]
SPEC = EpisodeSpec(turns=3, first_n=1, later_n=3, choose="best", params=SamplingParams(max_tokens=12, seed=0))
DATA = dict(shuffle=False, dedupe=False, stop_at_correct=False, criteria="all", max_length=4096)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bpe_model(out: str) -> str:
    """A random tiny Llama over the locally trained BPE tokenizer (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = bpe_chat_tokenizer("assistant: ")  # the generation prompt where re-tokenizing drifted
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["tiny", "bpe", pytest.param("smollm2", marks=pytest.mark.slow)])
def engine(request, tiny_model_dir, tmp_path_factory) -> HFEngine:
    if request.param == "smollm2" and not HAS_SMOLLM2:
        pytest.skip("SmolLM2-135M-Instruct is not in the local cache (rise model get smollm2-135m-instruct)")
    path = {
        "tiny": lambda: tiny_model_dir,
        "bpe": lambda: tiny_bpe_model(str(tmp_path_factory.mktemp("bpe"))),
        "smollm2": lambda: SMOLLM2,
    }[request.param]()
    return HFEngine(path, max_model_len=1024)


def end_of_turn(tok, sampled: list[int]) -> list[int]:
    """The template's ids after a reply, less the stop token the reply sampled itself."""
    msgs = [{"role": "user", "content": "q"}]
    head = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([*msgs, {"role": "assistant", "content": "r"}], tokenize=False)
    tail = tok(full[len(head) + 1 :], add_special_tokens=False)["input_ids"]
    return tail[1:] if sampled and sampled[-1] == tail[0] else tail


def trained_runs(row: dict) -> list[list[int]]:
    runs, cur = [], []
    for t, w in zip(row["input_ids"], row["weights"], strict=True):
        if w > 0:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def check_rows(trajs: list[Trajectory], rows: list[dict], tok) -> None:
    by_id = {t.problem_id: t for t in trajs}
    for row in rows:
        turns = by_id[row["problem_id"]].turns
        runs = trained_runs(row)
        assert len(runs) == len(row["turns"])
        for run, k in zip(runs, sorted(row["turns"]), strict=True):
            sampled = turns[k].token_ids
            assert run == sampled + end_of_turn(tok, sampled)  # the sampled ids, then the template's end
        # the row starts with the ids the engine was given at turn 1
        assert row["input_ids"][: len(turns[0].prompt_ids)] == turns[0].prompt_ids


def test_every_trained_reply_token_is_the_sampled_id(engine, tmp_path):
    tok = engine.tokenizer
    trajs = run_episodes(engine, ENV, PROBLEMS, SPEC)
    path = str(tmp_path / "t.parquet")
    write_trajectories(trajs, path)
    trajs = read_trajectories(path)  # the ids survive parquet
    turns = [t for tr in trajs for t in tr.turns]
    assert len(turns) == 9 and all(t.token_ids and t.prompt_ids for t in turns)
    # best-of-N kept candidates other than the first: their own ids are the ones stored
    assert any(t.response != t.candidates[0] for tr in trajs for t in tr.turns[1:])
    for tr in trajs:
        for t in tr.turns:
            assert tok.decode(t.token_ids, skip_special_tokens=True) == t.response
        convs = [{"role": "user", "content": tr.question}]
        assert tr.turns[0].prompt_ids == chat_prompt_ids(tok, convs)
    retok = [tok(t.response, add_special_tokens=False)["input_ids"] for t in turns]
    differ = sum(r != [i for i in t.token_ids if i not in tok.all_special_ids] for r, t in zip(retok, turns, strict=True))
    if engine.tokenizer.name_or_path != SMOLLM2:  # a random model samples odd segmentations
        assert differ > 0, "every reply re-tokenized to its sampled ids: the check would not see the difference"

    for layout in ("prefix", "packed"):
        rows, stats = build_examples(trajs, ENV, tok, DataConfig(layout=layout, **DATA))
        assert stats["examples"] == 9 and stats.get("replies_from_text", 0) == 0
        check_rows(trajs, rows, tok)
    assert len(rows) == len(trajs)  # packed: one row per trajectory, every turn in place


def test_completions_keep_their_ids_through_pickling():
    c = Completion("ab", False, [5, 6], [1, 2, 3], [-0.5, -1.5])
    assert not isinstance(c, str)  # a record: a caller must say c.text
    back = pickle.loads(pickle.dumps(c))
    assert back == c
    assert (back.text, back.finished, back.token_ids, back.prompt_ids, back.logprobs) == (
        "ab", False, (5, 6), (1, 2, 3), (-0.5, -1.5)
    )
    with pytest.raises(ValueError, match="2 logprobs for 1 token ids"):
        Completion("a", True, [5], [], [-1.0, -2.0])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="SmolLM2-135M-Instruct is not in the local cache")
def test_vllm_on_smollm2_trains_the_sampled_ids(tmp_path):
    pytest.importorskip("vllm")
    from rise_ray.rollout import make_engine

    engine = make_engine("vllm", SMOLLM2, max_model_len=1024)
    try:
        spec = dataclasses.replace(SPEC, params=SPEC.params.with_(max_tokens=64))
        trajs = run_episodes(engine, ENV, PROBLEMS, spec)
        for layout in ("prefix", "packed"):
            rows, stats = build_examples(trajs, ENV, engine.tokenizer, DataConfig(layout=layout, **DATA))
            assert stats.get("replies_from_text", 0) == 0
            check_rows(trajs, rows, engine.tokenizer)
        turns = [t for tr in trajs for t in tr.turns]
        eos = engine.tokenizer.eos_token_id
        assert any(t.finished for t in turns) and all((t.token_ids[-1] == eos) == t.finished for t in turns)
    finally:
        engine.close()
