"""The RISE driver: Algorithm 1 of the paper as an explicit loop over resumable stages.

    base  <- the model (the embedded default builds a tiny one and warms it up)
    evaluate(base)                                   -> iter_0/eval
    for k in 1..K:
        D_k   <- collect(policy, teacher, train problems)   on-policy turns + improved answers
        data  <- build_dataset(D_1 u ... u D_k)              exp(r/tau)-weighted turns (data.aggregate;
                                                             false: D_k alone)
        theta <- train(data, init=theta)                     weighted SFT (Ray Train + DeepSpeed)
        sync(policy engines <- theta)                        in place, then a logprob check
        evaluate(policy)                                     -> iter_k/eval
    report()

Every stage writes into runs/<name>/ atomically and records itself in manifest.json; a restarted
run (`rise run --resume runs/<name>`) skips what finished and starts the pool from the latest
trained weights. One run at a time holds the directory (rise_ray.manifest: lock, config
fingerprints, outputs checked before a run continues).
"""

from __future__ import annotations

import os
import time

from rise_ray.collect import collect, collection_stats, problems_for_iteration
from rise_ray.config import ConfigError, RunConfig, load_config
from rise_ray.data.store import write_trajectories
from rise_ray.eval.evaluate import eval_problems, evaluate
from rise_ray.manifest import STAGE_KINDS, Manifest, RunLock, open_run_dir, warmup_enabled
from rise_ray.models.placement import check_model_on_nodes, write_run_marker
from rise_ray.observe import Observer
from rise_ray.preflight import check_run
from rise_ray.protocol import describe_departures
from rise_ray.report import write_report
from rise_ray.session import env_options, init_ray, make_env, make_pool, resolve_model


def run(cfg: RunConfig, run_dir: str | None = None, redo_changed: bool = False, redo_missing: bool = False) -> list[dict]:
    """Run (or continue) RISE in run_dir, holding its lock. Finished stages that the config would
    not reproduce, or whose outputs are gone, are an error unless redo_changed / redo_missing."""
    print(describe_departures(cfg, prefix="[rise] "), flush=True)  # where this run is not the paper's method
    run_dir = os.path.abspath(run_dir or os.path.join(cfg.run_dir, cfg.name))  # paths valid from any cwd
    with RunLock(run_dir):
        manifest = open_run_dir(cfg, run_dir, redo_changed=redo_changed, redo_missing=redo_missing)
        return _run(cfg, run_dir, manifest)


def _run(cfg: RunConfig, run_dir: str, manifest: Manifest) -> list[dict]:
    pointer = os.path.join(run_dir, "weights.json")  # engines start from the manifest's latest weights
    if os.path.exists(pointer):
        os.remove(pointer)
    observer = Observer(cfg, run_dir)  # Ray metrics and experiment tracking of every stage that runs
    manifest.on_stage = observer.stage
    wall_start = time.perf_counter() - manifest.data.get("wall_s", 0.0)
    check_run(cfg)  # what `rise run --dry-run` refuses is refused here, past the run directory's checks
    env = make_env(cfg.env)
    grader_opts = env_options(cfg.env, with_data=False)
    init_ray()

    base = manifest.run_stage("base_model", build_base, cfg, env, run_dir)
    weights = latest_weights(manifest, cfg.iterations) or base
    check_model_on_nodes(weights)  # also on resume, where base_model was skipped: every node reads it
    storage = write_run_marker(run_dir)  # every actor checks it on its own node, also nodes launched later
    policy = make_pool(cfg.rollout, cfg.model, weights, cfg.seed, pointer, cfg.sync.method, cfg.cluster, storage)
    teacher = make_teacher(cfg, storage)

    def evaluate_stage(k: int) -> dict:
        out = os.path.join(run_dir, f"iter_{k}", "eval")
        return evaluate(policy, env, grader_opts, eval_problems(env, cfg.eval), cfg.eval, out, label={"iteration": k})

    manifest.run_stage("iter_0/eval", evaluate_stage, 0)
    for k in range(1, cfg.iterations + 1):
        it = os.path.join(run_dir, f"iter_{k}")
        problems = problems_for_iteration(env.train, cfg.rollout.problems_per_iteration, k)
        manifest.run_stage(f"iter_{k}/collect", collect_stage, policy, teacher, env, grader_opts, problems, cfg, k, it)
        sources = dataset_sources(manifest, k, cfg.data.aggregate)
        data = manifest.run_stage(f"iter_{k}/dataset", build_data, cfg, sources, weights, it)
        weights = manifest.run_stage(f"iter_{k}/train", train_stage, cfg, data, weights, os.path.join(it, "checkpoint"), policy,
                                     storage)
        manifest.run_stage(f"iter_{k}/sync", sync, policy, weights, f"iter_{k}", cfg)
        manifest.run_stage(f"iter_{k}/eval", evaluate_stage, k)

    wall = time.perf_counter() - wall_start
    manifest.data["wall_s"] = wall
    manifest.record("report", os.path.join(run_dir, "report.md"), 0.0)
    rows = write_report(run_dir, wall_s=wall)
    observer.finish(wall)
    return rows


def stage_names(iterations: int) -> list[str]:
    """The stages `run` records, in order."""
    its = [f"iter_{k}/{kind}" for k in range(1, iterations + 1) for kind in STAGE_KINDS]
    return ["base_model", "iter_0/eval", *its, "report"]


def dataset_sources(manifest: Manifest, k: int, aggregate: bool) -> list[str]:
    """The trajectories iteration k trains on: those of iterations 1..k (data.aggregate, as the
    paper's Algorithm 1 grows one data set), else iteration k's alone."""
    return [manifest.output(f"iter_{j}/collect")["path"] for j in range(1 if aggregate else k, k + 1)]


def latest_weights(manifest: Manifest, iterations: int) -> str | None:
    for k in range(iterations, 0, -1):
        if manifest.done(f"iter_{k}/train"):
            return manifest.output(f"iter_{k}/train")
    return None


def build_base(cfg: RunConfig, env, run_dir: str) -> str:
    path = resolve_model(cfg.model, run_dir)
    if not warmup_enabled(cfg):
        return path
    from rise_ray.train.warmup import warmup

    return warmup(cfg, env, path, os.path.join(run_dir, "warmup"))


def make_teacher(cfg: RunConfig, storage: tuple[str, str] | None = None):
    if cfg.rollout.improve_with != "teacher":
        return None
    from rise_ray.config import ModelConfig

    tcfg = cfg.teacher
    rollout = cfg.rollout.model_copy(update={
        "engine": tcfg.engine, "num_engines": tcfg.num_engines,
        "num_cpus_per_engine": tcfg.num_cpus_per_engine, "num_gpus_per_engine": tcfg.num_gpus_per_engine,
        "tensor_parallel_size": tcfg.tensor_parallel_size, "gpu_memory_utilization": tcfg.gpu_memory_utilization,
        "colocate_with_trainer": False,  # the teacher never trains: it keeps its GPUs
    })
    if tcfg.engine == "solver":  # no model: nothing to resolve, no context of its own
        teacher_model, path = ModelConfig(max_model_len=tcfg.max_model_len or 4096), "solver"
    else:
        teacher_model = ModelConfig(path=tcfg.path, max_model_len=tcfg.max_model_len, chat_template=tcfg.chat_template)
        path = resolve_model(teacher_model, os.path.abspath(os.path.join(cfg.run_dir, cfg.name)))
    return make_pool(rollout, teacher_model, path, cfg.seed, sync_method=None,  # never synced
                     cluster=cfg.cluster, storage=storage)


def collect_stage(policy, teacher, env, grader_opts, problems, cfg: RunConfig, k: int, it: str) -> dict:
    trajs = collect(policy, teacher, env.name, grader_opts, problems, cfg.rollout, k)
    write_trajectories(trajs, os.path.join(it, "trajectories", "part-00000.parquet"))
    return {"path": os.path.join(it, "trajectories"), **collection_stats(trajs)}


def build_data(cfg: RunConfig, trajectories: list[str], model_path: str, it: str) -> dict:
    from rise_ray.data.builder import prepare_dataset

    out = os.path.join(it, "dataset")
    prepare_dataset(cfg, trajectories, model_path, out)
    return {"path": out}


def train_stage(cfg: RunConfig, data: dict, init: str, out: str, policy, storage: tuple[str, str] | None = None) -> str:
    from rise_ray.train.trainer import train

    if cfg.rollout.colocate_with_trainer:  # the trainer takes the engines' GPUs; sync wakes them
        policy.sleep(level=2)  # level 2 drops the weights too: new ones arrive at the sync

    nodes = policy.node_ids() if cfg.rollout.colocate_with_trainer else None  # pair worker i with engine i
    return train(cfg, data["path"], init, out, engine_nodes=nodes, storage=storage)


def sync(policy, checkpoint: str, version: str, cfg: RunConfig) -> dict:
    """Load the trained weights into the live engines, then check a few logprobs against an fp32
    reference of the checkpoint (and of the weights held before): a mismatch fails the run loudly.

    files (CPU): engines on this node read the checkpoint's files; engines on other nodes get the
    state dict through the object store, written to shared memory per engine.
    nccl / ipc (vLLM on GPUs): the checkpoint streamed in buckets by vLLM's weight transfer
    (rise_ray.rollout.weight_transfer). Engines that slept through training (colocated) get their
    weights' memory back first and their KV cache after the update."""
    from rise_ray.rollout.sync import check_engines
    from rise_ray.rollout.weight_transfer import resolve_method

    method = resolve_method(cfg.sync.method, cfg.rollout)
    previous = policy.current_checkpoint()
    policy.wake_up(tags=["weights"])
    if method == "files":
        seconds = policy.update_weights(checkpoint, version)
    else:
        seconds = policy.sync_native(checkpoint, version, method, bucket_bytes=cfg.sync.bucket_mb * 2**20)
    policy.wake_up()
    out = {"seconds": round(seconds, 3), "method": method, "max_logprob_error": None}
    if cfg.sync.check:  # an fp32 reference in a Ray task of its own (rise_ray.rollout.sync)
        s = cfg.sync
        check = check_engines(policy, checkpoint, s.tolerance, previous, tolerance_half=s.tolerance_half)
        out.update(max_logprob_error=check["max_logprob_error"], check=check)
    return out


def resume(run_dir: str, overrides: list[str] | None = None, redo_changed: bool = False) -> list[dict]:
    """Continue run_dir with its config.yaml (and overrides); finished stages whose outputs are
    gone are redone."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    return run(load_config(path, overrides), run_dir=run_dir, redo_changed=redo_changed, redo_missing=True)


