"""Where Ray Train's workers go, and a deadline on getting there.

Colocation (rollout.colocate_with_trainer): each GPU holds one policy engine (asleep while training)
and one trainer worker. Ray Train V2 builds its own placement group for the workers (one bundle per
worker, `ScalingConfig.placement_strategy`, `label_selector` per worker) and cannot join one made
elsewhere, so the pairing rests on Ray's accounting of fractional GPUs, which is bookkeeping only
(memory is vLLM's gpu_memory_utilization and sleep mode):
  * an engine holds more than half a GPU (config: 0.5 < rollout.num_gpus_per_engine < 1), so no two
    engines share a GPU; Ray packs fractions best-fit, so two 0.4 engines would;
  * a worker asks for exactly the rest (1 - num_gpus_per_engine) and is pinned by node label to
    the node of engine i; on that node best-fit puts it on a GPU with exactly that much left, the
    engine's, before an empty one. Without the pin, PACK could put the workers on a node with
    free GPUs, two to a GPU.
Without engines to pair with (the warm-up, before the pool exists) a GPU worker takes a whole GPU.

Ray Train retries a worker group it cannot place (every RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)
without end, so `reserve` first reserves the same bundles with a deadline and fails naming them.
"""

from __future__ import annotations

from typing import Any

from rise_ray.cluster import PlacementTimeout as PlacementTimeout
from rise_ray.cluster import place, release

NODE_LABEL = "ray.io/node-id"  # a label Ray gives every node
STRATEGY = "PACK"  # Ray Train's default placement_strategy, used by both


def worker_placement(cfg: Any, engine_nodes: list[str] | None = None) -> tuple[dict[str, float], list[dict] | None]:
    """(resources per worker, per-worker label selectors or None) for Ray Train's ScalingConfig."""
    t, r = cfg.train, cfg.rollout
    res: dict[str, float] = {"CPU": t.cpus_per_worker}
    if not t.use_gpu:
        return res, None
    if cfg.cluster.accelerator_type:  # as cluster.gpu_bundle adds it: the node type meant for the config
        res[f"accelerator_type:{cfg.cluster.accelerator_type}"] = 0.001
    if r.colocate_with_trainer and engine_nodes:
        if len(engine_nodes) < t.num_workers:
            raise ValueError(f"colocation pairs each of train.num_workers={t.num_workers} with an engine, "
                             f"but {len(engine_nodes)} engine(s) are up")
        res["GPU"] = round(1.0 - r.num_gpus_per_engine, 6)
        return res, [{NODE_LABEL: n} for n in engine_nodes[: t.num_workers]]
    res["GPU"] = 1.0
    return res, None


def reserve(resources: dict[str, float], num_workers: int, labels: list[dict] | None, timeout: float) -> None:
    """Reserve what Ray Train's worker group will ask for (its bundles, strategy and label
    selectors), then release it; raise PlacementTimeout naming it when Ray cannot place it within
    `timeout` (cluster.scale_up_timeout_s: an autoscaler may be launching the nodes)."""
    where = f", worker i on the node of engine i ({[s[NODE_LABEL][:8] for s in labels]})" if labels else ""
    release(place([dict(resources)] * num_workers, f"Ray Train placement: {num_workers} worker(s) of {resources}{where}",
                  timeout, labels, STRATEGY))
