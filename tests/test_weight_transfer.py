"""GPU weight sync through vLLM's native weight transfer (rise_ray.rollout.weight_transfer).

The sync sends the checkpoint the train stage saved (CheckpointSource), so what reaches the engines
is what the trainer consolidated and exported. On CPU: the buckets, the method resolution, the
trainer's consolidation of a real 2-process gloo ZeRO-3 DeepSpeed engine (plain and LoRA) read back
through CheckpointSource (slow), the control-plane client and the pool's guards. Marked gpu
(skipped without CUDA): real vLLM engines receiving over NCCL and IPC and passing the logprob
check, the same consolidation after a bf16 step on the GPU.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import perturbed_copy

from rise_ray.config import ModelConfig, RolloutConfig, load_config
from rise_ray.rollout import weight_transfer as wt
from rise_ray.rollout.weight_transfer import iter_buckets, resolve_method
from rise_ray.session import engine_kwargs

# Tiny-model sizes (rise_ray.demo.tiny, hidden 128): attention projections 64 KiB, MLP 192 KiB.
BUCKET = 150_000  # three projections per bucket; an MLP weight is larger and travels alone


# --- buckets --------------------------------------------------------------------------------------


def test_buckets_keep_order_bound_sizes_and_isolate_big_tensors():
    sizes = [10, 30, 25, 100, 5, 5, 60, 41, 40, 1]  # float32 elements
    named = [(f"t{i}", torch.zeros(n)) for i, n in enumerate(sizes)]
    limit = 60 * 4
    buckets = list(iter_buckets(named, limit))
    flat = [name for b in buckets for name, _ in b]
    assert flat == [n for n, _ in named]  # every tensor once, in order
    for b in buckets:
        total = sum(t.numel() * 4 for _, t in b)
        assert total <= limit or len(b) == 1  # only a lone tensor may exceed the bucket
    assert [[n for n, _ in b] for b in buckets] == [
        ["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"], ["t6"], ["t7"], ["t8", "t9"],
    ]  # fmt: skip
    assert list(iter_buckets([], limit)) == []
    assert [len(b) for b in iter_buckets(named, 1)] == [1] * len(named)  # tiny bucket: one each


def test_bucket_size_counts_a_partitioned_parameter_whole():
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_numel = 1000  # what ZeRO-3 leaves on a partitioned parameter
    assert wt.tensor_bytes(p) == 4000
    assert wt.tensor_bytes(torch.zeros(3, dtype=torch.bfloat16)) == 6


# --- which method -----------------------------------------------------------------------------------


def test_auto_resolves_by_engine_and_gpus():
    cpu_vllm = RolloutConfig(engine="vllm")
    gpu_vllm = RolloutConfig(engine="vllm", num_gpus_per_engine=1)
    colocated = RolloutConfig(engine="vllm", num_gpus_per_engine=0.5, colocate_with_trainer=True)
    assert resolve_method("auto", RolloutConfig()) == "files"  # hf
    assert resolve_method("auto", RolloutConfig(engine="hf", num_gpus_per_engine=1)) == "files"
    assert resolve_method("auto", cpu_vllm) == "files"
    assert resolve_method("auto", gpu_vllm) == "nccl"
    assert resolve_method("auto", colocated) == "ipc"
    assert resolve_method("files", colocated) == "files"
    assert resolve_method("nccl", colocated) == "nccl"
    with pytest.raises(ValueError, match="needs vLLM engines on GPUs"):
        resolve_method("ipc", cpu_vllm)
    cfg = load_config(None, ["rollout.engine=vllm", "rollout.num_gpus_per_engine=1"])
    assert resolve_method(cfg.sync.method, cfg.rollout) == "nccl"  # the default config's method is auto


def test_engines_are_built_for_their_sync_method():
    model = ModelConfig(max_model_len=1024)  # no model directory here to read its own context from
    gpu = RolloutConfig(engine="vllm", num_gpus_per_engine=1)
    colocated = RolloutConfig(engine="vllm", num_gpus_per_engine=0.5, colocate_with_trainer=True)
    assert engine_kwargs(gpu, model, 0, "auto")["weight_transfer"] == "nccl"
    kw = engine_kwargs(colocated, model, 0, "auto")
    assert kw["weight_transfer"] == "ipc" and kw["sleep_mode"] is True
    assert "weight_transfer" not in engine_kwargs(gpu, model, 0, "files")
    assert "weight_transfer" not in engine_kwargs(gpu, model, 0)  # None: never synced (serving)
    assert "weight_transfer" not in engine_kwargs(RolloutConfig(engine="vllm"), model, 0, "auto")  # CPU
    assert "weight_transfer" not in engine_kwargs(RolloutConfig(), model, 0, "auto")  # hf


def test_offload_reaches_the_deepspeed_config():
    from rise_ray.train.engine import deepspeed_config

    t3 = load_config(None, ["train.zero_stage=3", "train.offload=true"]).train
    zero = deepspeed_config(t3, world=2, bf16=False)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    t2 = load_config(None, ["train.zero_stage=2", "train.offload=true"]).train
    ds2 = deepspeed_config(t2, world=1, bf16=False)
    assert "offload_param" not in ds2["zero_optimization"] and ds2["zero_force_ds_cpu_optimizer"] is False
    assert (
        "offload_optimizer" not in deepspeed_config(t2.model_copy(update={"offload": False}), 1, False)["zero_optimization"]
    )
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(load_config(None, ["train.offload=true"]).train, 1, False)


# --- sources: the trainer's export, read back as the sync reads it --------------------------------


def _lora_model(tiny_model_dir, seed=0):
    from transformers import AutoModelForCausalLM

    from rise_ray.config import LoRAConfig
    from rise_ray.train.lora import apply_lora

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoRAConfig(r=4, alpha=8))
    torch.manual_seed(seed)
    with torch.no_grad():  # B starts at zero: give the adapter something to merge
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _sent(checkpoint: str) -> dict[str, torch.Tensor]:
    """What a native sync sends from a checkpoint: CheckpointSource's tensors, checked against its
    metadata (the shapes and dtypes vLLM's trainer engine announces to the workers)."""
    src = wt.CheckpointSource(checkpoint, device="cpu")
    pairs = list(src)
    assert [(m.name, m.dtype, tuple(m.shape)) for m in src.metadata()] == [
        (n, t.dtype, tuple(t.shape)) for n, t in pairs
    ]
    return dict(pairs)


def _assert_same(sent: dict, want: dict, **tol) -> None:
    """`sent` holds every tensor of `want` (a tied lm_head may be left out: it is the embedding)."""
    assert set(sent) == set(want) - ({"lm_head.weight"} if "lm_head.weight" not in sent else set())
    for name, t in sent.items():
        torch.testing.assert_close(t.float(), want[name].float(), **(tol or {"atol": 0, "rtol": 0}))


def test_checkpoint_source_metadata_matches_its_tensors(tiny_model_dir):
    pytest.importorskip("vllm")
    from rise_ray.rollout.sync import load_state_dict

    sent = _sent(tiny_model_dir)
    want = load_state_dict(tiny_model_dir)
    assert set(sent) == set(want) and all(torch.equal(t, want[n]) for n, t in sent.items())
    src = wt.CheckpointSource(tiny_model_dir, device="cpu")
    assert [n for n, _ in src] == [n for n, _ in src] == sorted(sent)  # re-iterable: one pass per sync


@pytest.mark.parametrize("merge", [True, False])
def test_a_lora_model_is_exported_merged_or_as_its_adapter(tiny_model_dir, tmp_path, merge):
    """The trainer's export of a LoRA model (rise_ray.train.checkpoint.export_hf, from the training
    module's state dict) read back by the sync's source: the merged weights, or the adapter's tensors."""
    pytest.importorskip("vllm")
    from peft import get_peft_model_state_dict

    from rise_ray.train.checkpoint import export_hf

    model = _lora_model(tiny_model_dir)
    tcfg = load_config(None, ["train.lora.enabled=true", "train.lora.r=4", "train.lora.alpha=8",
                              f"train.lora.merge={merge}", "iterations=0"]).train  # fmt: skip
    out = str(tmp_path / "model")
    export_hf({k: v.detach().clone() for k, v in model.state_dict().items()}, tiny_model_dir, tcfg, out, torch.float32)
    sent = _sent(out)
    if merge:
        want = {k: v.detach() for k, v in model.merge_and_unload().named_parameters()}
        _assert_same(sent, want, atol=1e-6, rtol=1e-5)
        base = dict(_lora_model(tiny_model_dir).base_model.model.named_parameters())
        name = "model.layers.0.self_attn.q_proj"
        assert not torch.allclose(sent[f"{name}.weight"], base[f"{name}.base_layer.weight"])  # merged, not the base
    else:  # peft's adapter file: its tensors under peft's names
        def plain(d):
            return {k.removeprefix("base_model.model."): v for k, v in d.items()}

        _assert_same(plain(sent), plain(get_peft_model_state_dict(model)))
        assert sent and all("lora_" in k for k in sent)


# --- a real ZeRO-3 engine: 2 processes, gloo ------------------------------------------------------


def _zero3_worker(rank, world, model_dir, out_dir, lora, use_gpu):
    """One rank: a ZeRO-3 DeepSpeed engine built by the train loop's own helpers, one training step,
    then the loop's consolidation (gather_state_dict) and export (export_hf) next to DeepSpeed's own
    consolidation (the reference)."""
    # The ranks meet through a file (nothing listens on a port); DeepSpeed's shared-memory allreduce
    # names its segment after MASTER_ADDR / MASTER_PORT, so they only need to be unique here.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(os.getppid()), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cuda" if use_gpu else "cpu")  # fmt: skip
    import deepspeed
    import torch.distributed as dist

    from rise_ray.train import engine as ds_setup
    from rise_ray.train import loop
    from rise_ray.train.checkpoint import export_hf, gather_state_dict
    from rise_ray.train.progress import StepPlan

    torch.set_num_threads(1)
    if use_gpu:
        torch.cuda.set_device(rank)
    rendezvous = f"file://{os.path.join(out_dir, 'rendezvous')}"
    dist.init_process_group("nccl" if use_gpu else "gloo", init_method=rendezvous, rank=rank, world_size=world)
    overrides = [
        "train.zero_stage=3", f"train.num_workers={world}", f"train.use_gpu={use_gpu}", "train.lr=0.05",
        "train.warmup_ratio=0", "train.lr_schedule=constant", "train.micro_batch_size=2",
        # Partition every parameter, however small (the default keeps small ones whole on every rank).
        "train.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}}",
    ]  # fmt: skip
    if lora:
        overrides += ["train.lora.enabled=true", "train.lora.r=4", "train.lora.alpha=8"]
    tcfg = load_config(None, overrides).train
    ds_setup.join_deepspeed(dist, world)
    bf16 = ds_setup.resolve_bf16(tcfg)
    ds = ds_setup.deepspeed_config(tcfg, world, bf16)
    model, _, _ = ds_setup.load_model(model_dir, tcfg, ds, bf16)
    engine = ds_setup.make_engine(model, tcfg, ds, StepPlan(2, 1, 1, 1, 0))
    g = torch.Generator().manual_seed(rank)
    rows = torch.randint(7, 60, (2, 16), generator=g).tolist()
    batch = {"input_ids": rows, "weights": [[0.0] + [1.0] * 15] * 2, "units": [1, 1]}
    loss = loop.train_step(engine, [loop.collate(batch, 0, engine.device)], world, dist)["loss"]

    real = deepspeed.zero.GatheredParameters
    gathers: list[int] = []

    class Spy(real):  # records how many parameters each gather makes whole
        def __init__(self, params, **kw):
            gathers.append(len(params))
            super().__init__(params, **kw)

    deepspeed.zero.GatheredParameters = Spy
    try:
        sd = gather_state_dict(engine, rank)
    finally:
        deepspeed.zero.GatheredParameters = real
    reference = engine._zero3_consolidated_16bit_state_dict()  # DeepSpeed's own (every rank takes part)
    if rank == 0:
        export_hf(sd, model_dir, tcfg, os.path.join(out_dir, "model"), next(iter(sd.values())).dtype)
        torch.save({"gathers": gathers, "params": sum(1 for _ in engine.module.parameters()), "loss": loss,
                    "reference": {k: v.float().cpu() for k, v in reference.items()}},
                   os.path.join(out_dir, "rank0.pt"))  # fmt: skip
    dist.destroy_process_group()


def _run_zero3(tiny_model_dir, tmp_path, lora, world=2, use_gpu=False) -> tuple[dict, dict]:
    """(what rank 0 recorded, what the sync sends from the exported checkpoint)."""
    import torch.multiprocessing as mp

    mp.start_processes(_zero3_worker, args=(world, tiny_model_dir, str(tmp_path), lora, use_gpu), nprocs=world,
                       start_method="spawn")  # fmt: skip
    return torch.load(tmp_path / "rank0.pt", weights_only=False), _sent(str(tmp_path / "model"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_consolidation_is_what_the_sync_sends(tiny_model_dir, tmp_path):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    r0, sent = _run_zero3(tiny_model_dir, tmp_path, lora=False)
    assert r0["gathers"] == [1] * r0["params"]  # one parameter whole at a time
    _assert_same(sent, r0["reference"])  # the trained weights, as DeepSpeed consolidates them
    before = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    assert not torch.equal(sent["model.norm.weight"], before["model.norm.weight"])  # the step trained it


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_lora_is_sent_as_the_merged_model(tiny_model_dir, tmp_path):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    from rise_ray.config import LoRAConfig
    from rise_ray.train.lora import apply_lora

    r0, sent = _run_zero3(tiny_model_dir, tmp_path, lora=True)
    ref = r0["reference"]
    assert any(v.abs().sum() > 0 for k, v in ref.items() if "lora_B" in k)  # trained: a real merge
    peft_model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoRAConfig(r=4, alpha=8))
    missing, unexpected = peft_model.load_state_dict(ref, strict=False)
    assert not unexpected and not [k for k in missing if "lora" in k]
    merged = {k: v.detach() for k, v in peft_model.merge_and_unload().named_parameters()}
    _assert_same(sent, merged, atol=1e-6, rtol=1e-5)


# --- the control plane and the pool's guards ---------------------------------------------------------


def test_engine_calls_reach_vllms_worker_rpcs_in_its_request_format():
    """VLLMEngine's native-transfer methods through vLLM's own LLM mixin (RLOfflineMixin), with the
    engine core replaced by a recorder: the payloads are what vLLM's workers are called with."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.rl.offline import RLOfflineMixin

    from rise_ray.rollout.vllm import VLLMEngine

    calls = []

    class Core:
        def collective_rpc(self, method, args=(), kwargs=None):
            calls.append((method, kwargs))

    class FakeLLM(RLOfflineMixin):
        llm_engine = Core()

        def reset_prefix_cache(self):
            calls.append(("reset_prefix_cache", None))
            return True

        def sleep(self, level):
            calls.append(("sleep", level))

        def wake_up(self, tags=None):
            calls.append(("wake_up", tags))
            return tags is None

    eng = VLLMEngine.__new__(VLLMEngine)  # no real engine: only the wiring is under test
    eng.llm, eng.weight_transfer, eng.sleep_mode, eng.asleep = FakeLLM(), "nccl", True, False
    eng.init_weight_transfer({"rank_offset": 1})
    eng.start_weight_update()
    eng.receive_weights({"names": ["w"]})
    eng.finish_weight_update()
    eng.shutdown_weight_transfer()
    eng.sleep(2)
    eng.sleep(2)  # already asleep: once
    eng.wake_up(["weights"])
    eng.wake_up()
    eng.wake_up()  # awake: nothing to do
    assert calls == [
        ("init_weight_transfer_engine", {"init_info": {"rank_offset": 1}}),
        ("start_weight_update", None),
        ("update_weights", {"update_info": {"names": ["w"]}}),
        ("finish_weight_update", None),
        ("reset_prefix_cache", None),  # KV cached under the old weights is dropped
        ("shutdown_weight_transfer_engine", None),
        ("sleep", 2),
        ("wake_up", ["weights"]),
        ("wake_up", None),
    ]
    eng.weight_transfer = None
    with pytest.raises(RuntimeError, match="without weight_transfer"):
        eng.init_weight_transfer({})


def test_vllms_nccl_trainer_engine_hands_our_client_the_group_to_split(monkeypatch):
    """vLLM's own NCCL trainer engine (its CUDA endpoint stubbed) drives our client's init: the
    payload has the workers from rank_offset 1, which EnginesClient then shifts per engine."""
    pytest.importorskip("vllm")
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory, nccl_engine
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    monkeypatch.setattr(nccl_engine, "open_trainer_endpoint", lambda info: "group")
    seen = []

    class Client:
        def init_weight_transfer_engine(self, init_info):
            seen.append(init_info)

    info = NCCLTrainerInitInfo(
        master_address="127.0.0.1",
        master_port=29555,
        world_size=5,
        rank=0,
        packed=True,
        packed_buffer_size_bytes=BUCKET,
    )
    engine = WeightTransferTrainerFactory.trainer_init(
        info, client=Client(), source=wt.CheckpointSource.__new__(wt.CheckpointSource)
    )
    assert engine.model_update_group == "group"
    (payload,) = seen
    assert payload["rank_offset"] == 1 and payload["world_size"] == 5
    assert payload["packed"] is True and payload["packed_buffer_size_bytes"] == BUCKET


@pytest.mark.timeout(300)
def test_client_gives_each_engine_its_ranks_and_the_version(ray_local):
    @ray_local.remote(num_cpus=0)
    class Recorder:
        def __init__(self):
            self.calls = []

        def init_weight_transfer(self, info):
            self.calls.append(("init", info))

        def start_weight_update(self):
            self.calls.append(("start",))

        def receive_weights(self, info):
            self.calls.append(("update", info))

        def finish_weight_update(self, version):
            self.calls.append(("finish", version))

        def shutdown_weight_transfer(self):
            self.calls.append(("shutdown",))

        def log(self):
            return self.calls

    actors = [Recorder.remote() for _ in range(3)]
    client = wt.EnginesClient(actors, tp=2, version="iter_1")
    client.init_weight_transfer_engine(
        {"master_address": "h", "master_port": 1, "rank_offset": 1, "world_size": 7}
    )
    client.start_weight_update()
    client.update_weights({"names": ["a"]})
    client.finish_weight_update()
    client.shutdown_weight_transfer_engine()
    logs = ray_local.get([a.log.remote() for a in actors])
    assert [log[0][1]["rank_offset"] for log in logs] == [1, 3, 5]  # 3 engines x tp 2 after the sender
    for log in logs:
        assert [c[0] for c in log] == ["init", "start", "update", "finish", "shutdown"]
        assert log[3] == ("finish", "iter_1") and log[2] == ("update", {"names": ["a"]})
    wt.EnginesClient(actors[:1]).init_weight_transfer_engine({"packed": True})  # IPC: no ranks to shift
    assert ray_local.get(actors[0].log.remote())[-1] == ("init", {"packed": True})


@pytest.mark.timeout(300)
def test_hf_pool_sleeps_as_a_no_op_and_refuses_a_native_sync(ray_local, tiny_model_dir, tmp_path):
    from rise_ray.rollout.pool import RolloutPool

    pool = RolloutPool(
        "hf", tiny_model_dir, num_engines=1, num_cpus=0.5, pointer_path=str(tmp_path / "w.json")
    )
    pool.sleep(1)
    pool.wake_up(["weights"])
    pool.wake_up()
    with pytest.raises(RuntimeError, match="built for None"):
        pool.sync_native(tiny_model_dir, "v1", "nccl", bucket_bytes=BUCKET)
    assert not os.path.exists(tmp_path / "w.json")  # a refused sync names no checkpoint
    pool.shutdown()


# --- GPU: real engines, real NCCL / IPC (skipped here) ----------------------------------------------

GPU_TOLERANCE = 0.25  # vLLM in bf16 on GPU against the check's fp32 reference (the bf16 default)


@pytest.fixture(scope="module")
def far_ckpt(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model moved far enough that the logprob check cannot mistake it for the original."""
    return perturbed_copy(tiny_model_dir, str(tmp_path_factory.mktemp("far") / "model"), 0.5, seed=2)


def _gpu_pool(tiny_model_dir, tmp_path, rollout: RolloutConfig):
    from rise_ray.session import make_pool

    model = ModelConfig(max_model_len=512, dtype="bfloat16")
    return make_pool(rollout, model, tiny_model_dir, 0, str(tmp_path / "weights.json"), sync_method="auto")


def _check(pool, checkpoint) -> float:
    from rise_ray.rollout.sync import check_engines

    return check_engines(pool, checkpoint, GPU_TOLERANCE)["max_logprob_error"]


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_nccl_sync_into_live_vllm_engines(ray_local, tiny_model_dir, far_ckpt, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("nccl: the engine and the sender need a GPU each")
    rollout = RolloutConfig(
        engine="vllm", num_gpus_per_engine=1, num_cpus_per_engine=0.5, gpu_memory_utilization=0.3
    )
    pool = _gpu_pool(tiny_model_dir, tmp_path, rollout)
    assert pool.engine_kwargs["weight_transfer"] == "nccl"
    assert _check(pool, tiny_model_dir) < GPU_TOLERANCE
    with pytest.raises(RuntimeError, match="weight sync check failed"):
        _check(pool, far_ckpt)  # the check tells the two apart
    assert pool.sync_native(far_ckpt, "v1", "nccl", bucket_bytes=BUCKET) > 0  # many buckets
    assert _check(pool, far_ckpt) < GPU_TOLERANCE
    pool.sync_native(tiny_model_dir, "v2", "nccl", bucket_bytes=2**30)  # a second, new group; one bucket
    assert _check(pool, tiny_model_dir) < GPU_TOLERANCE
    assert {i["weights_version"] for i in ray_local.get([a.info.remote() for a in pool.actors])} == {"v2"}
    pool.shutdown()


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_ipc_sync_into_a_sleeping_colocated_engine(ray_local, tiny_model_dir, far_ckpt, tmp_path):
    rollout = RolloutConfig(
        engine="vllm", num_gpus_per_engine=0.6, num_cpus_per_engine=0.5, gpu_memory_utilization=0.3,
        colocate_with_trainer=True,
    )  # fmt: skip
    pool = _gpu_pool(tiny_model_dir, tmp_path, rollout)
    assert pool.engine_kwargs["weight_transfer"] == "ipc" and pool.engine_kwargs["sleep_mode"]
    assert _check(pool, tiny_model_dir) < GPU_TOLERANCE
    pool.sleep(2)  # as during training: weights and KV cache dropped
    pool.wake_up(["weights"])
    assert pool.sync_native(far_ckpt, "v1", "ipc", bucket_bytes=BUCKET) > 0
    pool.wake_up()
    assert _check(pool, far_ckpt) < GPU_TOLERANCE
    pool.shutdown()


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_zero3_bf16_step_on_one_gpu_is_consolidated_and_sent(tiny_model_dir, tmp_path):
    """World size 1 on the GPU (NCCL): a bf16 step, then the consolidation the sync sends."""
    r0, sent = _run_zero3(tiny_model_dir, tmp_path, lora=False, world=1, use_gpu=True)
    assert math.isfinite(r0["loss"]) and r0["loss"] > 0
    assert all(t.dtype == torch.bfloat16 for t in sent.values())  # bf16 training (auto on GPU), saved as such
    _assert_same(sent, r0["reference"])
