"""The cluster twin: a shipped cluster file's node types as Ray's fake autoscaling cluster
(ray.cluster_utils.AutoscalingCluster's provider, `fake_multinode`), on this machine.

The head and each worker type get exactly the resources the file declares (GPUs declared, not
real; custom resources such as `accelerator_type:A100-80G`), with the file's min_workers and
max_workers: worker types at zero are launched by Ray's own autoscaler when a demand needs them.

Unlike AutoscalingCluster.start/shutdown, which run `ray stop --force` (every Ray process on the
machine), the twin runs in a Ray temp dir of its own (RAY_TMPDIR) on a free port and stops only
the processes started under that dir, so it can run beside other Ray tests."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
OBJECT_STORE = 80 * 2**20  # each fake node's object store: small, this machine holds them all


def launcher_node_types(path: str) -> tuple[str, dict[str, dict]]:
    """(head type, node types) of a cluster launcher file (aws.yaml, gcp.yaml), or of a KubeRay
    RayJob's head group and worker groups (resources from the container limits and rayStartParams)."""
    docs = [d for d in yaml.safe_load_all((REPO / path).read_text()) if d]
    if "available_node_types" in docs[0]:
        spec = docs[0]
        return spec["head_node_type"], {n: {"resources": dict(t.get("resources") or {}),
                                             "min_workers": t.get("min_workers", 0), "max_workers": t.get("max_workers", 0)}
                                         for n, t in spec["available_node_types"].items()}  # fmt: skip
    (job,) = [d for d in docs if d.get("kind") == "RayJob"]
    cluster = job["spec"]["rayClusterSpec"]

    def pod_resources(group: dict) -> dict[str, float]:
        (c, *_) = group["template"]["spec"]["containers"]
        limits = c["resources"]["limits"]
        res = {"CPU": int(limits["cpu"]), **({"GPU": int(limits["nvidia.com/gpu"])} if "nvidia.com/gpu" in limits else {})}
        custom = (group.get("rayStartParams") or {}).get("resources")
        return {**res, **(json.loads(json.loads(custom)) if custom else {})}

    types = {"head": {"resources": pod_resources(cluster["headGroupSpec"]), "min_workers": 0, "max_workers": 0}}
    for g in cluster["workerGroupSpecs"]:
        types[g["groupName"]] = {"resources": pod_resources(g), "min_workers": g["minReplicas"], "max_workers": g["maxReplicas"]}
    return "head", types


def node_type_of(resources: dict[str, float], types: dict[str, dict]) -> str:
    """The node type whose declared resources a live node's resources match."""
    for name, t in types.items():
        if all(resources.get(k, 0) == v for k, v in t["resources"].items()) and \
                resources.get("GPU", 0) == t["resources"].get("GPU", 0):
            return name
    raise AssertionError(f"no node type declares {resources}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TwinCluster:
    def __init__(self, path: str, idle_timeout_minutes: float = 10.0):
        self.path = path
        self.head_type, self.types = launcher_node_types(path)
        self.root = tempfile.mkdtemp(prefix="rtw", dir="/tmp")  # short: Ray's socket paths <= 107 bytes
        self.port = _free_port()
        self.address = f"{_node_ip()}:{self.port}"
        workers = {n: {"resources": {**t["resources"], "object_store_memory": OBJECT_STORE}, "node_config": {},
                       "min_workers": t["min_workers"], "max_workers": t["max_workers"]}
                   for n, t in self.types.items() if n != self.head_type}  # fmt: skip
        head = self.types[self.head_type]["resources"]
        self.config = {
            "cluster_name": "rise-twin", "max_workers": sum(w["max_workers"] for w in workers.values()),
            "head_node_type": "ray.head.default", "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address},
            "available_node_types": {**workers, "ray.head.default": {"resources": head, "node_config": {}, "max_workers": 0}},
            "auth": {}, "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False,
            **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        }  # fmt: skip
        self.env = {**os.environ, "RAY_TMPDIR": self.root, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    "RAY_AUTH_MODE": "disabled"}  # a local twin: no token (the shipped files turn it on)

    def start(self) -> TwinCluster:
        cfg = os.path.join(self.root, "autoscaling.json")
        with open(cfg, "w") as f:
            json.dump(self.config, f)
        head = dict(self.types[self.head_type]["resources"])
        cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", f"--port={self.port}",
               f"--autoscaling-config={cfg}", f"--num-cpus={int(head.pop('CPU', 0))}", f"--num-gpus={int(head.pop('GPU', 0))}",
               f"--object-store-memory={OBJECT_STORE}", "--include-dashboard=false",
               f"--ray-client-server-port={_free_port()}", "--disable-usage-stats"]  # fmt: skip
        if head:
            cmd.append(f"--resources={json.dumps(head)}")
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"ray start for the twin of {self.path} failed:\n{out.stderr[-3000:]}")
        return self

    def shutdown(self) -> None:
        """End every process started under this twin's temp dir (and nothing else), then remove it."""
        for _ in range(3):
            pids = [p for p in _pids_mentioning(self.root) if p != os.getpid()]
            for p in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            if not pids:
                break
            time.sleep(1.0)
        shutil.rmtree(self.root, ignore_errors=True)

    def live_types(self, ray: Any) -> dict[str, int]:
        """How many alive nodes of each type."""
        counts: dict[str, int] = {}
        for n in ray.nodes():
            if n.get("Alive"):
                t = node_type_of(n["Resources"], self.types)
                counts[t] = counts.get(t, 0) + 1
        return counts


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _pids_mentioning(text: str) -> list[int]:
    """PIDs whose command line or environment mentions `text` (Ray's processes carry their temp dir)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if text.encode() in cmd or text.encode() in env:
            found.append(int(d))
    return found
