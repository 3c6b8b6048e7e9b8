"""The per-worker loop of reward-weighted SFT: what Ray Train runs on every training worker.

`train_loop_per_worker(config)` reads top to bottom like a recipe:
  1. environment: DeepSpeed's accelerator (DS_ACCELERATOR=cpu without GPUs) before it is imported,
     torch threads = the worker's CPUs, DeepSpeed on Ray Train's process group (gloo / nccl);
  2. start point and data: the latest Ray Train checkpoint's step (`ray.train.get_checkpoint()`)
     and this worker's Ray Dataset shard (`ray.train.get_dataset_shard("train")`);
  3. model: the HF checkpoint (bf16 on GPU, fp32 on CPU), gradient checkpointing, LoRA (peft);
  4. engine: DeepSpeed with ZeRO stage 0-3, AdamW, transformers' warm-up + cosine schedule,
     gradient clipping, then the checkpoint's DeepSpeed state loaded into it (rise_ray.train.engine);
  5. train: every optimizer step takes `grad_accum` micro-batches per worker (`train_step`);
  6. checkpoint: every `save_every_steps`, every rank's DeepSpeed shards -> one Ray Train checkpoint;
  7. final: parameters gathered by DeepSpeed, LoRA merged or kept as an adapter, saved in HF format
     as the last Ray Train checkpoint (rise_ray.train.checkpoint).

The loss and its normalisation (stated here only; rise_ray.data.builder makes the weights).
A data set row holds token weights w_t (`weight / n` on each of a trained turn's n reply tokens,
0 elsewhere) and `units`, the number of prefix examples the row holds. Then
    step loss = sum over the step's rows (all workers) of sum_t w_t CE_t  /  sum of their units,
i.e. each example's mean token CE times its weight, averaged over the examples of the step: the
paper's per-batch loss for `prefix` rows, and over the whole data set in one batch the same value
and gradients for `packed` rows. `weighted_loss_sum` is the numerator; `train_step` divides. Each
micro-batch's backward gets loss_sum x world / units_step because DeepSpeed averages gradients over
the data-parallel ranks; DeepSpeed's own division by gradient_accumulation_steps is turned off
(scale_wrt_gas=False) so a short last step of an epoch is normalised by what it really holds.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rise_ray.config import TrainConfig
from rise_ray.train.checkpoint import TrainerState, read_state, resume, save_checkpoint, save_final
from rise_ray.train.engine import deepspeed_config, join_deepspeed, load_model, make_engine, resolve_bf16
from rise_ray.train.engine import setup_environment as setup_environment
from rise_ray.train.progress import StepPlan, log_step, micro_batches_in_step
from rise_ray.train.progress import plan_steps as plan_steps
from rise_ray.train.progress import read_log as read_log


@dataclass(frozen=True)


class WorkerConfig:
    """What the driver hands every worker (Ray Train's train_loop_config is this as a dict)."""

    model_path: str
    train: TrainConfig
    plan: StepPlan
    pad_id: int
    log_path: str | None = None
    storage: tuple[str, str] | None = None  # the run's marker (rise_ray.models.placement.check_run_storage)


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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    job = WorkerConfig(**config)
    tcfg, plan = job.train, job.plan
    from rise_ray.models.placement import check_run_storage

    check_run_storage(job.storage, job.model_path)  # on this worker's node, before any work

    # 1. environment --------------------------------------------------------------------------
    setup_environment(tcfg.use_gpu)
    import ray.train
    import torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(tcfg.seed)
    if not tcfg.use_gpu:  # the worker's reserved CPUs unless told (oversubscribed threads crawl)
        torch.set_num_threads(tcfg.cpu_threads or max(1, int(tcfg.cpus_per_worker)))
    bf16 = resolve_bf16(tcfg)
    join_deepspeed(dist, world)

    # 2. where to start, and the data ---------------------------------------------------------
    checkpoint = ray.train.get_checkpoint()
    state = read_state(checkpoint)
    if state.final:  # died after the final report: nothing left to do
        return
    shard = ray.train.get_dataset_shard("train")
    batches = epoch_batches(shard, tcfg, state.step // plan.steps_per_epoch)

    # 3. model --------------------------------------------------------------------------------
    ds_config = deepspeed_config(tcfg, world, bf16)
    model, tokenizer, zero_init = load_model(job.model_path, tcfg, ds_config, bf16)

    # 4. engine, resumed from the checkpoint --------------------------------------------------
    engine = make_engine(model, tcfg, ds_config, plan)
    resume(engine, checkpoint, state, job.log_path, rank)
    if rank == 0 and state.step:
        print(f"[rise train] resumed at step {state.step}/{plan.total_steps}", file=sys.stderr, flush=True)

    # 5. train --------------------------------------------------------------------------------
    while state.step < plan.total_steps:
        epoch, step_in_epoch = divmod(state.step, plan.steps_per_epoch)
        for _ in range(step_in_epoch * tcfg.grad_accum):  # resuming mid-epoch: skip what was trained
            next_batch(batches, rank, epoch)
        for s in range(step_in_epoch, plan.steps_per_epoch):
            t0 = time.perf_counter()
            micro = [
                collate(rows, job.pad_id, engine.device)
                for _ in range(micro_batches_in_step(plan, s, tcfg.grad_accum))
                for rows in split_by_length(next_batch(batches, rank, epoch), tcfg.length_groups)
            ]
            if s == plan.steps_per_epoch - 1 and epoch + 1 < tcfg.epochs:
                batches = epoch_batches(shard, tcfg, epoch + 1)
            t_data = time.perf_counter() - t0
            lr = float(engine.get_lr()[0])
            log_now = rank == 0 and (state.step + 1) % tcfg.log_every_steps == 0
            rec = train_step(engine, micro, world, dist, grad_norm=log_now or state.step + 1 == plan.total_steps)
            dt = time.perf_counter() - t0
            record(state, rec, dt)
            rec.update(
                step=state.step,
                epoch=epoch + 1,
                lr=lr,
                step_time_s=round(dt, 4),
                data_time_s=round(t_data, 4),
                tokens_per_s=rec["tokens"] / dt if dt > 0 else None,
                train_time_s=round(state.train_time_s, 3),
                time=time.time(),
                pid=os.getpid(),  # which process ran it: a restarted worker shows
            )
            if log_now or (rank == 0 and state.step == plan.total_steps):
                log_step(job.log_path, rec, plan)
            # 6. checkpoint: every rank's DeepSpeed shards -> one Ray Train checkpoint
            every = tcfg.save_every_steps
            if every and state.step % every == 0 and state.step < plan.total_steps:
                save_checkpoint(engine, state, rank)

    # 7. final model: gathered, merged (LoRA), HF format -> the last Ray Train checkpoint --------
    save_final(engine, state, rank, job.model_path, tcfg, tokenizer, zero_init)


def record(state: TrainerState, rec: dict[str, Any], dt: float) -> None:
    state.step += 1
    state.tokens += rec["tokens"]
    state.padded_tokens += rec["padded_tokens"]
    state.train_time_s += dt
    state.last_loss = rec["loss"]


# --- steps of the recipe --------------------------------------------------------------------------


def epoch_batches(shard: Any, tcfg: TrainConfig, epoch: int) -> Iterator[Any]:
    """This worker's micro-batches for `epoch`. The order is deterministic (the trainer asks Ray
    Data to preserve order), so a resumed run skips exactly the batches already trained."""
    batches = shard.iter_batches(
        batch_size=tcfg.micro_batch_size,
        batch_format="pyarrow",
        prefetch_batches=prefetch_batches(tcfg),
        local_shuffle_buffer_size=4 * tcfg.micro_batch_size if epoch > 0 else None,
        local_shuffle_seed=tcfg.seed + epoch if epoch > 0 else None,
    )
    return iter(batches)


def prefetch_batches(tcfg: TrainConfig) -> int:
    """auto: 1 with GPUs (batches are made while kernels run); 0 on CPU, where Ray Data's
    prefetching thread competes with the training thread for the worker's cores and the GIL."""
    if tcfg.prefetch_batches == "auto":
        return 1 if tcfg.use_gpu else 0
    return tcfg.prefetch_batches


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
