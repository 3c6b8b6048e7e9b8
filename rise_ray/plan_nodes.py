"""Which node types a cluster launcher file's autoscaler launches for each stage of a run, as
`rise run CONFIG --dry-run --cluster-yaml FILE` prints them: the bundles each stage asks Ray for
(`stage_demands`, the same calls the driver makes) put through Ray's own demand scheduler
(rise_ray.compat). The cluster twin (tests/test_cluster_twin.py) checks the real autoscaler agrees."""

from __future__ import annotations

from typing import Any

from rise_ray.config import RunConfig


def stage_demands(cfg: RunConfig) -> list[tuple[str, list[dict[str, float]], bool]]:
    """(what, its placement bundles, held for the run) in the order the driver asks: the policy's
    and the teacher's engines (held), Ray Train's workers and the NCCL sender (each while its stage
    runs, beside the engines), then `rise serve`'s engine replicas. The bundles are those the code
    asks Ray for."""
    from rise_ray.cluster import gpu_bundle
    from rise_ray.rollout.weight_transfer import resolve_method
    from rise_ray.serve.llm_config import serve_devices
    from rise_ray.train.placement import worker_placement

    r, t, tc, acc = cfg.rollout, cfg.train, cfg.teacher, cfg.cluster.accelerator_type
    out = [("policy engines", [gpu_bundle({"CPU": r.num_cpus_per_engine, "GPU": r.num_gpus_per_engine}, acc)] * r.num_engines, True)]
    if r.improve_with == "teacher":
        out.append(("teacher engines", [gpu_bundle({"CPU": tc.num_cpus_per_engine, "GPU": tc.num_gpus_per_engine}, acc)]
                    * tc.num_engines, True))
    if cfg.iterations > 0:
        worker, _ = worker_placement(cfg)  # colocated workers pair with engines by node label: same nodes
        if not r.colocate_with_trainer:
            out.append(("Ray Train workers", [gpu_bundle(worker, acc)] * t.num_workers, False))
        try:
            nccl = resolve_method(cfg.sync.method, r) == "nccl"
        except ValueError:
            nccl = False
        if nccl:
            out.append(("nccl weight sender", [gpu_bundle({"CPU": 0.1, "GPU": 1}, acc)], False))
    # `rise serve RUN_DIR` afterwards, on the same cluster: its first replicas, as decided on the
    # GPU-less head (the config and the cluster, never the head's hardware)
    devices = serve_devices(cfg, {})
    out.append(("serve replicas (rise serve)", devices.bundles() * max(1, cfg.serve.min_replicas), False))
    return out


def launch_plan(cfg: RunConfig, launcher: dict[str, Any]) -> list[dict[str, Any]]:
    """For each stage of `stage_demands`, the node types a cluster launcher file's autoscaler
    launches for it (asked of Ray's own scheduler, rise_ray.compat), starting from its head alone:
    [{"what", "launches": {type: count}, "on": [types its bundles use], "unplaced": [...]}]."""
    from rise_ray.compat import autoscaler_nodes_for, bin_pack_residual

    types = {n: {**t, "resources": dict(t.get("resources") or {})} for n, t in launcher["available_node_types"].items()}
    head = launcher["head_node_type"]
    nodes: list[tuple[str, dict]] = [(head, dict(types[head]["resources"]))]  # (type, free resources)
    room = int(launcher.get("max_workers", 10))
    plan = []
    for what, bundles, held in stage_demands(cfg):
        before = [dict(free) for _, free in nodes]
        left, _ = bin_pack_residual([free for _, free in nodes], bundles)
        existing = {n: sum(t == n for t, _ in nodes) for n in types}
        existing[head] -= 1  # the scheduler counts the head apart
        launches, unplaced = autoscaler_nodes_for(types, existing, head, room - (len(nodes) - 1), left)
        for n, k in launches.items():
            nodes += [(n, dict(types[n]["resources"])) for _ in range(k)]
        # place the stage's bundles, as Ray's scheduler would, and note the node types they use
        frees = [free for _, free in nodes]
        _, after = bin_pack_residual(frees, [b for b in bundles if b not in unplaced])
        used = sorted({nodes[i][0] for i, (a, b) in enumerate(zip(frees, after, strict=True)) if a != b})
        if held:
            for i, free in enumerate(after):
                nodes[i] = (nodes[i][0], free)
        else:
            for i in range(len(before)):
                nodes[i] = (nodes[i][0], before[i])
        plan.append(dict(what=what, launches=launches, on=used, unplaced=unplaced))
    return plan
