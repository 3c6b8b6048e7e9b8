"""A pool of persistent rollout-engine actors, fed by Ray Data.

Steps of `RolloutPool.run`:
  1. the problems become a Ray Dataset (one row each, with its index);
  2. `map_batches` streams batches through light tasks; batch k drives engine actor k mod N;
  3. each task runs the multi-turn episodes (rise_ray.rollout.episodes) with the actor as its
     engine, so every turn of the batch is one generate call on a warm engine; with
     rollout.schedule=async (and no teacher) it hands the batch to the actor, whose engine runs
     each episode's next turn as soon as its reply is graded (no round trip per turn);
  4. the trajectory records come back as Arrow rows with a fixed schema.
Progress (rise_ray.progress) replaces Ray Data's own block, which shows only batches: episodes
and engine actors report to a board, and a driver thread prints turn, problems, tokens/s, ETA.

The actors live across RISE iterations (engines are never rebuilt per round): new weights are
loaded in place with `update_weights` (files), or on GPU streamed by vLLM's native weight transfer
with `sync_native` (NCCL or CUDA IPC; rise_ray.rollout.weight_transfer). An actor that dies is
restarted by Ray, reloads the latest synced weights from the pointer file, and the call in flight is
retried, so no batch is lost or counted twice; after ENGINE_MAX_RESTARTS restarts it stays dead and
the stage fails with its error (an engine that crashes on every request must not loop forever).
Every wait on the actors has a deadline, and its error names what was waited for.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any

import ray
import torch

from rise_ray.cluster import gpu_bundle, in_bundle, place, release
from rise_ray.envs.base import Problem
from rise_ray.progress import remote_tally, start_board
from rise_ray.rollout.batch import (  # noqa: F401 (EngineTimeout: re-exported)
    CALL_TIMEOUT_S,
    EngineTimeout,
    cached_env,
    episode_batch,
    quiet_ray_data,
    report_progress,
    wait,
)
from rise_ray.rollout.engine import Completion, Conversation, SamplingParams
from rise_ray.rollout.episodes import (
    EpisodeSpec,
    Trajectory,
    generate_telling,
    run_episodes,
)

# Deadlines (seconds; environment variables override them). Start-up covers loading and compiling;
# a model given by hub id (not a local directory) may first be downloaded: that gets DOWNLOAD more.
READY_TIMEOUT_S = float(os.environ.get("RISE_ENGINE_READY_TIMEOUT_S", "900"))
DOWNLOAD_TIMEOUT_S = float(os.environ.get("RISE_MODEL_DOWNLOAD_TIMEOUT_S", "7200"))
SENDER_READY_TIMEOUT_S = float(os.environ.get("RISE_SENDER_READY_TIMEOUT_S", "300"))
SYNC_TIMEOUT_S = float(os.environ.get("RISE_SYNC_TIMEOUT_S", "1800"))  # a whole NCCL / IPC transfer
ENGINE_MAX_RESTARTS = int(os.environ.get("RISE_ENGINE_MAX_RESTARTS", "3"))


@ray.remote(max_restarts=ENGINE_MAX_RESTARTS, max_task_retries=ENGINE_MAX_RESTARTS)
class EngineActor:
    """Holds one engine (vLLM or transformers) for the life of the run."""

    def __init__(
        self, kind: str, model_path: str, engine_kwargs: dict[str, Any], pointer_path: str | None,
        cpu_threads: int | None = None, storage: tuple[str, str] | None = None,
    ):
        from rise_ray.models.placement import check_run_storage
        from rise_ray.rollout import make_engine

        # on this actor's own node, which may have been launched after the driver's checks
        check_run_storage(storage, None if kind == "solver" else model_path)

        if cpu_threads:  # Ray gives an actor holding a fraction of a CPU one thread
            torch.set_num_threads(cpu_threads)

        self.model_path = model_path
        self.engine = make_engine(kind, model_path, **engine_kwargs)
        self.weights_version = "initial"
        # After a restart, come back with the latest synced weights, not the initial ones.
        if pointer_path and os.path.exists(pointer_path):
            with open(pointer_path) as f:
                pointer = json.load(f)
            self.engine.update_weights(pointer["checkpoint"])
            self.weights_version = pointer["version"]

    def info(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path,
            "max_model_len": self.engine.max_model_len,
            "weights_version": self.weights_version,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "dtype": getattr(self.engine, "dtype", "unknown"),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }

    def generate(
        self, conversations: list[Conversation], n: int, params: SamplingParams, progress: tuple | None = None
    ) -> list[list[Completion]]:
        """progress: (board, run, source) that this call's tokens are reported to as they are made."""
        if progress is None:
            return self.engine.generate(conversations, n, params)
        with remote_tally(progress) as tally:
            return generate_telling(self.engine, conversations, n, params, tally.made)

    def prompt_len(self, conversation: Conversation) -> int:
        return self.engine.prompt_len(conversation)

    def run_episodes(
        self, env_name: str, env_options: str, problems: list[Problem], spec: EpisodeSpec, progress: tuple | None = None
    ) -> list[Trajectory]:
        """A batch's episodes here, on this actor's engine (rollout.schedule=async): VLLMEngine
        batches their turns continuously, with no round trip per turn. progress: (board, run,
        source) to report to (rise_ray.progress)."""
        with remote_tally(progress) as tally:
            return run_episodes(self.engine, cached_env(env_name, env_options), problems, spec, progress=tally)

    def update_weights(self, weights: Any, version: str) -> None:
        self.engine.update_weights(weights)
        self.weights_version = version

    def top_logprobs(self, conversation: Conversation, k: int = 8) -> list[tuple[int, float]]:
        return self.engine.top_logprobs(conversation, k)

    # -- vLLM's native weight transfer (GPU): the calls of weight_transfer.EnginesClient ---------------
    def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        self.engine.init_weight_transfer(init_info)

    def start_weight_update(self) -> None:
        self.engine.start_weight_update()

    def receive_weights(self, update_info: Any) -> None:
        self.engine.receive_weights(update_info)

    def finish_weight_update(self, version: str | None) -> None:
        self.engine.finish_weight_update()
        if version is not None:
            self.weights_version = version

    def shutdown_weight_transfer(self) -> None:
        self.engine.shutdown_weight_transfer()

    def send_ipc(self, checkpoint: str, bucket_bytes: int, version: str) -> None:
        """Be the engine's own IPC sender: the checkpoint onto this actor's GPU (the one its vLLM
        worker uses), one bucket at a time, shared with the worker by CUDA IPC handles."""
        from rise_ray.rollout.weight_transfer import CheckpointSource, local_client, send_ipc

        if getattr(self.engine, "tensor_parallel_size", 1) != 1:
            raise RuntimeError("sync.method ipc needs tensor_parallel_size 1 (one GPU per engine); use nccl")
        send_ipc(CheckpointSource(checkpoint, "cuda"), local_client(self.engine), bucket_bytes)
        self.weights_version = version

    def sleep(self, level: int) -> None:
        if hasattr(self.engine, "sleep"):  # vLLM with sleep mode; others hold no GPU memory to free
            self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None) -> None:
        if hasattr(self.engine, "wake_up"):
            self.engine.wake_up(tags)


class RolloutPool:
    """N persistent engine actors and the Ray Data pipeline that feeds them."""

    def __init__(
        self,
        kind: str,
        model_path: str,
        num_engines: int = 1,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        engine_kwargs: dict[str, Any] | None = None,
        pointer_path: str | None = None,
        cpu_threads: int | None = None,
        scale_up_timeout_s: float = 1800.0,
        accelerator_type: str | None = None,
        storage: tuple[str, str] | None = None,
    ):
        self.kind = kind
        self.model_path = model_path
        # where Ray Data tasks read the tokenizer; None: no model (the solver counts on its actor)
        self.tokenizer_path = None if kind == "solver" else model_path
        self.pointer_path, self.storage = pointer_path, storage
        self.engine_kwargs = dict(engine_kwargs or {})
        self.accelerator_type, self.scale_up_timeout_s = accelerator_type, scale_up_timeout_s
        need = gpu_bundle({"CPU": num_cpus, "GPU": num_gpus}, accelerator_type)
        # One group for the pool's life, engine i in bundle i: the start-up deadline below counts
        # from when their nodes are up (an autoscaler may add them).
        self.placement = place([need] * num_engines, f"{num_engines} {kind} engine(s) of {model_path} (each {need})",
                               scale_up_timeout_s)
        self.actors = [
            EngineActor.options(num_cpus=num_cpus, num_gpus=num_gpus, resources=_custom(need), **in_bundle(self.placement, i))
            .remote(kind, model_path, engine_kwargs or {}, pointer_path, cpu_threads, storage)
            for i in range(num_engines)
        ]
        refs = [a.info.remote() for a in self.actors]
        deadline = READY_TIMEOUT_S + (0 if os.path.isdir(model_path) else DOWNLOAD_TIMEOUT_S)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=deadline)
        if len(ready) < len(refs):
            for a in self.actors:
                ray.kill(a, no_restart=True)
            release(self.placement)
            raise EngineTimeout(
                f"engine start-up: {len(refs) - len(ready)} of {num_engines} {kind} engine(s) of {model_path} "
                f"(each {need}) not ready within {deadline:.0f} s (RISE_ENGINE_READY_TIMEOUT_S"
                f"{'' if os.path.isdir(model_path) else ' + RISE_MODEL_DOWNLOAD_TIMEOUT_S'}); "
                f"Ray's free resources: {ray.available_resources()}"
            )
        infos = ray.get(refs)  # an engine that failed to start raises its error here
        self.max_model_len = infos[0]["max_model_len"]
        self._board = None  # the ProgressBoard actor, made at the first run that reports

    def run(
        self,
        env_name: str,
        env_options: dict[str, Any],
        problems: list[Problem],
        spec: EpisodeSpec,
        batch_size: int = 64,
        teacher: RolloutPool | None = None,
        progress: str | None = "rollout",
    ) -> list[Trajectory]:
        """Stream the problems through the engines; trajectories come back in problem order.
        progress: the label of the progress lines and gauges (e.g. "eval"); None: no progress."""
        if not problems:
            return []
        rows = [
            {"idx": i, "id": p.id, "question": p.question, "reference": p.reference, "meta": json.dumps(p.meta, default=str)}
            for i, p in enumerate(problems)
        ]
        blocks = max(1, -(-len(rows) // batch_size))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        report_to = None
        if progress is not None:
            try:
                self._board = self._board or start_board()
                report_to = (self._board, uuid.uuid4().hex)
            except Exception as e:  # progress never fails a run
                print(f"[rise {progress}] no progress reports: {type(e).__name__}: {e}", file=sys.stderr)
        ds = ds.map_batches(
            episode_batch,
            batch_size=batch_size,
            batch_format="pyarrow",
            # Tasks only route work to the engine actors: a sliver of CPU each, or on a small machine
            # the pipeline would wait for CPUs the engines hold (deadlock on 2 cores).
            num_cpus=0.05,
            compute=ray.data.TaskPoolStrategy(size=min(2 * len(self.actors), blocks)),
            fn_kwargs={
                "actors": self.actors,
                "model_path": self.model_path,
                "max_model_len": self.max_model_len,
                "teacher": None if teacher is None else (teacher.actors, teacher.tokenizer_path, teacher.max_model_len),
                "env_name": env_name,
                "env_options": json.dumps(env_options, sort_keys=True, default=str),
                "spec": spec,
                "batch_size": batch_size,
                "progress": report_to,
            },
        )
        quiet_ray_data(ds.context, report_to is not None)
        by_id = {}
        with report_progress(progress, report_to, len(problems), spec):
            for rec in ds.iter_rows():
                by_id[rec["problem_id"]] = Trajectory.from_record(rec)
        missing = [p.id for p in problems if p.id not in by_id]
        if missing or len(by_id) != len(problems):
            raise RuntimeError(f"rollout lost {len(missing)} problems (e.g. {missing[:3]}); ids must be unique")
        return [by_id[p.id] for p in problems]

    def update_weights(self, weights: Any, version: str, checkpoint_dir: str | None = None) -> float:
        """Load new weights into every live engine in place; returns seconds taken.

        `weights` is a checkpoint directory or a state dict. From a directory, engines on this node
        read its safetensors files themselves (from the page cache, no copy: several times faster
        than the object store, docs/scaling.md) and engines on other nodes get the state dict once
        through the object store. The pointer file names the checkpoint
        (`weights` or `checkpoint_dir`) so an engine restarted later loads the same weights.
        """
        from rise_ray.rollout.sync import load_state_dict

        start = time.perf_counter()
        here = ray.get_runtime_context().get_node_id()
        nodes = self.node_ids()
        local = [isinstance(weights, str) and n == here for n in nodes]
        calls = [a.update_weights.remote(weights, version) for a, ok in zip(self.actors, local, strict=True) if ok]
        if not all(local):
            ref = ray.put(load_state_dict(weights) if isinstance(weights, str) else weights)
            calls += [a.update_weights.remote(ref, version) for a, ok in zip(self.actors, local, strict=True) if not ok]
        wait(calls, f"weight load into {len(calls)} engine(s)", CALL_TIMEOUT_S)
        checkpoint = weights if isinstance(weights, str) else checkpoint_dir
        if checkpoint:
            self._write_pointer(checkpoint, version)
        return time.perf_counter() - start

    def sync_native(self, checkpoint: str, version: str, method: str, bucket_bytes: int) -> float:
        """Stream a checkpoint into every live engine with vLLM's weight transfer; returns seconds.

        ipc: each engine actor sends to its own worker (same GPU). nccl: a sender actor on a free GPU
        broadcasts to all engines at once (its trainer engine runs the engines' receive concurrently
        with the broadcast). The engines must have been built for `method` (engine_kwargs)."""
        from rise_ray.rollout.weight_transfer import CheckpointSender

        built = self.engine_kwargs.get("weight_transfer")
        if built != method:
            raise RuntimeError(
                f"sync.method {method!r} but the engines were built for {built!r}: "
                "make the pool with make_pool(..., sync_method=cfg.sync.method)"
            )
        start = time.perf_counter()
        if method == "ipc":
            calls = [a.send_ipc.remote(checkpoint, bucket_bytes, version) for a in self.actors]
            self._transfer(calls, f"weight transfer (ipc) of {checkpoint} into {len(calls)} engine(s)")
        elif method == "nccl":
            tp = int(self.engine_kwargs.get("tensor_parallel_size", 1))
            # A GPU other than the engines': waited for like every other actor (after an idle
            # scale-down or on --resume its node may have to be launched first).
            need = gpu_bundle({"CPU": 0.1, "GPU": 1}, self.accelerator_type)
            group = place([need], "the nccl weight sender (1 GPU that no engine holds)", self.scale_up_timeout_s)
            sender = CheckpointSender.options(resources=_custom(need), **in_bundle(group, 0)).remote(self.storage)
            try:
                try:
                    ray.get(sender.ready.remote(), timeout=SENDER_READY_TIMEOUT_S)
                except ray.exceptions.GetTimeoutError:
                    raise RuntimeError(
                        f"sync.method nccl: the sender, placed, did not start within {SENDER_READY_TIMEOUT_S:.0f} s "
                        "(RISE_SENDER_READY_TIMEOUT_S)"
                    ) from None
                what = f"weight transfer (nccl broadcasts) of {checkpoint} to {len(self.actors)} engine(s)"
                self._transfer([sender.send.remote(checkpoint, self.actors, tp, bucket_bytes, version)], what)
            finally:
                ray.kill(sender)
                release(group)
        else:
            raise ValueError(f"sync_native: unknown method {method!r} (nccl | ipc)")
        self._write_pointer(checkpoint, version)
        return time.perf_counter() - start

    def _transfer(self, calls: list[Any], what: str) -> None:
        """Wait for a native transfer; past SYNC_TIMEOUT_S the engines may sit in a collective that
        never ends, so they are restarted (they reload the last synced weights from the pointer
        file) and the stage fails: run it again."""
        try:
            wait(calls, what, SYNC_TIMEOUT_S, env="RISE_SYNC_TIMEOUT_S")
        except EngineTimeout:
            for a in self.actors:
                ray.kill(a, no_restart=False)
            raise

    def node_ids(self) -> list[str]:
        """The node each engine actor runs on now."""
        return [i["node_id"] for i in self.infos()]

    def infos(self) -> list[dict[str, Any]]:
        return wait([a.info.remote() for a in self.actors], "engine info", READY_TIMEOUT_S)

    def dtypes(self) -> list[str]:
        return [i["dtype"] for i in self.infos()]

    def current_checkpoint(self) -> str:
        """The weights the engines hold: the pointer file's checkpoint, else the initial model."""
        if self.pointer_path and os.path.exists(self.pointer_path):
            with open(self.pointer_path) as f:
                return json.load(f)["checkpoint"]
        return self.model_path

    def _write_pointer(self, checkpoint: str, version: str) -> None:
        """Name the checkpoint so an engine restarted later loads the same weights (by files)."""
        if self.pointer_path:
            from rise_ray.files import atomic_write_json

            atomic_write_json(self.pointer_path, {"checkpoint": checkpoint, "version": version})

    def sleep(self, level: int = 1) -> None:
        """Free the engines' GPU memory for a trainer sharing their GPUs (vLLM sleep mode; a no-op
        for engines without it). Undo with `wake_up` before the engines are used again."""
        wait([a.sleep.remote(level) for a in self.actors], "engine sleep", CALL_TIMEOUT_S)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """tags=["weights"]: only the weights' memory back (before a sync); None: everything."""
        wait([a.wake_up.remote(tags) for a in self.actors], "engine wake-up", CALL_TIMEOUT_S)

    def top_logprobs(self, conversation: Conversation, k: int = 8) -> list[list[tuple[int, float]]]:
        return wait([a.top_logprobs.remote(conversation, k) for a in self.actors], "engine top_logprobs", CALL_TIMEOUT_S)

    def shutdown(self) -> None:
        for a in [*self.actors, *([self._board] if getattr(self, "_board", None) else [])]:
            ray.kill(a)
        release(self.placement)
        self.actors, self._board = [], None


def _custom(bundle: dict[str, float]) -> dict[str, float]:
    """A bundle's resources other than CPU and GPU (an actor names those with num_cpus / num_gpus)."""
    return {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
