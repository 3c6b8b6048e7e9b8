"""Joining Ray: the cluster at RAY_ADDRESS, or a local Ray of our own with its dashboard. Below
every layer that starts work on Ray (the driver, `rise train`, `rise serve`)."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> str | None:
    """Join the cluster at RAY_ADDRESS, or start an embedded local Ray; returns the dashboard's URL
    when it started one."""
    import ray

    if ray.is_initialized():
        return None
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return None
    # With the dashboard (on 127.0.0.1; the next free port if 8265 is taken): users watch runs
    # there, and Ray Train's placement-group cleaner polls the state API it serves (without it, a
    # warning every second of training).
    # address="local": a new Ray of our own. Without it ray.init joins whatever cluster was started
    # last on this machine (another user's run, a test's), which can vanish mid-run.
    from rise_ray import cluster

    ctx = ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True)
    cluster.OWN_RAY = ray.get_runtime_context().gcs_address  # no autoscaler behind a Ray of our own
    return ctx.dashboard_url
