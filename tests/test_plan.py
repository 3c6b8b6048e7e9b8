"""`rise run --dry-run`: the plan of every shipped config, hand-computed memory, fit verdicts."""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import types

import pytest

from rise_ray import plan as planmod
from rise_ray.cli import main
from rise_ray.config import DEFAULT_CONFIG, ConfigError, load_config, train_gpus_per_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
NO_GPU = dict(source="test", nodes=1, gpus=0, cpus=2, gpu_type=None, gpu_memory_gib=None)
# The published config.json of each model the configs name (the fields that fix its parameters).
HUB_CONFIGS = {
    "mistralai/Mistral-7B-Instruct-v0.2": dict(
        model_type="mistral", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, vocab_size=32000, tie_word_embeddings=False),
    "meta-llama/Meta-Llama-3-8B-Instruct": dict(
        model_type="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "meta-llama/Meta-Llama-3-70B-Instruct": dict(
        model_type="llama", num_hidden_layers=80, hidden_size=8192, num_attention_heads=64,
        num_key_value_heads=8, intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False),
    "Qwen/Qwen2.5-0.5B-Instruct": dict(
        model_type="qwen2", num_hidden_layers=24, hidden_size=896, num_attention_heads=14,
        num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(
        model_type="qwen2", num_hidden_layers=28, hidden_size=1536, num_attention_heads=12,
        num_key_value_heads=2, intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(
        model_type="qwen2", num_hidden_layers=28, hidden_size=3584, num_attention_heads=28,
        num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "smollm2-135m-instruct": dict(
        model_type="llama", num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
        num_key_value_heads=3, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
}  # fmt: skip


@functools.cache
def hf_model(hub_id: str):
    """The architecture transformers builds from the model's config, on the meta device (no memory):
    its parameters are what the plan's estimates must count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(HUB_CONFIGS[hub_id])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def hf_params(hub_id: str) -> int:
    return sum(p.numel() for p in hf_model(hub_id).parameters())  # a tied lm_head is counted once


def hf_lora_params(hub_id: str, r: int, targets: tuple[str, ...] | None = None) -> int:
    """A rank-r adapter on the decoder's linear layers (all, or those named in `targets`):
    r x (in + out) each (A: r x in, B: out x r)."""
    import torch

    layers = hf_model(hub_id).model.layers
    linears = [m for n, m in layers.named_modules() if isinstance(m, torch.nn.Linear)
               and (targets is None or n.rsplit(".", 1)[-1] in targets)]  # fmt: skip
    return sum(r * (m.in_features + m.out_features) for m in linears)


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def dry_run_json(capsys, monkeypatch, args, cluster=NO_GPU):
    monkeypatch.setattr(planmod, "cluster_info", lambda: dict(cluster))
    rc = main(["run", *args, "--dry-run", "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out) if rc == 0 else None


def expected_stages(iterations):
    names = ["base_model", "iter_0/eval"]
    for k in range(1, iterations + 1):
        names += [f"iter_{k}/{s}" for s in ("collect", "dataset", "train", "sync", "eval")]
    return names + ["report"]


EVAL_ONLY = [os.path.join(ROOT, "configs", "math_eval.yaml")]  # `rise eval` configs: no training problems


def test_rise_run_refuses_an_eval_only_config_before_planning_it(capsys):
    from rise_ray.cli import main

    for path in EVAL_ONLY:
        assert main(["run", path, "--dry-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert "env 'math' has no train problems: set env.train_path" in err and "\n" not in err


@pytest.mark.cpu_only  # plans against this machine: expects no GPU
@pytest.mark.parametrize("path", [None, *sorted(set(CONFIGS) - set(EVAL_ONLY))],
                         ids=lambda p: os.path.basename(p) if p else "embedded")
def test_every_config_plans(path, capsys, monkeypatch):
    rc, plan = dry_run_json(capsys, monkeypatch, [path] if path else [])
    assert rc == 0
    cfg = load_config(path or DEFAULT_CONFIG)
    r, t = cfg.rollout, cfg.train
    assert [s["stage"] for s in plan["stages"]] == expected_stages(cfg.iterations)
    actors = {a["actor"].split(" (")[0]: a for a in plan["actors"]}
    distill = r.improve_with == "teacher"
    assert set(actors) == {"policy engines", "Ray Train workers"} | (
        {"teacher engines"} if distill else set()
    )
    pol, tr = actors["policy engines"], actors["Ray Train workers"]
    assert (pol["count"], pol["gpus_each"], pol["cpus_each"]) == (
        r.num_engines,
        r.num_gpus_per_engine,
        r.num_cpus_per_engine,
    )
    assert (tr["count"], tr["gpus_each"]) == (t.num_workers, train_gpus_per_worker(cfg))
    teacher_gpus = cfg.teacher.num_engines * cfg.teacher.num_gpus_per_engine if distill else 0
    if distill:
        assert actors["teacher engines"]["count"] == cfg.teacher.num_engines
        assert actors["teacher engines"]["tp"] == cfg.teacher.tensor_parallel_size
    assert plan["gpus_needed"] == pol["gpus"] + tr["gpus"] + teacher_gpus
    stage_gpus = {s["stage"]: s["gpus"] for s in plan["stages"]}
    if cfg.iterations:
        assert stage_gpus["iter_1/train"] == tr["gpus"]
        assert stage_gpus["iter_1/collect"] == pol["gpus"] + teacher_gpus
    if plan["gpus_needed"]:
        assert plan["verdict"].startswith(f"does not fit: needs {plan['gpus_needed']} GPUs, cluster has 0")
    if path is None:
        assert plan["verdict"] == "fits" and plan["gpus_needed"] == 0
    # every shipped config names a model whose shape is known (or the tiny one): memory is estimated
    assert plan["note"] is None
    for a in plan["actors"]:
        assert (a["memory"] is not None) == (a["gpus_each"] > 0)


def test_paper_configs_fit_the_cluster_they_name(capsys, monkeypatch):
    eight = dict(NO_GPU, gpus=8, cpus=96, gpu_memory_gib=80)
    sixteen = dict(NO_GPU, gpus=16, cpus=192, nodes=2, gpu_memory_gib=80)
    for name, cluster in [
        ("gsm8k_mistral7b_self", eight),
        ("math_llama3_8b_self", eight),
        ("gsm8k_llama3_8b_distill", sixteen),
        ("math_mistral7b_distill", sixteen),
    ]:
        rc, plan = dry_run_json(capsys, monkeypatch, [os.path.join(ROOT, "configs", name + ".yaml")], cluster)
        assert rc == 0 and plan["verdict"] == "fits", (name, plan["verdict"])
    qwen = os.path.join(ROOT, "configs", "gsm8k_qwen1.5b.yaml")
    rc, plan = dry_run_json(
        capsys, monkeypatch, [qwen, "--gpu-memory-gb", "24"], dict(NO_GPU, gpus=4, cpus=48)
    )
    assert plan["gpu_memory_gib"] == 24 and plan["verdict"] == "fits"


def test_memory_of_an_8b_model_by_hand():
    """Llama-3-8B, bf16, ZeRO-3 over 8 workers: (2 + 2 + 12) bytes x P / 8 = 2 bytes x P per GPU, with
    P the parameters of the model transformers builds from its config."""
    p8b = hf_params("meta-llama/Meta-Llama-3-8B-Instruct")
    over = [
        "model.path=meta-llama/Meta-Llama-3-8B-Instruct",
        "model.dtype=bfloat16",
        "model.max_model_len=4096",
        "rollout.engine=vllm",
        "rollout.num_gpus_per_engine=1",
        "rollout.gpu_memory_utilization=0.9",
        "train.use_gpu=true",
        "train.num_workers=8",
        "train.zero_stage=3",
        "train.micro_batch_size=1",
        "train.gradient_checkpointing=true",
        "data.max_length=2048",
    ]
    cluster = dict(NO_GPU, gpus=9, cpus=64, gpu_memory_gib=80)
    plan = planmod.build_plan(load_config(None, over), cluster=cluster)
    assert plan["params"] == p8b and plan["verdict"] == "fits"
    engine, trainer = plan["actors"][0]["memory"], plan["actors"][1]["memory"]
    assert engine["weights"] == 2 * p8b  # bf16, TP 1
    kv = 0.9 * 80 * 2**30 - 2 * p8b
    assert engine["kv"] == kv
    assert engine["kv_tokens"] == kv // (2 * 32 * 8 * 128 * 2)  # K+V x layers x kv heads x head dim x bf16
    assert (trainer["weights"], trainer["grads"], trainer["optim"]) == (
        2 * p8b / 8,
        2 * p8b / 8,
        12 * p8b / 8,
    )
    tokens = 2048
    act = 32 * tokens * 4096 * 2 + tokens * (10 * 4096 + 4 * 14336) * 2 + tokens * 128256 * 10
    assert trainer["act"] == act and trainer["total"] == 2 * p8b + act

    # ZeRO-1 shards only Adam; offload with ZeRO-3 moves weights and Adam to CPU; LoRA trains the adapter
    def trainer_of(*extra):
        return planmod.build_plan(load_config(None, over + list(extra)), cluster=cluster)["actors"][1][
            "memory"
        ]

    m = trainer_of("train.zero_stage=1")
    assert (m["weights"], m["grads"], m["optim"]) == (2 * p8b, 2 * p8b, 12 * p8b / 8)
    m = trainer_of("train.offload=true")
    assert (m["weights"], m["grads"], m["optim"]) == (0, 2 * p8b / 8, 0)
    lora = hf_lora_params("meta-llama/Meta-Llama-3-8B-Instruct", 16)
    m = trainer_of("train.lora.enabled=true", "train.lora.r=16")
    assert (m["weights"], m["grads"], m["optim"]) == (2 * p8b / 8, 2 * lora / 8, 12 * lora / 8)
    only = ["train.lora.enabled=true", "train.lora.r=8", "train.lora.target_modules=[q_proj, v_proj]"]
    q_v = hf_lora_params("meta-llama/Meta-Llama-3-8B-Instruct", 8, ("q_proj", "v_proj"))
    assert 0 < q_v < lora and trainer_of(*only)["optim"] == 12 * q_v / 8


def test_tensor_parallel_colocation_and_memory_verdicts():
    path = os.path.join(ROOT, "configs", "gsm8k_mistral7b_self.yaml")
    cluster = dict(NO_GPU, gpus=8, cpus=96, gpu_memory_gib=80)
    share = ["rollout.colocate_with_trainer=true", "rollout.num_gpus_per_engine=0.6"]
    colocated = planmod.build_plan(load_config(path, share), cluster=cluster)
    assert colocated["gpus_needed"] == 4  # the trainer runs on the engines' GPUs while they sleep
    workers = next(a for a in colocated["actors"] if a["actor"] == "Ray Train workers")
    assert workers["gpus_each"] == 0.4  # what the engine leaves of each GPU
    with pytest.raises(ConfigError, match="num_gpus_per_engine between 0.5 and 1"):
        load_config(path, ["rollout.colocate_with_trainer=true"])  # a whole GPU per engine leaves none
    tp = planmod.build_plan(load_config(path, ["rollout.tensor_parallel_size=2"]), cluster=cluster)
    assert "tensor_parallel_size 2 needs 2 GPUs per engine" in tp["verdict"]
    small = planmod.build_plan(load_config(path), gpu_memory_gb=16, cluster=cluster)
    assert "Ray Train workers: per-GPU memory" in small["verdict"] and "> 16.0 GiB" in small["verdict"]
    # a 70B teacher on one GPU: its bf16 weights + the KV cache of one sequence > 0.85 x 80 GiB
    distill = os.path.join(ROOT, "configs", "gsm8k_llama3_8b_distill.yaml")
    one = ["teacher.tensor_parallel_size=1", "teacher.num_gpus_per_engine=1"]
    cfg = load_config(distill, one)
    seq = cfg.teacher.max_model_len or planmod.DEFAULT_CONTEXT
    need = 2 * hf_params("meta-llama/Meta-Llama-3-70B-Instruct") + 2 * 80 * 8 * 128 * 2 * seq  # K+V, layers, kv heads
    v = planmod.build_plan(cfg, cluster=dict(cluster, gpus=16))["verdict"]
    assert f"teacher engines (vllm): per-GPU memory {need / 2**30:.1f} GiB" in v and "> 68.0 GiB" in v


@pytest.mark.parametrize("hub_id", sorted(HUB_CONFIGS))
def test_parameter_counts_are_the_architectures_transformers_builds(hub_id, tmp_path):
    assert planmod.count_params(planmod.model_shape(hub_id)) == hf_params(hub_id)  # the built-in table
    # a local directory: its config.json is read (here the same model's fields)
    (tmp_path / "config.json").write_text(json.dumps(HUB_CONFIGS[hub_id]))
    assert planmod.count_params(planmod.model_shape(str(tmp_path))) == hf_params(hub_id)


def test_every_model_the_configs_name_has_a_checked_count():
    named = set()
    for path in CONFIGS:
        cfg = load_config(path)
        named |= {p for p in (cfg.model.path, cfg.teacher.path) if p}
    assert named <= set(HUB_CONFIGS)  # so the test above checks each one's estimate
    assert set(planmod.KNOWN) <= set(HUB_CONFIGS)
    assert planmod.model_shape("someone/unknown-model") is None


def test_tiny_model_count_matches_the_built_model(tiny_model_dir):
    from safetensors import safe_open

    with safe_open(os.path.join(tiny_model_dir, "model.safetensors"), "pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (tied lm_head: once)
    assert planmod.count_params(planmod.model_shape(tiny_model_dir)) == stored


def test_unknown_model_bad_config_and_strict(tmp_path, capsys, monkeypatch):
    rc, plan = dry_run_json(
        capsys, monkeypatch, ["model.path=someone/unknown-model", "rollout.num_gpus_per_engine=1"]
    )
    assert rc == 0 and "memory not estimated" in plan["note"] and plan["actors"][0]["memory"] is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  num_engines: 0\n")
    assert main(["run", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "rollout.num_engines" in err and "Traceback" not in err
    monkeypatch.setattr(planmod, "cluster_info", lambda: dict(NO_GPU))
    assert main(["run", os.path.join(ROOT, "configs", "gsm8k_qwen0.5b.yaml"), "--dry-run", "--strict"]) == 1
    assert "does not fit: needs 1 GPUs, cluster has 0" in capsys.readouterr().out
    assert main(["run", "--resume", str(tmp_path), "--dry-run"]) == 2


def test_cluster_from_ray_address(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw["address"])),
        shutdown=lambda: calls.append(("shutdown",)),
        cluster_resources=lambda: {"CPU": 192.0, "GPU": 16.0, "accelerator_type:A100-80G": 16.0},
        nodes=lambda: [{"Alive": True, "Resources": {"GPU": 8.0}}, {"Alive": True, "Resources": {"GPU": 8.0}},
                       {"Alive": False}],
    )
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    c = planmod.cluster_info()
    assert (c["gpus"], c["cpus"], c["nodes"], c["gpu_type"], c["gpu_memory_gib"]) == (
        16,
        192,
        2,
        "A100-80G",
        80,
    )
    assert calls == [("init", "10.0.0.1:6379"), ("shutdown",)] and c["node_gpus"] == [8, 8]
    plan = planmod.build_plan(load_config(os.path.join(ROOT, "configs", "math_mistral7b_distill.yaml")))
    assert plan["verdict"] == "fits"


@pytest.mark.cpu_only  # "a GPU config does not fit" on this machine
def test_dry_run_subprocess_starts_nothing():
    """The real CLI on this machine: no vLLM or DeepSpeed import, no Ray started, a GPU config does not fit."""
    code = (
        "import io, sys, contextlib\n"
        "from rise_ray.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    rc1 = main(['run', '--dry-run'])\n"
        "    rc2 = main(['run', 'configs/gsm8k_llama3_8b_distill.yaml', '--dry-run'])\n"
        "ray = sys.modules.get('ray')\n"
        "heavy = 'vllm' in sys.modules or 'deepspeed' in sys.modules\n"
        "print(rc1, rc2, heavy, bool(ray and ray.is_initialized()))\n"
        "print(out.getvalue())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    first, rest = res.stdout.split("\n", 1)
    rc1, rc2, heavy, ray_started = first.split()
    assert (rc1, rc2, heavy, ray_started) == ("0", "0", "False", "False")
    default, distill = rest.split("Plan for gsm8k-llama3-8b-distill")
    assert default.rstrip().endswith("fits") and "Stages" in default and "iter_2/sync" in default
    assert "does not fit: needs 16 GPUs" in " ".join(distill.split())


def test_dry_run_checks_fit_per_node_not_only_cluster_totals():
    path = os.path.join(ROOT, "configs", "gsm8k_llama3_8b_distill.yaml")
    cfg = load_config(path)
    need = cfg.teacher.num_engines * cfg.teacher.tensor_parallel_size + cfg.rollout.num_engines + cfg.train.num_workers
    one_node = dict(NO_GPU, gpus=16, cpus=192, gpu_memory_gib=80, nodes=1, node_gpus=[16])
    assert planmod.build_plan(cfg, cluster=one_node)["verdict"] == "fits"
    # the same 16 GPUs as 16 one-GPU nodes: the teacher's tensor-parallel engine needs 4 on one node
    split = dict(one_node, nodes=16, node_gpus=[1] * 16)
    plan = planmod.build_plan(cfg, cluster=split)
    assert need <= 16 and plan["gpus_needed"] <= 16  # the totals fit
    assert "teacher engines (vllm) 1 of 1 (4 GPUs) fits on no node" in plan["verdict"]
    # colocated fractions: two 0.6 engines and two 0.4 workers fit two GPUs; on one GPU they do not
    co = load_config(os.path.join(ROOT, "configs", "gsm8k_qwen0.5b.yaml"), ["rollout.num_engines=2", "train.num_workers=2"])
    two = dict(NO_GPU, gpus=2, cpus=16, gpu_memory_gib=80, node_gpus=[1, 1])
    assert planmod.build_plan(co, cluster=two)["verdict"] == "fits"
    assert planmod.place_on_nodes([2], [("engine", 2, 0.4), ("worker", 2, 0.6)]) == [
        "worker 2 of 2 (0.6 GPUs) fits on no node (GPUs per node: [2])"
    ]  # what Ray does with 0.4 engines: both on GPU 0 (best-fit), then one worker has no GPU


def test_a_cluster_file_that_scales_from_zero_is_planned_at_its_autoscalers_limit(tmp_path, capsys, monkeypatch):
    """`rise run CONFIG --dry-run --cluster-yaml FILE`: workers at min_workers 0 are counted at
    their max_workers (within the file's max_workers); no Ray is started or joined."""
    from rise_ray import cli

    def cluster_file(gpu_workers: int, cap: int) -> str:
        path = tmp_path / f"c{gpu_workers}_{cap}.yaml"
        spec = {
            "cluster_name": "t", "max_workers": cap, "head_node_type": "head",
            "available_node_types": {
                "head": {"resources": {"CPU": 8}, "node_config": {}},
                "gpu8": {"min_workers": 0, "max_workers": gpu_workers, "resources": {"CPU": 96, "GPU": 8}, "node_config": {}},
                "cpu": {"min_workers": 0, "max_workers": 4, "resources": {"CPU": 16}, "node_config": {}},
            },
        }  # fmt: skip
        path.write_text(json.dumps(spec))  # JSON is YAML
        return str(path)

    config = os.path.join(ROOT, "configs", "gsm8k_mistral7b_self.yaml")  # 8 GPUs: 4 engines, 4 trainers
    assert cli.main(["run", config, "--dry-run", "--json", "--cluster-yaml", cluster_file(1, 5)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["verdict"] == "fits" and plan["cluster"]["node_gpus"] == [0, 8, 0, 0, 0, 0]
    assert "up to 1 x gpu8, 4 x cpu" in plan["cluster"]["source"]
    # the file's max_workers leaves no room for the GPU node: the plan does not fit
    cli.main(["run", config, "--dry-run", "--json", "--cluster-yaml", cluster_file(1, 0)])
    assert json.loads(capsys.readouterr().out)["verdict"].startswith("does not fit: needs 8 GPUs, cluster has 0")

    # On a launcher-started cluster's head (`ray job submit`), the launcher's own copy of the file is
    # read, and the cluster at RAY_ADDRESS is not joined (nothing listens at this address).
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(cluster_file(2, 5), home / "ray_bootstrap_config.yaml")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert cli.main(["run", config, "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["verdict"] == "fits" and "up to 2 x gpu8, 3 x cpu" in plan["cluster"]["source"]


def test_the_solver_teacher_is_planned_as_an_engine_with_no_model_and_no_gpu(capsys, monkeypatch):
    """docs/results.md's programmatic-teacher run, planned: the solver engines hold no model and no
    GPU, and the plan is not marked as missing a model shape."""
    config = os.path.join(ROOT, "configs", "smollm2_arithmetic.yaml")
    solver = ["rollout.improve_with=teacher", "teacher.engine=solver", "teacher.num_cpus_per_engine=0.1",
              "rollout.best_of_n=1"]
    rc, plan = dry_run_json(capsys, monkeypatch, [config, *solver])
    assert rc == 0
    teacher = next(a for a in plan["actors"] if a["actor"].startswith("teacher engines"))
    assert teacher["actor"] == "teacher engines (solver)" and teacher["model"] == "none (programmatic solver)"
    assert (teacher["count"], teacher["gpus"], teacher["cpus_each"], teacher["memory"]) == (1, 0, 0.1, None)
    collect = next(s for s in plan["stages"] if s["stage"] == "iter_1/collect")
    assert "teacher engines (CPU)" in collect["runs_on"] and collect["gpus"] == 0
    assert plan["note"] is None and plan["verdict"] == "fits"
    assert main(["run", config, *solver, "--dry-run"]) == 0  # the printed table too
    assert "none (programmatic solver)" in capsys.readouterr().out


@pytest.mark.parametrize("broken", [
    ["env.options.bogus=1"],
    ["env.name=nosuch"],
    ["model.path=/nonexistent"],
    ["model.path=/tmp"],  # a directory that is not a model
    ["model.path=someone/model", "rollout.improve_with=teacher", "teacher.path=./missing-teacher"],
    ["env.name=gsm8k", "env.options={}", "env.test_path=openai/gsm8k", "env.train_path=/nonexistent/train.jsonl"],
    ["env.name=gsm8k", "env.options={}", "env.test_path=openai/gsm8k", "model.path=someone/model"],  # no train data
    ["env.name=gsm8k", "env.options={}", "env.test_path=openai/gsm8k", "env.train_path=openai/gsm8k"],  # warm-up
    ["env.options.num_val=0", "eval.split=val", "model.path=someone/model"],
    ["env.name=arithmetic", "env.options={}", "env.train_path=openai/gsm8k"],  # it generates its problems
    *([["observe.tracking=mlflow"]] if importlib.util.find_spec("mlflow") is None else []),
], ids=lambda b: b[-1])
def test_dry_run_refuses_what_rise_run_refuses_with_the_same_line(broken, capsys, monkeypatch, tmp_path):
    """One decision (preflight.check_run) for both, before Ray: `rise run` itself stops there (past
    its run directory's checks), so this runs nothing; --dry-run gave `fits` for these before."""
    monkeypatch.chdir(tmp_path)  # the run's directory: runs/default here
    assert main(["run", *broken, "--dry-run"]) == 2
    dry = capsys.readouterr()
    assert main(["run", *broken]) == 2
    run = capsys.readouterr()
    assert dry.err == run.err and dry.err.startswith("rise: ") and dry.err.count("\n") == 1, dry.err
    assert "fits" not in dry.out and "Traceback" not in dry.err
