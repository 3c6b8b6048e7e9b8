"""The DeepSpeed side of a training worker: accelerator and process group, the DeepSpeed config
from the `train` section, the model (ZeRO-3 partitioned at load, LoRA), AdamW with transformers'
warm-up + cosine (or constant) schedule, and resuming with weights-only unpickling."""

from __future__ import annotations

import os
from typing import Any

from rise_ray.config import TrainConfig, merge
from rise_ray.train.progress import StepPlan


def setup_environment(use_gpu: bool) -> None:
    """DeepSpeed picks its accelerator at import: set it first. Native ops build into a cache
    that outlives the run, so each Python environment compiles them once."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/rise-ray/torch_extensions"))


def join_deepspeed(dist: Any, world: int) -> None:
    """DeepSpeed's comm layer on the process group Ray Train set up (gloo on CPU, nccl on GPU).
    A single CPU worker goes without DeepSpeed's shared-memory allreduce op: it has nothing to
    reduce, and the op takes about a minute to compile in every new Python environment."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if world == 1 and get_accelerator().device_name() == "cpu":
        shm = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if shm is not None:
            deepspeed.ops.__compatible_ops__[shm.NAME] = False  # read by deepspeed.comm.torch.build_shm_op
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


def resolve_bf16(tcfg: TrainConfig) -> bool:
    return tcfg.use_gpu if tcfg.bf16 == "auto" else bool(tcfg.bf16)


def deepspeed_config(tcfg: TrainConfig, world: int, bf16: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tcfg.micro_batch_size,
        "gradient_accumulation_steps": tcfg.grad_accum,
        "train_batch_size": tcfg.micro_batch_size * tcfg.grad_accum * world,
        "gradient_clipping": tcfg.max_grad_norm,
        "zero_optimization": {"stage": tcfg.zero_stage},
        "zero_allow_untested_optimizer": True,  # the client AdamW (torch) under ZeRO
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if tcfg.offload:
        if tcfg.zero_stage == 0:
            raise ValueError("train.offload needs train.zero_stage 1, 2 or 3 (ZeRO owns what it offloads)")
        cpu = {"device": "cpu", "pin_memory": tcfg.use_gpu}  # pinned: faster copies to a GPU
        cfg["zero_optimization"]["offload_optimizer"] = dict(cpu)
        if tcfg.zero_stage == 3:
            cfg["zero_optimization"]["offload_param"] = dict(cpu)
        # Our optimizer is torch's AdamW (no DeepSpeedCPUAdam build needed); DeepSpeed refuses a
        # non-DeepSpeed optimizer with offload unless told.
        cfg["zero_force_ds_cpu_optimizer"] = False
    return merge(cfg, tcfg.deepspeed)


def load_model(model_path: str, tcfg: TrainConfig, ds_config: dict[str, Any], bf16: bool) -> tuple[Any, Any, bool]:
    """(model, tokenizer, zero_init). ZeRO-3 without LoRA loads straight into partitions."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zero_init = tcfg.zero_stage == 3 and not tcfg.lora.enabled
    keep = None
    if zero_init:  # while this object lives, from_pretrained builds partitioned parameters
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if bf16 else torch.float32)
    del keep
    model.config.use_cache = False
    if tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tcfg.lora.enabled:
        from rise_ray.train.lora import apply_lora

        model = apply_lora(model, tcfg.lora)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return model, tokenizer, zero_init


def make_scheduler(optimizer: Any, tcfg: TrainConfig, plan: StepPlan) -> Any:
    """transformers' schedules, as its Trainer uses them: linear warm-up from 0 over
    plan.warmup_steps, then cosine to 0 or constant."""
    from transformers import get_scheduler

    name = "cosine" if tcfg.lr_schedule == "cosine" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=plan.warmup_steps, num_training_steps=plan.total_steps)


def make_engine(model: Any, tcfg: TrainConfig, ds_config: dict[str, Any], plan: StepPlan) -> Any:
    import deepspeed
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    try:  # the fused kernel (CPU and GPU), as transformers' Trainer uses by default
        optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    scheduler = make_scheduler(optimizer, tcfg, plan)
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
