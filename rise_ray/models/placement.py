"""A model every node can read: a fetched or converted model placed on the run's storage, and a
check, run on every node that may host an engine or a trainer, that it reads the directory.

The user's caches (the hub's, ~/.cache/rise-ray) are node-private download caches; a run hands
engines, trainers and tasks on other nodes the placed copy. resolve_model: a run's model directory
(its model.path so placed, or the embedded tiny model).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable

from rise_ray.config import ConfigError, ModelConfig
from rise_ray.models.source import _cached, get_model, weight_files, with_chat_template

# --- the model on shared storage ------------------------------------------------------------------


def models_dir(work_dir: str) -> str:
    """Where a run keeps its models: $RISE_MODELS_DIR (shared by runs), else <work_dir>/models."""
    return os.environ.get("RISE_MODELS_DIR") or os.path.join(work_dir, "models")


def model_slug(source: str, resolved: str) -> str:
    """A directory name for SOURCE: readable, and distinct for each resolved directory (a hub
    snapshot's revision, a GGUF's hash, a chat template's key are all in its real path)."""
    name = source.rstrip("/").replace("/", "--") if source.count("/") == 1 and not os.path.exists(source) \
        else os.path.basename(os.path.abspath(source).rstrip("/"))
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or "model"
    key = hashlib.sha256(os.path.realpath(resolved).encode()).hexdigest()[:10]
    return f"{name}-{key}"


def _link_or_copy(src: str, dst: str) -> None:
    real = os.path.realpath(src)  # a hub snapshot's files are links into its blob store
    try:
        os.link(real, dst)
    except OSError:  # another filesystem (the usual case for a node-local cache), or links refused
        shutil.copy2(real, dst)


def place_model(path: str, dest: str) -> str:
    """The model directory `path` as `dest` (a directory on the run's storage): every file hard-linked
    where the two share a filesystem, else copied; links are followed, so `dest` holds real files.
    Built in a temporary sibling and renamed: an existing `dest` is complete and returned at once."""

    def build(tmp: str) -> None:
        for root, dirs, files in os.walk(path, followlinks=True):
            rel = os.path.relpath(root, path)
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # .cache/ of a local_dir download
            os.makedirs(os.path.join(tmp, rel), exist_ok=True)
            for f in files:
                if not f.startswith("."):
                    _link_or_copy(os.path.join(root, f), os.path.join(tmp, rel, f))

    return _cached(dest, build)


# --- every node can read it -----------------------------------------------------------------------

NODE_CHECK_TIMEOUT_S = float(os.environ.get("RISE_NODE_CHECK_TIMEOUT_S", "120"))


def probe_model_dir(path: str) -> str | None:
    """None when `path` is a model directory this process can read (config.json parses, each weight
    file that is loaded opens and reads); else what is wrong, naming the first missing directory."""
    if not os.path.isdir(path):
        missing, parent = os.path.abspath(path), os.path.dirname(os.path.abspath(path))
        while parent != missing and not os.path.isdir(parent):
            missing, parent = parent, os.path.dirname(parent)
        return f"no directory {path} ({missing} does not exist; {parent} does)"
    try:
        with open(os.path.join(path, "config.json")) as f:
            json.load(f)
        weights = weight_files(path)
        if not weights:
            return f"{path} holds no *.safetensors weights"
        for w in weights:
            with open(w, "rb") as f:
                f.read(8)
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _hosting_nodes() -> list[dict]:
    """Alive nodes that can host an engine or a trainer worker (some CPU or GPU)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive") and any(n.get("Resources", {}).get(r, 0) > 0 for r in ("CPU", "GPU"))]


def check_model_on_nodes(
    path: str, probe: Callable[[str], str | None] = probe_model_dir, timeout: float | None = None
) -> list[str]:
    """Prove that every node that may host an engine or trainer reads the model at `path`: a tiny
    task pinned to each alive node (this node is checked in place). Returns the node ids checked;
    raises ConfigError naming each failing node, the path and what to mount. Without Ray: nothing."""
    import ray

    if not ray.is_initialized():
        return []
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    timeout = NODE_CHECK_TIMEOUT_S if timeout is None else timeout
    here = ray.get_runtime_context().get_node_id()
    nodes = _hosting_nodes()
    task = ray.remote(probe)
    refs, failures = {}, []
    for n in nodes:
        nid = n["NodeID"]
        if nid == here:
            why = probe(path)
            if why:
                failures.append((n, why))
            continue
        strategy = NodeAffinitySchedulingStrategy(node_id=nid, soft=False)
        refs[nid] = (n, task.options(num_cpus=0, max_retries=0, scheduling_strategy=strategy).remote(path))
    if refs:
        ready, _ = ray.wait([r for _, r in refs.values()], num_returns=len(refs), timeout=timeout)
        ready = set(ready)
        for n, ref in refs.values():
            if ref not in ready:
                failures.append((n, f"the check did not answer within {timeout:.0f} s (RISE_NODE_CHECK_TIMEOUT_S)"))
                ray.cancel(ref, force=True)
                continue
            try:
                why = ray.get(ref)
            except Exception as e:  # the node died, the worker could not start
                why = f"the check failed: {type(e).__name__}: {str(e)[:300]}"
            if why:
                failures.append((n, why))
    if failures:
        lines = "\n".join(f"  node {n['NodeID']} ({n.get('NodeManagerAddress', '?')}): {why}" for n, why in failures)
        top = os.sep + os.path.abspath(path).strip(os.sep).split(os.sep)[0]
        raise ConfigError(
            f"model directory {path} is not readable on {len(failures)} of {len(nodes)} node(s) that may host an "
            f"engine or a trainer worker:\n{lines}\nEvery such node reads the model from this path: mount the "
            f"shared storage that holds it (the run directory's, e.g. the volume at {top}) at the same path on "
            "every node (cluster/README.md), or set run_dir (or RISE_MODELS_DIR) to a path on storage that "
            "every node mounts."
        )
    return [n["NodeID"] for n in nodes]


# --- every actor checks the run's storage on its own node --------------------------------------------

MARKER = ".rise-storage-marker.json"


def write_run_marker(run_dir: str) -> tuple[str, str]:
    """A file only this run's driver wrote, in its run directory: (its path, its token). An actor
    that reads the same token there sees the same storage as the driver."""
    import uuid

    from rise_ray.files import atomic_write_json

    path, token = os.path.join(os.path.abspath(run_dir), MARKER), uuid.uuid4().hex
    atomic_write_json(path, {"token": token})
    return path, token


def check_run_storage(storage: tuple[str, str] | None, model_path: str | None) -> None:
    """Run at the start of every actor that reads the run directory (engine, trainer worker, NCCL
    sender, serve replica), on its own node: it must see the driver's marker (the same token) and,
    given one, read the model directory. Nodes an autoscaler launches later are checked when their
    first actor starts. Raises RuntimeError naming this node's address and the path."""
    if storage is None and model_path is None:
        return
    import ray

    where = ray.util.get_node_ip_address() if ray.is_initialized() else "this node"
    if storage is not None:
        path, token = storage
        try:
            with open(path, encoding="utf-8") as f:
                seen = json.load(f).get("token")
            state = "another run's marker" if seen != token else ""
        except (OSError, ValueError) as e:
            state = f"missing or unreadable here ({type(e).__name__}: {e})"
        if state:
            raise RuntimeError(
                f"node {where} does not see the run directory the driver writes: {path} is {state}. "
                "Mount the shared storage at the same path on every node (cluster/README.md, "
                "'Shared storage'), or set run_dir to a path on it."
            )
    if model_path is not None and os.path.isabs(model_path) and (why := probe_model_dir(model_path)):
        raise RuntimeError(f"node {where} cannot read the model at {model_path}: {why}")


def resolve_model(cfg: ModelConfig, work_dir: str) -> str:
    """The model directory: cfg.path (any source `rise model get` takes), or the tiny model built
    (once) under work_dir; with a chat template either way (model.chat_template).

    Every node reads the same directory: a model that was fetched or converted (the hub's cache,
    ~/.cache/rise-ray: download caches on this node) is placed under work_dir's models/ (or
    $RISE_MODELS_DIR), on the run's storage; a local HF directory the user named stays as it is.
    With Ray up, every node that may host an engine or trainer is then checked to read it."""
    if cfg.path:
        path = with_chat_template(get_model(cfg.path), cfg.chat_template)
        own = os.path.isdir(cfg.path) and os.path.abspath(path) == os.path.abspath(cfg.path)
        if work_dir and not own:
            path = place_model(path, os.path.join(models_dir(work_dir), model_slug(cfg.path, path)))
        check_model_on_nodes(path)
        return path
    from rise_ray.demo.tiny import build_tiny_model

    out = os.path.join(work_dir, "base_model")
    if not os.path.exists(os.path.join(out, "config.json")):
        tmp = out + ".tmp"
        build_tiny_model(tmp, **cfg.tiny.model_dump())
        os.replace(tmp, out)
    check_model_on_nodes(out)
    return out
