"""Checkpoints of a training worker: every rank's DeepSpeed state as a Ray Train checkpoint (resumed
from after a restart), and the final model gathered by DeepSpeed, LoRA merged or kept as an adapter,
saved in HF format (safetensors) as the run's last checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

from rise_ray.config import TrainConfig
from rise_ray.files import atomic_write_json
from rise_ray.train.progress import trim_log

STATE_FILE = "trainer_state.json"
MODEL_DIR = "model"
MARKER_FILE = "rise_train.json"  # written last into a finished model directory
DS_TAG = "state"


@dataclass


class TrainerState:
    step: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    train_time_s: float = 0.0
    final: bool = False
    last_loss: float | None = None


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


def save_checkpoint(engine: Any, state: TrainerState, rank: int) -> None:
    """Every rank writes its DeepSpeed shards; Ray Train merges them into one checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="rise-ckpt-") as d:
        engine.save_checkpoint(d, tag=DS_TAG)
        if rank == 0:
            atomic_write_json(os.path.join(d, STATE_FILE), asdict(state))
        ray.train.report(
            {"step": state.step, "loss": state.last_loss},
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=f"step-{state.step:07d}",
        )


def gather_state_dict(engine: Any, rank: int) -> dict[str, Any] | None:
    """The full state dict on rank 0 (None elsewhere); ZeRO-3 parameters gathered one at a time
    (DeepSpeed's own consolidation, engine._zero3_consolidated_16bit_state_dict, is private API)."""
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


def export_hf(sd: dict[str, Any], model_path: str, tcfg: TrainConfig, out_dir: str, dtype: Any) -> None:
    """Write `sd` (the training module's state dict) as an HF model: the architecture is built on
    the meta device and takes the tensors as they are, so no second copy is made."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if tcfg.lora.enabled:
        from rise_ray.train.lora import apply_lora, save_lora

        model = apply_lora(model, tcfg.lora)
        _assign(model, sd)
        model.base_model.model.name_or_path = model_path
        model.peft_config["default"].base_model_name_or_path = model_path
        save_lora(model, out_dir, merge=tcfg.lora.merge)
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
    engine: Any, state: TrainerState, rank: int, model_path: str, tcfg: TrainConfig, tokenizer: Any, zero_init: bool
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
        atomic_write_json(os.path.join(out, MARKER_FILE), {"base_model": model_path, **metrics, "zero_init": zero_init})
        atomic_write_json(os.path.join(d, STATE_FILE), asdict(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name="final")
    finally:
        shutil.rmtree(d, ignore_errors=True)
