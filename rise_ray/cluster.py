"""Placing a stage's actors, and waiting for their nodes.

On a cluster that scales from zero (cluster/*.yaml: GPU workers at min_workers 0) a stage's nodes
may not exist yet: the autoscaler launches them when it sees the demand, and boot, image pull and
setup take minutes. So a stage first asks Ray for its actors' bundles as one placement group (the
demand the autoscaler acts on) and waits up to cluster.scale_up_timeout_s, printing every
PROGRESS_EVERY_S what it waits for and what the autoscaler reports pending (as `ray status`
shows it). The group then holds that capacity for the life of the actors: actor i is created in
bundle i (`in_bundle`), as OpenRLHF does, and the owner removes the group at shutdown. Their own
deadlines (engine start-up, sync) start only once placed.

Ray Train builds its own placement group for its workers and cannot join ours: for it
rise_ray.train.placement.reserve places the same bundles, waits, and releases them just before
Ray Train asks.

`cluster.accelerator_type` (e.g. A100-80G) adds Ray's `accelerator_type:<X>` resource to every GPU
bundle, so an autoscaler launches the node type that declares it (cluster/*.yaml) and no other.
"""

from __future__ import annotations

import time
from typing import Any

PROGRESS_EVERY_S = 30.0
# The GCS address of the Ray that session.init_ray started itself (address="local"): no autoscaler
# adds nodes to it, so there a demand that no node can hold fails at once instead of after
# cluster.scale_up_timeout_s. (An address, not a flag: a later connection to another cluster in the
# same process, as in tests, must not inherit it.)
OWN_RAY: str | None = None


class PlacementTimeout(RuntimeError):
    """Ray could not place a stage's actors in time."""


def autoscaler_pending() -> str:
    """What the autoscaler reports launching or pending ("" when there is no autoscaler report):
    autoscaler v2's cluster status, else v1's report in the GCS key-value store (what `ray status`
    reads)."""
    import ray

    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2():
            from ray.autoscaler.v2.sdk import get_cluster_status

            s = get_cluster_status(ray.get_runtime_context().gcs_address)
            launching = {r.ray_node_type_name: r.count for r in s.pending_launches}
            pending = [n.ray_node_type_name for n in s.pending_nodes]
            failed = [r.ray_node_type_name for r in s.failed_launches]
        else:
            from rise_ray.compat import autoscaler_v1_report

            report = autoscaler_v1_report()
            if report is None:
                return ""
            launching = dict(report.get("pending_launches") or {})
            pending = [n[1] for n in report.get("pending_nodes") or []]
            failed = [n[1] for n in report.get("failed_nodes") or []]
    except Exception as e:  # a status we cannot read must not stop the wait it only describes
        return f"(autoscaler status unreadable: {e!r})"
    parts = [f"launching {n} {t}" for t, n in sorted(launching.items())]
    parts += [f"{pending.count(t)} {t} starting" for t in sorted(set(pending))]
    parts += [f"{failed.count(t)} {t} failed" for t in sorted(set(failed))]
    return ", ".join(parts) or "nothing pending"


def gpu_bundle(resources: dict[str, float], accelerator_type: str | None) -> dict[str, float]:
    """`resources` plus Ray's accelerator-type resource where the bundle holds a GPU (the amount
    Ray's own `accelerator_type=` option asks for: any node of that type has room for it)."""
    out = {k: v for k, v in resources.items() if v}
    if accelerator_type and out.get("GPU"):
        out[f"accelerator_type:{accelerator_type}"] = 0.001
    return out or {"CPU": 0.001}  # Ray refuses an empty bundle; an actor of num_cpus=0 fits this one


def place(
    bundles: list[dict[str, float]],
    what: str,
    timeout: float,
    labels: list[dict[str, str]] | None = None,
    strategy: str = "PACK",
) -> Any:
    """Reserve `bundles` (with per-bundle label selectors) as one placement group and block until
    Ray has placed it; the caller keeps it for the life of its actors (`in_bundle`) and removes it
    at shutdown. Raises PlacementTimeout naming `what` after `timeout` seconds."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if ray.get_runtime_context().gcs_address == OWN_RAY and (missing := unplaceable(bundles)):
        raise PlacementTimeout(f"{what}: {missing}, and this Ray, started by rise on this machine, adds no nodes "
                               "(join a cluster with RAY_ADDRESS, or ask for less)")
    kw: dict[str, Any] = {"bundle_label_selector": labels} if labels else {}
    pg = placement_group([dict(b) for b in bundles], strategy=strategy, **kw)
    start = time.monotonic()
    try:
        while True:
            if pg.wait(timeout_seconds=max(0.0, min(PROGRESS_EVERY_S, timeout - (time.monotonic() - start)))):
                return pg
            waited = time.monotonic() - start
            if waited >= timeout:
                break
            pending = autoscaler_pending()
            print(f"[rise] waiting for nodes: {what} ({waited:.0f} s of cluster.scale_up_timeout_s="
                  f"{timeout:.0f}){'; autoscaler: ' + pending if pending else ''}", flush=True)
    except BaseException:  # Ctrl-C while waiting: the demand must not outlive the wait
        remove_placement_group(pg)
        raise
    remove_placement_group(pg)
    pending = autoscaler_pending()
    raise PlacementTimeout(
        f"{what} could not be placed within {timeout:.0f} s (cluster.scale_up_timeout_s); free now: "
        f"{ray.available_resources()}{'; autoscaler: ' + pending if pending else ''}"
    )


def in_bundle(pg: Any, index: int) -> dict[str, Any]:
    """Actor options that put an actor in bundle `index` of `pg`. Its own tasks and actors are not
    captured: they ask the cluster, not the bundle."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=index, placement_group_capture_child_tasks=False)}


def release(pg: Any) -> None:
    """Remove a placement group (its actors are killed with it); nothing if already gone."""
    import contextlib

    from ray.util.placement_group import remove_placement_group

    with contextlib.suppress(Exception):
        remove_placement_group(pg)


def unplaceable(bundles: list[dict[str, float]]) -> str | None:
    """What no live node could hold even when idle (a bundle larger than every node), or None."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for b in bundles:
        if not any(all(res.get(k, 0.0) >= v for k, v in b.items() if v) for res in nodes):
            have = [{k: res.get(k, 0.0) for k in b} for res in nodes]
            return f"no node holds {b} (the nodes have {have})"
    for k in {k for b in bundles for k in b}:
        need, have = sum(b.get(k, 0.0) for b in bundles), sum(res.get(k, 0.0) for res in nodes)
        if need > have + 1e-9:
            return f"{len(bundles)} x {bundles[0]} need {need:g} {k}, the nodes have {have:g}"
    return None
