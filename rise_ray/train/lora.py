"""LoRA through peft: wrap a causal LM for training, and save it merged or as an adapter."""

from __future__ import annotations

from typing import Any

from rise_ray.config import LoRAConfig


def peft_config(cfg: LoRAConfig) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
    )


def apply_lora(model: Any, cfg: LoRAConfig) -> Any:
    """The model with LoRA adapters; only the adapters require grad."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg))


def save_lora(peft_model: Any, out_dir: str, merge: bool) -> None:
    """Merged: a plain HF model (safetensors). Not merged: the adapter (adapter_model.safetensors +
    adapter_config.json naming the base model), which `from_pretrained` loads with peft installed."""
    if merge:
        peft_model.merge_and_unload().save_pretrained(out_dir)
    else:
        peft_model.save_pretrained(out_dir)
