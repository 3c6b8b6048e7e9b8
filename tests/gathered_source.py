"""A trainer-side weight source for vLLM's weight transfer: a (ZeRO-3, LoRA) training model read one
bucket at a time, so only one bucket is ever whole on the GPU. The run syncs from the saved checkpoint
(rise_ray.rollout.weight_transfer.CheckpointSource); this is kept for tests that compare the two."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from rise_ray.rollout.weight_transfer import _param_meta, iter_buckets, tensor_bytes


@dataclass
class _Unit:
    """One output tensor and the parameters it is made from (LoRA merged: base, A, B)."""

    name: str
    params: list[Any]
    scale: float | None = None  # set: W + (B @ A) * scale
    fan_in_fan_out: bool = False
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(tensor_bytes(p) for p in self.params)

    @property
    def shape(self) -> tuple[int, ...]:
        p = self.params[0]
        return tuple(getattr(p, "ds_shape", p.shape))

    def materialize(self) -> torch.Tensor:
        """A copy: after the gather is released its parameters are partitions again, and vLLM's
        packers may still hold the tensor."""
        w = self.params[0].detach()
        if self.scale is None:
            return w.clone()
        a, b = self.params[1].detach(), self.params[2].detach()
        delta = (b.float() @ a.float()) * self.scale  # in fp32: a bf16 product loses the small update
        if self.fan_in_fan_out:
            delta = delta.T
        return (w.float() + delta).to(w.dtype)


def hf_name(name: str) -> str:
    """A training parameter's name as the HF checkpoint (and vLLM's load_weights) spells it."""
    while name.startswith("module."):  # DeepSpeed / DDP wrappers
        name = name[len("module.") :]
    name = name.removeprefix("base_model.model.")  # peft
    return name.replace(".base_layer.", ".")


def _adapter_name(name: str) -> str:
    """peft's saved adapter naming: the adapter's own name ('default') dropped."""
    while name.startswith("module."):
        name = name[len("module.") :]
    return re.sub(r"\.(lora_[AB])\.[^.]+\.", r".\1.", name)


def _units(model: Any, adapter_only: bool = False) -> list[_Unit]:
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    params = dict(module.named_parameters())  # a tied weight appears once
    lora: dict[str, tuple[str, str, float, bool]] = {}  # base weight -> (A, B, scale, fan_in_fan_out)
    for mname, m in module.named_modules():
        if not (hasattr(m, "base_layer") and hasattr(m, "lora_A")):
            continue
        adapter = m.active_adapters[0]
        if adapter not in m.lora_A:
            continue  # e.g. a LoRA embedding (lora_embedding_A): none of ours
        if getattr(m, "use_dora", {}).get(adapter):
            raise NotImplementedError(f"{mname}: DoRA weights cannot be merged here")
        a, b = f"{mname}.lora_A.{adapter}.weight", f"{mname}.lora_B.{adapter}.weight"
        lora[f"{mname}.base_layer.weight"] = (
            a,
            b,
            float(m.scaling[adapter]),
            bool(getattr(m, "fan_in_fan_out", False)),
        )
    lora_params = {n for a, b, *_ in lora.values() for n in (a, b)}
    units = []
    for name, p in params.items():
        if adapter_only:
            if name in lora_params:
                units.append(_Unit(_adapter_name(name), [p]))
        elif name in lora:
            a, b, scale, fifo = lora[name]
            units.append(_Unit(hf_name(name), [p, params[a], params[b]], scale, fifo))
        elif name not in lora_params:
            units.append(_Unit(hf_name(name), [p]))
    return units


def _gathered(params: list[Any]) -> contextlib.AbstractContextManager:
    """ZeRO-3: the bucket's parameters whole on every rank (a collective) until the block ends."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@torch.no_grad()
def gathered_named_params(
    model: Any, bucket_bytes: int, adapter_only: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every parameter of a model or DeepSpeed engine, ZeRO-3 parameters
    gathered one bucket at a time. LoRA (peft): the merged weights (base + B @ A * scale), or only the
    adapter's tensors when `adapter_only`. Every rank must iterate (the gather is a collective);
    every rank gets the tensors."""
    units = _units(model, adapter_only)
    for bucket in iter_buckets(((u.name, u) for u in units), bucket_bytes, nbytes=lambda u: u.nbytes):
        with _gathered([p for _, u in bucket for p in u.params]):
            out = [(name, u.materialize()) for name, u in bucket]
        yield from out


class GatheredSource:
    """vLLM's `WeightSource` (metadata() + iteration, the only parts its NCCL / IPC trainer engines
    use) over a training model: shapes from ZeRO-3's `ds_shape`, so metadata gathers nothing."""

    def __init__(self, model: Any, bucket_bytes: int, adapter_only: bool = False) -> None:
        self.model, self.bucket_bytes, self.adapter_only = model, bucket_bytes, adapter_only

    def metadata(self) -> list[Any]:
        return [
            _param_meta(u.name, u.params[0].dtype, u.shape) for u in _units(self.model, self.adapter_only)
        ]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return gathered_named_params(self.model, self.bucket_bytes, self.adapter_only)
