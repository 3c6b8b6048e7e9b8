"""The per-worker loop of reward-weighted SFT: what Ray Train runs on every training worker.

`train_loop_per_worker(config)` reads top to bottom like a recipe:
  1. environment: DeepSpeed's accelerator (DS_ACCELERATOR=cpu without GPUs) before it is imported,
     torch threads = the worker's CPUs, DeepSpeed on Ray Train's process group (gloo / nccl);
  2. start point and data: the latest Ray Train checkpoint's step (`ray.train.get_checkpoint()`)
     and this worker's Ray Dataset shard (`ray.train.get_dataset_shard("train")`), whose stream
     starts now so its first batch arrives while the model loads;
  3. model: the HF checkpoint (bf16 on GPU, fp32 on CPU), gradient checkpointing, LoRA (peft);
  4. engine: DeepSpeed with ZeRO stage 0-3, AdamW, warm-up + cosine schedule, gradient clipping,
     then the checkpoint's DeepSpeed state loaded into it (weights_only unpickling);
  5. train: every optimizer step takes `grad_accum` micro-batches per worker; the loss is
     sum(token weight x token CE) / (prefix examples in the step, over all workers);
  6. checkpoint: every `save_every_steps`, every rank's DeepSpeed shards -> one Ray Train checkpoint;
  7. final: parameters gathered (ZeRO-3), LoRA merged or kept as an adapter, saved in HF format
     (safetensors) as the last Ray Train checkpoint.

Loss normalisation (the paper's code: each example's mean token CE times its weight, averaged
over the examples of a batch). The data set stores `weight / n` on each of a turn's n trained
tokens and `units` = prefix examples per row (rise_ray.data.builder), so
    step loss = sum over the step's rows (all workers) of sum_t w_t CE_t  /  sum of their units.
For `prefix` rows this is exactly the paper's per-batch loss; over the whole data set in one
batch the `packed` layout gives the same value and gradients. Each micro-batch's backward gets
loss_sum x world / units_step because DeepSpeed averages gradients over the data-parallel ranks;
DeepSpeed's own division by gradient_accumulation_steps is turned off (scale_wrt_gas=False) so
a short last step of an epoch is normalised by what it really holds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

LOG_FILE = "train_log.jsonl"
STATE_FILE = "trainer_state.json"
MODEL_DIR = "model"
MARKER_FILE = "rise_train.json"  # written last into a finished model directory
DS_TAG = "state"


# --- plan -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    rows_per_worker: int
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan_steps(rows: int, tcfg: dict[str, Any]) -> StepPlan:
    """Steps a run takes. Ray Train gives each worker rows // num_workers rows (equal shards)."""
    per_worker = rows // tcfg["num_workers"]
    if per_worker < 1:
        raise ValueError(f"train.num_workers={tcfg['num_workers']} is more than the {rows} row(s) of the data set")
    mbs = math.ceil(per_worker / tcfg["micro_batch_size"])
    spe = math.ceil(mbs / tcfg["grad_accum"])
    total = spe * tcfg["epochs"]
    warmup = math.ceil(tcfg["warmup_ratio"] * total) if tcfg["warmup_ratio"] > 0 else 0
    return StepPlan(per_worker, mbs, spe, total, min(warmup, total))


def micro_batches_in_step(plan: StepPlan, step_in_epoch: int, grad_accum: int) -> int:
    return min(grad_accum, plan.micro_batches_per_epoch - step_in_epoch * grad_accum)


def lr_multiplier(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up over `warmup` steps (never 0), then cosine to 0 (or constant)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --- the loss -------------------------------------------------------------------------------------


def weighted_loss_sum(model: Any, input_ids: Any, attention_mask: Any, weights: Any) -> Any:
    """sum over tokens of weight x CE(prediction of the token); weights[:, t] weights input_ids[:, t]
    (position 0 is never predicted).

    The output projection runs only at weighted positions: in RISE data most tokens are the
    question, feedback and earlier turns, and a vocabulary-wide projection (plus its softmax and
    gradient) there is wasted work and memory. A forward pre-hook on the output embedding picks
    those rows inside the model's own forward, so DeepSpeed's forward/backward bookkeeping, ZeRO-3's
    parameter gathering, LoRA and whatever the model applies after the projection (soft-capping,
    logit scales) all run as usual; only their input is smaller."""
    import torch
    import torch.nn.functional as F

    w = weights[:, 1:]
    sel = w != 0

    def weighted_rows(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][:, :-1][sel], *args[1:])

    head = getattr(model, "module", model).get_output_embeddings()  # DeepSpeedEngine -> its model
    hook = head.register_forward_pre_hook(weighted_rows)
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        hook.remove()
    n = int(sel.sum())
    if logits.shape[0] != n or logits.dim() != 2:
        raise RuntimeError(f"output projection gave logits of shape {tuple(logits.shape)}, expected ({n}, vocab)")
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    ce = F.cross_entropy(logits, input_ids[:, 1:][sel], reduction="none")
    return (ce * w[sel].to(ce.dtype)).sum()


def collate(batch: Any, pad_id: int, device: Any) -> dict[str, Any]:
    """Ragged rows (a pyarrow Table, or a dict of sequences) -> right-padded tensors (+ units and
    token counts)."""
    import numpy as np
    import torch

    if hasattr(batch, "column"):  # pyarrow: the rows' values are sliced out of flat buffers
        rows, wts = _arrow_rows(batch.column("input_ids")), _arrow_rows(batch.column("weights"))
        units = int(np.sum(batch.column("units").to_numpy()))
    else:
        rows = [np.asarray(x) for x in batch["input_ids"]]
        wts = [np.asarray(x) for x in batch["weights"]]
        units = int(np.sum(batch["units"]))
    n, length = len(rows), max(len(r) for r in rows)
    ids = np.full((n, length), pad_id, dtype=np.int64)
    mask = np.zeros((n, length), dtype=np.int64)
    weights = np.zeros((n, length), dtype=np.float32)
    for i, (r, w) in enumerate(zip(rows, wts, strict=True)):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
        weights[i, : len(w)] = w
    return {
        "input_ids": torch.from_numpy(ids).to(device),
        "attention_mask": torch.from_numpy(mask).to(device),
        "weights": torch.from_numpy(weights).to(device),
        "units": units,
        "tokens": int(mask.sum()),
        "padded_tokens": int(mask.size),
        "trained_tokens": int((weights > 0).sum()),
    }


def split_by_length(batch: Any, groups: int) -> list[Any]:
    """A pyarrow micro-batch -> up to `groups` runs of its rows sorted by length. Each run is
    padded to its own longest row; the step's loss (a sum over rows over the step's units) and so
    its gradient do not change. Every rank gets the same number of runs (shards are equal)."""
    import numpy as np
    import pyarrow.compute as pc

    n = batch.num_rows
    groups = min(groups, n)
    if groups <= 1:
        return [batch]
    order = np.argsort(pc.list_value_length(batch.column("input_ids")).to_numpy(), kind="stable")
    batch = batch.take(order)
    cuts = [i * n // groups for i in range(groups + 1)]
    return [batch.slice(a, b - a) for a, b in zip(cuts, cuts[1:], strict=False)]


def _arrow_rows(column: Any) -> list[Any]:
    """A list<...> column -> one numpy array per row (views into the flat values, no Python per value)."""
    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    values = arr.flatten().to_numpy()
    offsets = arr.offsets.to_numpy()
    offsets = offsets - offsets[0]
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(arr))]


# --- the recipe -----------------------------------------------------------------------------------


@dataclass
class TrainerState:
    step: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    train_time_s: float = 0.0
    final: bool = False
    last_loss: float | None = None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    tcfg: dict[str, Any] = config["train"]
    plan = StepPlan(**config["plan"])

    # 1. environment --------------------------------------------------------------------------
    setup_environment(tcfg["use_gpu"])
    import ray.train
    import torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    record_worker(config.get("pid_dir"), rank)
    torch.manual_seed(tcfg["seed"])
    if not tcfg["use_gpu"]:  # the worker's reserved CPUs unless told (oversubscribed threads crawl)
        torch.set_num_threads(tcfg["cpu_threads"] or max(1, int(tcfg["cpus_per_worker"])))
    bf16 = resolve_bf16(tcfg)
    join_deepspeed(dist, world)

    # 2. where to start, and the data: Ray Data starts streaming while the model loads ---------
    checkpoint = ray.train.get_checkpoint()
    state = read_state(checkpoint)
    record_worker(config.get("pid_dir"), rank, resumed_from=state.step)
    if state.final:  # died after the final report: nothing left to do
        return
    shard = ray.train.get_dataset_shard("train")
    batches = epoch_batches(shard, tcfg, state.step // plan.steps_per_epoch)
    pad_id = int(config["pad_id"])

    # 3. model --------------------------------------------------------------------------------
    ds_config = deepspeed_config(tcfg, world, bf16)
    model, tokenizer, zero_init = load_model(config["model_path"], tcfg, ds_config, bf16)

    # 4. engine, resumed from the checkpoint --------------------------------------------------
    engine = make_engine(model, tcfg, ds_config, plan)
    device = engine.device
    resume(engine, checkpoint, state, config.get("log_path"), rank)
    if rank == 0 and state.step:
        print(f"[rise train] resumed at step {state.step}/{plan.total_steps}", file=sys.stderr, flush=True)

    # 5. train --------------------------------------------------------------------------------
    save_every = tcfg["save_every_steps"]
    while state.step < plan.total_steps:
        epoch, step_in_epoch = divmod(state.step, plan.steps_per_epoch)
        for _ in range(step_in_epoch * tcfg["grad_accum"]):  # resuming mid-epoch: skip what was trained
            next_batch(batches, rank, epoch)
        for s in range(step_in_epoch, plan.steps_per_epoch):
            t0 = time.perf_counter()
            n_mb = micro_batches_in_step(plan, s, tcfg["grad_accum"])
            micro = [
                collate(rows, pad_id, device)
                for _ in range(n_mb)
                for rows in split_by_length(next_batch(batches, rank, epoch), tcfg["length_groups"])
            ]
            if s == plan.steps_per_epoch - 1 and epoch + 1 < tcfg["epochs"]:
                batches = epoch_batches(shard, tcfg, epoch + 1)  # starts while this last step runs
            t_data = time.perf_counter() - t0
            lr = float(engine.get_lr()[0])
            log_now = rank == 0 and (state.step + 1) % tcfg["log_every_steps"] == 0
            rec = train_step(engine, micro, world, dist, grad_norm=log_now or state.step + 1 == plan.total_steps)
            dt = time.perf_counter() - t0
            state.step += 1
            state.tokens += rec["tokens"]
            state.padded_tokens += rec["padded_tokens"]
            state.train_time_s += dt
            state.last_loss = rec["loss"]
            rec.update(
                step=state.step,
                epoch=epoch + 1,
                lr=lr,
                step_time_s=round(dt, 4),
                data_time_s=round(t_data, 4),
                tokens_per_s=rec["tokens"] / dt if dt > 0 else None,
                train_time_s=round(state.train_time_s, 3),
            )
            if log_now or (rank == 0 and state.step == plan.total_steps):
                log_step(config.get("log_path"), rec, plan)
            # 6. checkpoint: every rank's DeepSpeed shards -> one Ray Train checkpoint
            if save_every and state.step % save_every == 0 and state.step < plan.total_steps:
                save_checkpoint(engine, state, rank)

    # 7. final model: gathered, merged (LoRA), HF format -> the last Ray Train checkpoint --------
    save_final(engine, state, rank, config["model_path"], tcfg, tokenizer, zero_init)


# --- steps of the recipe --------------------------------------------------------------------------


def setup_environment(use_gpu: bool) -> None:
    """DeepSpeed picks its accelerator at import: set it first. Native ops build into a cache
    that outlives the run (the CPU comm op takes ~1 min to compile the first time)."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/rise-ray/torch_extensions"))


def join_deepspeed(dist: Any, world: int) -> None:
    """DeepSpeed's comm layer on the process group Ray Train set up (gloo on CPU, nccl on GPU).
    A single CPU worker goes without DeepSpeed's shared-memory allreduce op: it has nothing to
    reduce, and the op compiles for ~1 min in every new Python environment (measured: 61 s of a
    fresh clone's first `rise run`)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if world == 1 and get_accelerator().device_name() == "cpu":
        shm = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if shm is not None:
            deepspeed.ops.__compatible_ops__[shm.NAME] = False  # read by deepspeed.comm.torch.build_shm_op
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


def resolve_bf16(tcfg: dict[str, Any]) -> bool:
    return bool(tcfg["use_gpu"]) if tcfg["bf16"] == "auto" else bool(tcfg["bf16"])


def deepspeed_config(tcfg: dict[str, Any], world: int, bf16: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tcfg["micro_batch_size"],
        "gradient_accumulation_steps": tcfg["grad_accum"],
        "train_batch_size": tcfg["micro_batch_size"] * tcfg["grad_accum"] * world,
        "gradient_clipping": tcfg["max_grad_norm"],
        "zero_optimization": {"stage": tcfg["zero_stage"]},
        "zero_allow_untested_optimizer": True,  # the client AdamW (torch) under ZeRO
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if tcfg.get("offload"):
        if tcfg["zero_stage"] == 0:
            raise ValueError("train.offload needs train.zero_stage 1, 2 or 3 (ZeRO owns what it offloads)")
        cpu = {"device": "cpu", "pin_memory": bool(tcfg["use_gpu"])}  # pinned: faster copies to a GPU
        cfg["zero_optimization"]["offload_optimizer"] = dict(cpu)
        if tcfg["zero_stage"] == 3:
            cfg["zero_optimization"]["offload_param"] = dict(cpu)
        # Our optimizer is torch's AdamW (no DeepSpeedCPUAdam build needed); DeepSpeed refuses a
        # non-DeepSpeed optimizer with offload unless told.
        cfg["zero_force_ds_cpu_optimizer"] = False
    return _merge(cfg, tcfg.get("deepspeed") or {})


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_model(model_path: str, tcfg: dict[str, Any], ds_config: dict[str, Any], bf16: bool) -> tuple[Any, Any, bool]:
    """(model, tokenizer, zero_init). ZeRO-3 without LoRA loads straight into partitions."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zero_init = tcfg["zero_stage"] == 3 and not tcfg["lora"]["enabled"]
    keep = None
    if zero_init:  # while this object lives, from_pretrained builds partitioned parameters
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if bf16 else torch.float32)
    del keep
    model.config.use_cache = False
    if tcfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tcfg["lora"]["enabled"]:
        from rise_ray.config import LoRAConfig
        from rise_ray.train.lora import apply_lora

        model = apply_lora(model, LoRAConfig(**tcfg["lora"]))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return model, tokenizer, zero_init


def make_engine(model: Any, tcfg: dict[str, Any], ds_config: dict[str, Any], plan: StepPlan) -> Any:
    import deepspeed
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    try:  # the fused kernel (CPU and GPU), as transformers' Trainer uses by default
        optimizer = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"], fused=True)
    except (RuntimeError, TypeError, ValueError):
        optimizer = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    schedule = tcfg["lr_schedule"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, plan.total_steps, plan.warmup_steps, schedule)
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    use_weights_only_loading(engine)
    return engine


def use_weights_only_loading(engine: Any) -> None:
    """Resume with torch.load(weights_only=True): DeepSpeed's default engine unpickles anything.
    Only the few DeepSpeed classes its checkpoints hold are allowed besides tensors."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)


def read_state(checkpoint: Any) -> TrainerState:
    """The step (and totals) a checkpoint was saved at; a fresh state without one."""
    if checkpoint is None:
        return TrainerState()
    with checkpoint.as_directory() as d, open(os.path.join(d, STATE_FILE), encoding="utf-8") as f:
        return TrainerState(**json.load(f))


def resume(engine: Any, checkpoint: Any, state: TrainerState, log_path: str | None, rank: int) -> None:
    """Load the checkpoint's DeepSpeed state (all ranks) and trim the log to its step (rank 0)."""
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            load_path, _ = engine.load_checkpoint(d, tag=DS_TAG)
            if load_path is None:
                raise RuntimeError(f"checkpoint {d}: DeepSpeed found no state under tag {DS_TAG!r}")
    if rank == 0 and log_path:
        trim_log(log_path, state.step)


def epoch_batches(shard: Any, tcfg: dict[str, Any], epoch: int) -> Iterator[dict[str, Any]]:
    """This worker's micro-batches for `epoch`, the first one fetched in the background from now
    (an epoch's stream takes a second or more to start). The order is deterministic (the trainer
    asks Ray Data to preserve order), so a resumed run skips exactly the batches already trained."""
    batches = shard.iter_batches(
        batch_size=tcfg["micro_batch_size"],
        batch_format="pyarrow",
        prefetch_batches=prefetch_batches(tcfg),
        local_shuffle_buffer_size=4 * tcfg["micro_batch_size"] if epoch > 0 else None,
        local_shuffle_seed=tcfg["seed"] + epoch if epoch > 0 else None,
    )
    return Prefetched(iter(batches))


def prefetch_batches(tcfg: dict[str, Any]) -> int:
    """auto: 1 with GPUs (batches are made while kernels run); 0 on CPU, where a prefetching
    thread competes with the training thread for the worker's cores and the GIL (measured: ~5%
    fewer tokens/s with 1 on a 1-CPU worker)."""
    value = tcfg.get("prefetch_batches", "auto")
    return (1 if tcfg["use_gpu"] else 0) if value == "auto" else int(value)


class Prefetched:
    """An iterator whose first item is fetched in a background thread from creation on."""

    def __init__(self, it: Iterator[Any]) -> None:
        self._it = it
        self._first: list[Any] = []
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = threading.Thread(target=self._fetch, daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first.append(next(self._it))
        except StopIteration:
            pass
        except BaseException as e:  # re-raised in the training thread
            self._error = e

    def __iter__(self) -> Prefetched:
        return self

    def __next__(self) -> Any:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._error is not None:
                raise self._error
            if not self._first:
                raise StopIteration
            return self._first.pop()
        return next(self._it)


def next_batch(batches: Any, rank: int, epoch: int) -> dict[str, Any]:
    try:
        return next(batches)
    except StopIteration:
        raise RuntimeError(
            f"rank {rank}: the data shard ran out of rows in epoch {epoch + 1} before the planned steps "
            "(shards must be equal: the trainer splits with equal=True)"
        ) from None


def train_step(
    engine: Any, micro: list[dict[str, Any]], world: int, dist: Any, grad_norm: bool = True
) -> dict[str, Any]:
    """One optimizer step over this worker's micro-batches; returns the step's global metrics
    (the gradient norm only when asked: without ZeRO it costs a pass over the gradients)."""
    import torch

    local = torch.tensor(
        [
            sum(m["units"] for m in micro),
            sum(m["tokens"] for m in micro),
            sum(m["trained_tokens"] for m in micro),
            sum(m["padded_tokens"] for m in micro),
        ],
        dtype=torch.float64,
        device=engine.device,
    )
    if world > 1:
        dist.all_reduce(local)
    units, tokens, trained, padded = (float(x) for x in local.tolist())
    scale = world / units  # DeepSpeed averages gradients over ranks: undo, then divide by units
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    norm = None
    for k, mb in enumerate(micro):
        engine.set_gradient_accumulation_boundary(k == len(micro) - 1)
        loss = weighted_loss_sum(engine, mb["input_ids"], mb["attention_mask"], mb["weights"])
        engine.backward(loss * scale, scale_wrt_gas=False)
        if grad_norm and k == len(micro) - 1 and engine.zero_optimization_stage() == 0:
            norm = _grad_norm(engine.module)  # reduced over ranks by now; ZeRO reports its own
        engine.step()
        loss_sum += loss.detach().double()
    if world > 1:
        dist.all_reduce(loss_sum)
    if grad_norm and engine.zero_optimization_stage() > 0:
        norm = engine.get_global_grad_norm()
    return {
        "loss": float(loss_sum) / units,
        "units": int(units),
        "tokens": int(tokens),
        "trained_tokens": int(trained),
        "padded_tokens": int(padded),
        "grad_norm": float(norm) if norm is not None else None,
    }


def _grad_norm(module: Any) -> float:
    import torch

    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def save_checkpoint(engine: Any, state: TrainerState, rank: int) -> None:
    """Every rank writes its DeepSpeed shards; Ray Train merges them into one checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="rise-ckpt-") as d:
        engine.save_checkpoint(d, tag=DS_TAG)
        if rank == 0:
            _write_json(os.path.join(d, STATE_FILE), asdict(state))
        ray.train.report(
            {"step": state.step, "loss": state.last_loss},
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=f"step-{state.step:07d}",
        )


def gather_state_dict(engine: Any, rank: int) -> dict[str, Any] | None:
    """The full state dict on rank 0 (None elsewhere); ZeRO-3 parameters gathered one at a time."""
    import deepspeed

    module = engine.module
    if engine.zero_optimization_stage() != 3:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
    sd: dict[str, Any] = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if rank == 0:
                sd[name] = p.detach().cpu().clone()
    if rank != 0:
        return None
    params = {n for n, _ in module.named_parameters()}
    for name, b in module.state_dict().items():  # buffers are not partitioned
        if name not in params and name not in sd and b.numel() > 0:
            sd[name] = b.detach().cpu().clone()
    return sd


def export_hf(sd: dict[str, Any], model_path: str, tcfg: dict[str, Any], out_dir: str, dtype: Any) -> None:
    """Write `sd` (the training module's state dict) as an HF model: the architecture is built on
    the meta device and takes the tensors as they are, so no second copy is made."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if tcfg["lora"]["enabled"]:
        from rise_ray.config import LoRAConfig
        from rise_ray.train.lora import apply_lora, save_lora

        lora = LoRAConfig(**tcfg["lora"])
        model = apply_lora(model, lora)
        _assign(model, sd)
        model.base_model.model.name_or_path = model_path
        model.peft_config["default"].base_model_name_or_path = model_path
        save_lora(model, out_dir, merge=lora.merge)
    else:
        _assign(model, sd)
        model.save_pretrained(out_dir)


def _assign(model: Any, sd: dict[str, Any]) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected:
        raise RuntimeError(f"export: unexpected tensors {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"export: parameters missing from the trained state: {still_meta[:5]} (tied: {sorted(tied)[:3]})")
    del missing


def save_final(
    engine: Any, state: TrainerState, rank: int, model_path: str, tcfg: dict[str, Any], tokenizer: Any, zero_init: bool
) -> None:
    """Consolidate to HF format on rank 0 and report it as the run's last Ray Train checkpoint."""
    import ray.train
    import torch

    sd = gather_state_dict(engine, rank)
    state.final = True
    metrics = {
        "step": state.step,
        "loss": state.last_loss,
        "tokens": state.tokens,
        "padded_tokens": state.padded_tokens,
        "train_time_s": state.train_time_s,
    }
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    d = tempfile.mkdtemp(prefix="rise-final-")
    try:
        out = os.path.join(d, MODEL_DIR)
        dtype = next(iter(sd.values())).dtype if sd else torch.float32
        export_hf(sd, model_path, tcfg, out, dtype)
        tokenizer.save_pretrained(out)
        _write_json(os.path.join(out, MARKER_FILE), {"base_model": model_path, **metrics, "zero_init": zero_init})
        _write_json(os.path.join(d, STATE_FILE), asdict(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name="final")
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- log and bookkeeping --------------------------------------------------------------------------


def log_step(log_path: str | None, rec: dict[str, Any], plan: StepPlan) -> None:
    if log_path:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
    tps = rec.get("tokens_per_s") or 0.0
    print(
        f"[rise train] step {rec['step']}/{plan.total_steps} epoch {rec['epoch']} loss {rec['loss']:.4f} "
        f"lr {rec['lr']:.2e} {tps:,.0f} tok/s",
        file=sys.stderr,  # Ray Train prints a worker's stdout twice
        flush=True,
    )


def read_log(log_path: str) -> list[dict[str, Any]]:
    """Step records; a line cut short by a killed worker is skipped."""
    out = []
    if not os.path.exists(log_path):
        return out
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "step" in rec:
                out.append(rec)
    return out


def trim_log(log_path: str, step: int) -> None:
    """Keep the records up to `step` (the checkpoint resumed from), dropping what will be redone."""
    from rise_ray.files import atomic_write_text

    kept = [r for r in read_log(log_path) if r["step"] <= step]
    atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))


def record_worker(pid_dir: str | None, rank: int, resumed_from: int | None = None) -> None:
    """rank -> pid of the live worker and the step it resumed from (shows restarts)."""
    if pid_dir:
        info = {"rank": rank, "pid": os.getpid(), "resumed_from": resumed_from, "time": time.time()}
        _write_json(os.path.join(pid_dir, f"rank{rank}.json"), info)


def _write_json(path: str, obj: Any) -> None:
    from rise_ray.files import atomic_write_json

    atomic_write_json(path, obj)
