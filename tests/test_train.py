"""Reward-weighted SFT: the layout-equivalence proof, the schedule, and real Ray Train + DeepSpeed
runs on CPU (ZeRO-3 on 2 workers, LoRA, a worker killed mid-run)."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from synthetic import arithmetic_trajectories

from rise_ray.config import DataConfig, RunConfig, load_config
from rise_ray.data.builder import build_dataset, build_examples, read_rows
from rise_ray.envs.base import Env
from rise_ray.train.engine import deepspeed_config, make_scheduler
from rise_ray.train.loop import (
    collate,
    split_by_length,
    weighted_loss_sum,
)
from rise_ray.train.progress import StepPlan, micro_batches_in_step, plan_steps, read_log

ENV = Env(feedback="Wrong. Try again.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from rise_ray.demo.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")), hidden_size=64, num_layers=2, intermediate_size=128)


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def batch_of(rows: list[dict]) -> dict:
    return collate(
        {
            "input_ids": [r["input_ids"] for r in rows],
            "weights": [r["weights"] for r in rows],
            "units": [r["units"] for r in rows],
        },
        pad_id=0,
        device="cpu",
    )


def loss_and_grads(model, rows: list[dict], micro: int | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    """The training objective over `rows` (sum of weighted CE / units), in micro-batches."""
    model.zero_grad()
    units = sum(r["units"] for r in rows)
    micro = micro or len(rows)
    total = 0.0
    for i in range(0, len(rows), micro):
        b = batch_of(rows[i : i + micro])
        loss = weighted_loss_sum(model, b["input_ids"], b["attention_mask"], b["weights"]) / units
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def fresh_model(path: str | None = None, vocab: int | None = None):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if path:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(cfg)


# --- the layout-equivalence proof -----------------------------------------------------------------


def bpe_drift_tokenizer():
    from synthetic import bpe_chat_tokenizer

    return bpe_chat_tokenizer("assistant: ")


@pytest.mark.parametrize(
    "case",
    ["plain", "context_window", "truncated", "bpe_drift", "criteria_best"],
)
def test_packed_and_prefix_give_the_same_loss_and_gradients(tiny, case):
    from transformers import AutoTokenizer

    trajs = arithmetic_trajectories(8, turns=5, seed=11)
    tok = AutoTokenizer.from_pretrained(tiny)
    kw: dict = {"shuffle": False}
    window = None
    if case == "context_window":
        window = 2
    if case == "truncated":
        kw["max_length"] = 200
    if case == "criteria_best":
        kw.update(criteria="best", center_rewards=True, max_weight=8.0)
    if case == "bpe_drift":
        tok = bpe_drift_tokenizer()
    prefix, ps = build_examples(trajs, ENV, tok, DataConfig(layout="prefix", **kw), window)
    packed, ks = build_examples(trajs, ENV, tok, DataConfig(layout="packed", **kw), window)
    if case == "truncated":
        assert ps["truncated"] > 0
    if case == "bpe_drift":  # where re-tokenizing replies drifted, every trajectory now packs into one row
        assert ks["rows"] == len({r["problem_id"] for r in prefix})
    assert ks["examples"] == ps["examples"] and ks["rows"] < ps["rows"]

    model = fresh_model(vocab=len(tok)) if case == "bpe_drift" else fresh_model(tiny)
    l_prefix, g_prefix = loss_and_grads(model, prefix)
    l_packed, g_packed = loss_and_grads(model, packed)
    assert l_packed == pytest.approx(l_prefix, rel=1e-5)
    for name, g in g_prefix.items():
        torch.testing.assert_close(g_packed[name], g, rtol=1e-4, atol=1e-6 * g.abs().max().item() + 1e-9)
    # micro-batching the same rows changes nothing when the step divides by the step's units
    l_micro, g_micro = loss_and_grads(model, packed, micro=3)
    assert l_micro == pytest.approx(l_prefix, rel=1e-5)
    # ...and the check can fail: averaging over rows instead of prefix examples does not match
    l_naive, _ = loss_and_grads(model, [dict(r, units=1) for r in packed])
    assert l_naive != pytest.approx(l_prefix, rel=1e-3)


def test_length_groups_cut_padding_and_keep_the_gradient(tiny):
    """A micro-batch split into runs of similar length: fewer padded tokens, the same rows, and the
    same loss and gradients (the step divides by its units, not by rows per forward)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    rows, _ = build_examples(arithmetic_trajectories(12, turns=4, seed=5), ENV, tok, DataConfig(layout="packed"))
    assert len({len(r["input_ids"]) for r in rows}) > 3  # lengths vary: there is padding to save
    table = pa.Table.from_pylist([{k: r[k] for k in ("input_ids", "weights", "units")} for r in rows])
    runs = split_by_length(table, 3)
    assert [r.num_rows for r in runs] == [4, 4, 4]
    lengths = [len(x) for r in runs for x in r.column("input_ids").to_pylist()]
    assert lengths == sorted(len(r["input_ids"]) for r in rows)
    whole = collate(table, pad_id=0, device="cpu")
    parts = [collate(r, pad_id=0, device="cpu") for r in runs]
    assert sum(p["tokens"] for p in parts) == whole["tokens"]
    assert sum(p["units"] for p in parts) == whole["units"]
    assert sum(p["padded_tokens"] for p in parts) < whole["padded_tokens"]
    assert split_by_length(table, 1) == [table] and len(split_by_length(table.slice(0, 2), 5)) == 2

    model = fresh_model(tiny)
    l_whole, g_whole = loss_and_grads(model, rows)
    model.zero_grad()
    l_runs = 0.0
    for p in parts:
        loss = weighted_loss_sum(model, p["input_ids"], p["attention_mask"], p["weights"]) / whole["units"]
        loss.backward()
        l_runs += loss.item()
    assert l_runs == pytest.approx(l_whole, rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_whole[name], rtol=1e-4, atol=1e-6 * g_whole[name].abs().max().item() + 1e-9)


def full_logits_loss_sum(model, input_ids, attention_mask, weights):
    """The same objective computed the plain way: every position's logits, then the weighted CE."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    w = weights[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
    return (ce * w).sum()


def gemma2_with_softcap():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0, sliding_window=16,
    )
    return Gemma2ForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["llama", "lora", "softcap"])
def test_logits_only_at_weighted_positions_give_the_full_loss_and_gradients(tiny, kind):
    """The loss projects to the vocabulary only where a token is trained; loss and gradients equal
    the plain computation over every position's logits, through LoRA and a post-projection
    soft-cap alike."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    rows, _ = build_examples(arithmetic_trajectories(6, turns=3, seed=2), ENV, tok, DataConfig(layout="packed"))
    b = batch_of(rows[:4])
    assert 0 < int((b["weights"] != 0).sum()) < b["tokens"]  # some positions are not trained
    if kind == "softcap":
        model = gemma2_with_softcap()
        b["input_ids"] = b["input_ids"] % 64
    else:
        model = fresh_model(tiny)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    results = []
    for fn in (weighted_loss_sum, full_logits_loss_sum):
        model.zero_grad()
        loss = fn(model, b["input_ids"], b["attention_mask"], b["weights"])
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in params}))
    (l_sel, g_sel), (l_full, g_full) = results
    assert l_sel == pytest.approx(l_full, rel=1e-5)
    for n, g in g_full.items():
        torch.testing.assert_close(g_sel[n], g, rtol=1e-4, atol=1e-6 * g.abs().max().item() + 1e-9)
    # the hook is gone afterwards: a plain forward gives logits at every position again
    assert model(input_ids=b["input_ids"]).logits.shape[:2] == b["input_ids"].shape


def test_prefix_layout_is_the_papers_loss(tiny):
    """The paper's CustomTrainer: each example's mean token CE (HF loss on its labels) times its
    weight, averaged over the examples of the batch."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    prefix, _ = build_examples(arithmetic_trajectories(4, turns=3, seed=2), ENV, tok, DataConfig(layout="prefix"))
    model = fresh_model(tiny)
    ours, _ = loss_and_grads(model, prefix)
    paper = []
    with torch.no_grad():
        for r in prefix:
            ids = torch.tensor([r["input_ids"]])
            labels = torch.tensor([[t if w > 0 else -100 for t, w in zip(r["input_ids"], r["weights"], strict=True)]])
            weight = sum(r["weights"])  # w/n on each of n tokens
            paper.append(model(input_ids=ids, labels=labels).loss.item() * weight)
    assert ours == pytest.approx(sum(paper) / len(paper), rel=1e-5)


# --- schedule, plan, DeepSpeed config -------------------------------------------------------------


def lrs_of(schedule: str, total: int, warmup: int) -> list[float]:
    """The learning rate of each step under the loop's scheduler (base lr 1)."""
    t = load_config(None, ["train.lr=1.0", f"train.lr_schedule={schedule}"]).train
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, t, StepPlan(total, total, total, total, warmup))
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine():
    total, warmup = 100, 10
    lrs = lrs_of("cosine", total, warmup)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1 : warmup + 1], strict=True))
    assert lrs[warmup] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :], strict=False))
    assert lrs[-1] > 0 and lrs[-1] < 0.01
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lrs_of("constant", total, warmup)[80] == 1.0
    assert lrs_of("cosine", total, 0)[0] == 1.0  # no warm-up: the first step at the full rate


def test_plan_counts_steps_per_equal_shard():
    t = load_config(None, ["train.num_workers=2", "train.micro_batch_size=3", "train.grad_accum=2", "train.epochs=3"])
    plan = plan_steps(25, t.train.model_dump())
    assert plan.rows_per_worker == 12 and plan.micro_batches_per_epoch == 4 and plan.steps_per_epoch == 2
    assert plan.total_steps == 6
    plan = plan_steps(21, t.train.model_dump())  # 10 rows per worker: 4 micro-batches, the last short
    assert [micro_batches_in_step(plan, s, 2) for s in range(plan.steps_per_epoch)] == [2, 2]
    plan = plan_steps(13, t.train.model_dump())  # 6 rows: 2 micro-batches -> one step
    assert plan.steps_per_epoch == 1
    with pytest.raises(ValueError, match="num_workers"):
        plan_steps(1, t.train.model_dump())


def test_deepspeed_config_follows_the_train_section():
    t = load_config(
        None,
        ["train.zero_stage=3", "train.max_grad_norm=0.5", "train.deepspeed={zero_optimization: {overlap_comm: false}}"],
    ).train
    ds = deepspeed_config(t, world=2, bf16=False)
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": False}
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": False}
    assert ds["train_batch_size"] == t.micro_batch_size * t.grad_accum * 2


# --- real runs: Ray Train + DeepSpeed on CPU ------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


def make_dataset(tmp_path, tiny: str, n: int = 24, turns: int = 3, seed: int = 0, **kw) -> str:
    out = str(tmp_path / "dataset")
    build_dataset(arithmetic_trajectories(n, turns=turns, seed=seed), ENV, tiny, DataConfig(**kw), out)
    return out


def run_config(tmp_path, tiny: str, *overrides: str) -> RunConfig:
    return load_config(
        None,
        [
            f"run_dir={tmp_path}",
            f"model.path={tiny}",
            "train.lr=3e-3",
            "train.warmup_ratio=0",
            "train.micro_batch_size=4",
            "train.epochs=3",
            *overrides,
        ],
    )


def dataset_loss(model_path: str, dataset_dir: str) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    rows = read_rows(dataset_dir)
    with torch.no_grad():
        b = batch_of(rows)
        return weighted_loss_sum(model, b["input_ids"], b["attention_mask"], b["weights"]).item() / b["units"]


def generates(model_path: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path)
    tok = AutoTokenizer.from_pretrained(model_path)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    return tok.decode(out[0, ids["input_ids"].shape[1] :])


def assert_steps(out_dir: str, total: int) -> list[dict]:
    recs = read_log(os.path.join(out_dir, "train_log.jsonl"))
    assert [r["step"] for r in recs] == list(range(1, total + 1))
    for r in recs:
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["tokens"] > 0
    return recs


@pytest.mark.slow  # a whole Ray Train + DeepSpeed run, then a second one refused
@pytest.mark.timeout(400)
def test_train_command_end_to_end(ray_cluster, tiny, tmp_path):
    """`rise train CONFIG data=PATH model.path=PATH`: trajectories -> data set -> 1 worker -> HF model."""
    from rise_ray.train import train_command

    traj_dir = tmp_path / "iter_1" / "trajectories"
    traj_dir.mkdir(parents=True)
    trajs = arithmetic_trajectories(16, turns=3, seed=4)
    pq.write_table(pa.Table.from_pylist([t.to_record() for t in trajs]), str(traj_dir / "part-0.parquet"))
    cfg = run_config(tmp_path, tiny, "train.epochs=2", "train.length_groups=2")
    out = str(tmp_path / "train")
    path = train_command(cfg, str(tmp_path / "iter_1"), out)
    assert path == os.path.join(out, "model")
    summary = read_json(os.path.join(out, "train_summary.json"))
    recs = assert_steps(out, summary["total_steps"])
    assert summary["steps"] == summary["total_steps"] == 2 * math.ceil(16 / 4)
    assert summary["tokens"] == sum(r["tokens"] for r in recs)
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    assert dataset_loss(path, os.path.join(out, "dataset")) < dataset_loss(tiny, os.path.join(out, "dataset"))
    generates(path)
    # finished runs are not redone (the model and the log are left as they were); a different run
    # in the same directory is refused
    files = [os.path.join(path, "model.safetensors"), os.path.join(out, "train_log.jsonl")]
    stamps = [os.stat(f).st_mtime_ns for f in files]
    assert train_command(cfg, os.path.join(out, "dataset"), out) == path
    assert [os.stat(f).st_mtime_ns for f in files] == stamps
    from rise_ray.train import TrainError

    with pytest.raises(TrainError, match="different train"):
        train_command(run_config(tmp_path, tiny, "train.epochs=2", "train.lr=1e-4"), os.path.join(out, "dataset"), out)


def test_impossible_resources_fail_at_the_scale_up_deadline_naming_them(ray_cluster, tiny, tmp_path):
    """Ray Train would wait forever; the stage waits cluster.scale_up_timeout_s (an autoscaler may
    be launching nodes) and fails naming the workers it could not place."""
    from rise_ray.train import TrainError, train

    ds = make_dataset(tmp_path, tiny, n=4)
    short = "cluster.scale_up_timeout_s=2"
    with pytest.raises(TrainError, match=r"1 worker\(s\) of \{'CPU': 1.0, 'GPU': 1.0\} could not be placed within 2 s"):
        train(run_config(tmp_path, tiny, "train.use_gpu=true", short), ds, tiny, str(tmp_path / "a"))
    with pytest.raises(TrainError, match=r"4 worker\(s\) of \{'CPU': 2.0\} could not be placed"):
        train(run_config(tmp_path, tiny, "train.num_workers=4", "train.cpus_per_worker=2", short), ds, tiny,
              str(tmp_path / "b"))  # fmt: skip
    with pytest.raises(TrainError, match="config.json"):
        train(run_config(tmp_path, tiny), ds, str(tmp_path), str(tmp_path / "c"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_on_two_workers_lowers_the_loss_and_saves_an_hf_model(ray_cluster, tiny, tmp_path):
    from safetensors.torch import load_file

    from rise_ray.train import train

    ds = make_dataset(tmp_path, tiny, n=32)
    cfg = run_config(
        tmp_path,
        tiny,
        "train.num_workers=2",
        "train.zero_stage=3",
        "train.micro_batch_size=2",
        "train.grad_accum=2",
        "train.save_every_steps=3",
        "train.gradient_checkpointing=true",
        # partition even the tiny model's parameters, so saving must gather them
        "train.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}}",
    )
    out = str(tmp_path / "z3")
    path = train(cfg, ds, tiny, out)
    summary = read_json(os.path.join(out, "train_summary.json"))
    assert summary["total_steps"] == 3 * math.ceil(math.ceil(16 / 2) / 2)
    assert_steps(out, summary["total_steps"])
    marker = read_json(os.path.join(path, "rise_train.json"))
    assert marker["zero_init"] is True
    sd = load_file(os.path.join(path, "model.safetensors"))
    init = load_file(os.path.join(tiny, "model.safetensors"))
    assert set(sd) == set(init)
    assert all(sd[k].shape == init[k].shape for k in sd)  # gathered, not partition shards
    assert dataset_loss(path, ds) < 0.9 * dataset_loss(tiny, ds)
    generates(path)
    ckpts = os.listdir(os.path.join(out, "ray_train", "sft"))
    assert "final" in ckpts and any(c.startswith("step-") for c in ckpts)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_workers_take_the_same_step_as_one(ray_cluster, tiny, tmp_path):
    """Data parallel + accumulation normalise like one process: 1 worker x 4 micro-batches and
    2 workers x 2 see the same rows in step 1 and must report the same loss and gradient norm."""
    from rise_ray.train import train

    ds = make_dataset(tmp_path, tiny, n=16, shuffle=False)
    first = {}
    # (workers, micro-batches per step, rows per micro-batch, forward passes per micro-batch)
    for workers, accum, micro, groups in ((1, 4, 2, 1), (2, 2, 2, 1), (1, 1, 8, 3)):
        cfg = run_config(
            tmp_path,
            tiny,
            f"train.num_workers={workers}",
            f"train.grad_accum={accum}",
            f"train.micro_batch_size={micro}",
            f"train.length_groups={groups}",
            "train.zero_stage=2",
            "train.epochs=1",
        )
        out = str(tmp_path / f"w{workers}-{groups}")
        train(cfg, ds, tiny, out)
        first[workers, groups] = read_log(os.path.join(out, "train_log.jsonl"))[0]
    one = first[1, 1]
    for other in (first[2, 1], first[1, 3]):
        assert other["units"] == one["units"] and other["tokens"] == one["tokens"]
        assert other["loss"] == pytest.approx(one["loss"], rel=1e-6)
        assert other["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("merge", [True, False])
def test_lora_lowers_the_loss_merged_or_as_adapter(ray_cluster, tiny, tmp_path, merge):
    from rise_ray.train import train

    ds = make_dataset(tmp_path, tiny, n=24)
    cfg = run_config(
        tmp_path,
        tiny,
        "train.lora.enabled=true",
        "train.lora.r=8",
        f"train.lora.merge={str(merge).lower()}",
        "iterations=0",  # an adapter alone (merge=false) is for `rise train`, not a run's sync
        "train.lr=1e-2",
        "train.epochs=4",
        *(["train.num_workers=2", "train.zero_stage=2"] if merge else []),
    )
    out = str(tmp_path / f"lora-{merge}")
    path = train(cfg, ds, tiny, out)
    files = set(os.listdir(path))
    if merge:
        assert "model.safetensors" in files and "adapter_config.json" not in files
    else:
        assert "adapter_model.safetensors" in files and "model.safetensors" not in files
        assert read_json(os.path.join(path, "adapter_config.json"))["base_model_name_or_path"] == tiny
    assert dataset_loss(path, ds) < 0.95 * dataset_loss(tiny, ds)
    generates(path)


def registered_checkpoints(out: str) -> list[int]:
    """Steps of the checkpoints the Ray Train controller has registered (it polls workers every
    ~2 s; a checkpoint reported just before a worker dies may not be registered yet)."""
    snap = os.path.join(out, "ray_train", "sft", "checkpoint_manager_snapshot.json")
    try:
        text = open(snap, encoding="utf-8").read()  # noqa: SIM115 (written atomically by Ray)
    except OSError:
        return []
    import re

    return sorted({int(m) for m in re.findall(r"step-(\d{7})", text)})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_worker_is_restarted_from_the_latest_checkpoint(ray_cluster, tiny, tmp_path):
    from rise_ray.train import train

    ds = make_dataset(tmp_path, tiny, n=64, turns=3, seed=7)
    cfg = run_config(
        tmp_path,
        tiny,
        "train.num_workers=2",
        "train.zero_stage=1",
        "train.micro_batch_size=1",
        "train.epochs=3",
        "train.save_every_steps=8",
        "train.max_failures=2",
    )
    out = str(tmp_path / "kill")
    expected = plan_steps(64, cfg.train.model_dump()).total_steps
    assert expected == 96
    killed: dict = {}

    def killer() -> None:
        log = os.path.join(out, "train_log.jsonl")
        deadline = time.time() + 300
        while time.time() < deadline:
            ckpts = registered_checkpoints(out)
            recs = read_log(log)
            if ckpts and recs and recs[-1]["step"] >= ckpts[-1] + 2:
                pid = recs[-1]["pid"]  # rank 0, the worker that logs
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, time=time.time(), at_step=recs[-1]["step"], checkpoint=ckpts[-1])
                return
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    path = train(cfg, ds, tiny, out)
    t.join(timeout=5)
    assert killed, "the run ended before the worker could be killed"
    assert killed["checkpoint"] < killed["at_step"] < expected
    summary = read_json(os.path.join(out, "train_summary.json"))
    assert summary["steps"] == summary["total_steps"] == expected
    recs = assert_steps(out, expected)  # every step once: the redone ones replaced, none missing
    # a new worker, resumed from the checkpoint (not from scratch): the steps up to it are the first attempt's
    assert all(r["time"] < killed["time"] and r["pid"] == killed["pid"] for r in recs[: killed["checkpoint"]])
    assert all(r["time"] > killed["time"] and r["pid"] != killed["pid"] for r in recs[killed["at_step"] :])
    generates(path)
