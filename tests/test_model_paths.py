"""Every node reads the same model (issue 30, items 1 and 9).

A model that was fetched or converted (hub snapshot, GGUF, packaged) lives in a download cache on
the driver's node; resolve_model places it in the run directory (hard links, or a copy across
filesystems) and, with Ray up, checks on every node that the directory is there and readable. The
per-node check runs on a real two-node Ray cluster (ray.cluster_utils.Cluster) on this machine.
Hub snapshots fetch one weight format, and the size estimates count what is loaded.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from rise_ray.config import ConfigError, ModelConfig
from rise_ray.models import placement, source
from rise_ray.session import resolve_model

# --- a hub snapshot, faked in the hub's cache layout ----------------------------------------------


def _fake_hub(tmp_path, tiny_model_dir, monkeypatch, extra: dict[str, bytes] | None = None):
    """A hub cache holding `org/tiny` as huggingface_hub lays it out (snapshots/<rev>/ of links into
    blobs/), and snapshot_download / the repo listing pointed at it. Returns (snapshot dir, calls)."""
    import huggingface_hub

    repo = tmp_path / "hfcache" / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    files = {f: Path(tiny_model_dir, f).read_bytes() for f in os.listdir(tiny_model_dir)}
    files.update(extra or {})
    for i, (name, data) in enumerate(sorted(files.items())):
        (blobs / f"blob{i}").write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", f"blob{i}"), snap / name)
    calls = []

    def snapshot_download(repo_id, local_dir=None, allow_patterns=None, ignore_patterns=None, **kw):
        calls.append({"repo_id": repo_id, "allow": allow_patterns, "ignore": ignore_patterns})
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(
        source, "_repo_files", lambda repo_id: {n: len(d) for n, d in files.items()}, raising=False
    )
    return snap, calls


def test_a_hub_model_is_placed_in_the_run_directory(tmp_path, tiny_model_dir, monkeypatch):
    snap, calls = _fake_hub(tmp_path, tiny_model_dir, monkeypatch)
    work = tmp_path / "runs" / "r"
    path = resolve_model(ModelConfig(path="org/tiny"), str(work))
    assert os.path.dirname(path) == str(work / "models") and os.path.basename(path).startswith("org--tiny-")
    assert sorted(os.listdir(path)) == sorted(os.listdir(snap))
    for f in os.listdir(path):
        assert not os.path.islink(os.path.join(path, f)), f  # real files, not links into this node's cache
        assert os.path.samefile(os.path.join(path, f), os.path.realpath(snap / f))  # hard links: no copy
    assert resolve_model(ModelConfig(path="org/tiny"), str(work)) == path  # placed once
    assert len(os.listdir(work / "models")) == 1
    # The cache stays a download cache: still there, untouched.
    assert all(os.path.islink(snap / f) for f in os.listdir(snap))
    assert calls[0]["repo_id"] == "org/tiny"


def test_across_filesystems_the_model_is_copied(tmp_path, tiny_model_dir, monkeypatch):
    snap, _ = _fake_hub(tmp_path, tiny_model_dir, monkeypatch)

    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    path = resolve_model(ModelConfig(path="org/tiny"), str(tmp_path / "run"))
    for f in os.listdir(path):
        real = os.path.join(path, f)
        assert not os.path.islink(real) and not os.path.samefile(real, os.path.realpath(snap / f))
        assert Path(real).read_bytes() == (snap / f).read_bytes()


def test_models_dir_and_what_stays_where_it_is(tmp_path, tiny_model_dir, monkeypatch):
    _fake_hub(tmp_path, tiny_model_dir, monkeypatch)
    shared = tmp_path / "shared-models"
    monkeypatch.setenv("RISE_MODELS_DIR", str(shared))
    path = resolve_model(ModelConfig(path="org/tiny"), str(tmp_path / "run"))
    assert os.path.dirname(path) == str(shared)
    # A local HF directory the user named is used where it is.
    assert resolve_model(ModelConfig(path=tiny_model_dir), str(tmp_path / "run")) == tiny_model_dir
    # No run directory to place it in (work_dir ""): the resolved directory as it is.
    monkeypatch.delenv("RISE_MODELS_DIR")
    assert "snapshots" in resolve_model(ModelConfig(path="org/tiny"), "")


def test_a_converted_model_is_placed_too(tmp_path, tiny_model_dir, monkeypatch):
    """A .gguf (or packaged) model converts into the cache; the run reads its copy in the run dir."""
    monkeypatch.setenv("RISE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    monkeypatch.setattr(
        source, "convert_gguf", lambda src, out: shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    )
    path = resolve_model(ModelConfig(path=str(gguf)), str(tmp_path / "run"))
    assert path.startswith(str(tmp_path / "run" / "models" / "m.gguf-"))
    assert source.is_model_dir(path) and not path.startswith(str(tmp_path / "cache"))


# --- item 9: one weight format, sizes of what is loaded -------------------------------------------

MISTRAL_LIKE = {
    "config.json": 600, "generation_config.json": 100, "params.json": 200, "tokenizer.json": 1_800_000,
    "tokenizer_config.json": 140_000, "tokenizer.model": 590_000, "special_tokens_map.json": 400,
    "model.safetensors.index.json": 24_000, "consolidated.safetensors": 14_496_000_000,
    "model-00001-of-00003.safetensors": 4_950_000_000, "model-00002-of-00003.safetensors": 5_000_000_000,
    "model-00003-of-00003.safetensors": 4_546_000_000, "pytorch_model.bin": 14_500_000_000, "README.md": 5000,
}  # fmt: skip


def test_a_snapshot_fetches_one_weight_format_and_counts_it():
    pick = source.hub_selection(MISTRAL_LIKE)
    assert "consolidated.safetensors" not in pick.files and "pytorch_model.bin" not in pick.files
    assert {n for n in pick.files if n.endswith(".safetensors")} == {
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    }
    shards = sum(v for n, v in MISTRAL_LIKE.items() if n.startswith("model-"))
    assert shards <= pick.bytes < shards + 3_000_000  # the loaded weights and small files, not both formats
    # A repo with Mistral's format only keeps it (there is nothing else to load).
    only = {n: v for n, v in MISTRAL_LIKE.items() if not n.startswith("model-")}
    assert "consolidated.safetensors" in source.hub_selection(only).files


def test_the_download_skips_consolidated_weights(tmp_path, tiny_model_dir, monkeypatch):
    from huggingface_hub.utils import filter_repo_objects

    _, calls = _fake_hub(tmp_path, tiny_model_dir, monkeypatch, extra={"consolidated.safetensors": b"x" * 64})
    source.get_model("org/tiny")
    (call,) = calls
    fetched = set(filter_repo_objects(["model.safetensors", "consolidated.safetensors", "config.json"],
                                      allow_patterns=call["allow"], ignore_patterns=call["ignore"]))  # fmt: skip
    assert fetched == {"model.safetensors", "config.json"}


def test_weight_sizes_count_what_is_loaded(tmp_path, tiny_model_dir):
    """A directory with HF-format weights and a consolidated copy beside them: the sync check's
    memory estimate (checkpoint_params) and the state dict read only the former."""
    from safetensors.torch import load_file, save_file

    from rise_ray.rollout.sync import checkpoint_params, load_state_dict

    both = tmp_path / "both"
    shutil.copytree(tiny_model_dir, both)
    state = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    save_file({f"layers.{k}": v.clone() for k, v in state.items()}, str(both / "consolidated.safetensors"))
    assert (
        checkpoint_params(str(both))
        == checkpoint_params(tiny_model_dir)
        == sum(t.numel() for t in state.values())
    )
    assert set(load_state_dict(str(both))) == set(state)
    assert source.weight_files(str(both)) == [str(both / "model.safetensors")]


def test_a_shard_index_names_the_loaded_files(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    for n in ("a.safetensors", "b.safetensors", "stray.safetensors"):
        (d / n).write_bytes(b"")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}})
    )
    assert source.weight_files(str(d)) == [str(d / "a.safetensors"), str(d / "b.safetensors")]


# --- the per-node check, on a two-node cluster ----------------------------------------------------


def _unadvertise(address: str) -> None:
    """Ray writes the head's address to /tmp/ray/ray_current_cluster, where a plain ray.init() of
    another process on this machine would find this test's cluster and join it: remove it."""
    path = "/tmp/ray/ray_current_cluster"
    try:
        with open(path) as f:
            if f.read().strip() == address:
                os.remove(path)
    except OSError:
        pass


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    _unadvertise(cluster.address)
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        yield ray
    finally:
        ray.shutdown()
        cluster.shutdown()


def _other_node(ray) -> str:
    here = ray.get_runtime_context().get_node_id()
    (other,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    return other


@pytest.mark.timeout(300)
def test_every_node_reads_the_model(two_nodes, tiny_model_dir, tmp_path):
    ray = two_nodes
    seen = tmp_path / "seen"
    seen.mkdir()

    def probe(path):  # the real probe, and a note of the node it ran on
        import ray as r

        (seen / r.get_runtime_context().get_node_id()).touch()
        return placement.probe_model_dir(path)

    checked = placement.check_model_on_nodes(tiny_model_dir, probe=probe)
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 2 and set(checked) == alive == set(os.listdir(seen))
    # resolve_model runs the check itself once Ray is up.
    assert resolve_model(ModelConfig(path=tiny_model_dir), str(tmp_path / "run")) == tiny_model_dir


@pytest.mark.timeout(300)
def test_a_node_without_the_mount_is_named_with_the_path(two_nodes, tiny_model_dir):
    """The worker node sees the machine's filesystem without the volume that holds the model (here:
    the model's path looked up under a root where nothing is mounted)."""
    ray = two_nodes
    other, here = _other_node(ray), ray.get_runtime_context().get_node_id()

    def probe(path):
        import ray as r

        unmounted = r.get_runtime_context().get_node_id() == other
        return placement.probe_model_dir("/nonexistent-mount" + path if unmounted else path)

    with pytest.raises(ConfigError) as e:
        placement.check_model_on_nodes(tiny_model_dir, probe=probe)
    msg = str(e.value)
    assert f"node {other}" in msg and f"node {here}" not in msg and "1 of 2 node(s)" in msg
    assert tiny_model_dir in msg and "/nonexistent-mount does not exist" in msg and "mount" in msg


@pytest.mark.timeout(300)
def test_a_missing_model_fails_on_every_node(two_nodes, tmp_path):
    missing = str(tmp_path / "nowhere" / "model")
    with pytest.raises(ConfigError) as e:
        placement.check_model_on_nodes(missing)
    msg = str(e.value)
    assert "2 of 2 node(s)" in msg and all(
        f"node {n['NodeID']}" in msg for n in two_nodes.nodes() if n["Alive"]
    )
    assert f"{tmp_path / 'nowhere'} does not exist" in msg and "run_dir" in msg
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds no \\*.safetensors"):
        placement.check_model_on_nodes(str(tmp_path / "bad"))
