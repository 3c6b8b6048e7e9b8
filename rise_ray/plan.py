"""`rise run CONFIG --dry-run`: what a run would do and need, without doing any of it.

The config is checked as `rise run` checks it before it starts (load_config, then
preflight.check_run: the same refusals, the same messages), then the plan is printed: the stages
in order, the actors and their resources, the memory each GPU is expected to hold, and whether
that fits the cluster it sees (RAY_ADDRESS: joined only to read its resources; else this machine). Nothing is started: no
Ray without RAY_ADDRESS, no vLLM, no download (shapes come from a local config.json, the built-in
table below, or model.tiny). Memory figures are estimates (no CUDA context, allocator slack or
DeepSpeed buffers): leave a few GiB of headroom.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any

from rise_ray.config import ConfigError, RunConfig, TrainConfig, read_yaml, train_gpus_per_worker

GiB = 2**30
# Shapes of the hub ids used in configs/ (their config.json): layers, hidden, heads, kv heads,
# intermediate (MLP), vocab, tied embeddings, q/k/v bias. Parameters are counted from the shape.
KNOWN = {
    "mistralai/Mistral-7B-Instruct-v0.2": (32, 4096, 32, 8, 14336, 32000, False, False),
    "meta-llama/Meta-Llama-3-8B-Instruct": (32, 4096, 32, 8, 14336, 128256, False, False),
    "meta-llama/Meta-Llama-3-70B-Instruct": (80, 8192, 64, 8, 28672, 128256, False, False),
    "Qwen/Qwen2.5-0.5B-Instruct": (24, 896, 14, 2, 4864, 151936, True, True),
    "Qwen/Qwen2.5-1.5B-Instruct": (28, 1536, 12, 2, 8960, 151936, True, True),
    "Qwen/Qwen2.5-7B-Instruct": (28, 3584, 28, 4, 18944, 152064, False, True),
    "smollm2-135m-instruct": (30, 576, 9, 3, 1536, 49152, True, False),
}
DEFAULT_CONTEXT = 4096  # max_model_len assumed for a model whose own context is not known here
FIELDS = ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "tied", "qkv_bias")
HF_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads")
HF_KEYS += ("intermediate_size", "vocab_size")
UNKNOWN = "model shape unknown (not a local directory, not in plan.KNOWN): memory not estimated"
GPU_GIB = {"H100": 80, "H200": 141, "A10G": 24, "L4": 24, "T4": 16, "L40S": 48, "A40": 48, "V100": 16}


def model_shape(path: str | None, tiny: Any = None) -> dict[str, Any] | None:
    """The model's shape: model.tiny, a local config.json, or the table; None when unknown."""
    head_dim = context = None
    if path is None:
        from rise_ray.demo.tiny import PHRASES, VOCAB

        t = tiny
        vals = [t.num_layers, t.hidden_size, t.num_heads, t.num_heads, t.intermediate_size]
        vals += [len(VOCAB) + len(PHRASES), True, False]  # tied embeddings, no bias
    elif os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
        c.setdefault("num_key_value_heads", c.get("num_attention_heads"))
        if any(c.get(k) is None for k in HF_KEYS):
            return None
        bias = c.get("attention_bias", c.get("model_type") == "qwen2")
        vals = [c[k] for k in HF_KEYS] + [c.get("tie_word_embeddings", False), bias]
        head_dim = c.get("head_dim")
        context = c.get("max_position_embeddings")
    elif path in KNOWN:
        vals = KNOWN[path]
    else:
        return None
    s = dict(zip(FIELDS, vals, strict=True))
    return {**s, "head_dim": head_dim or s["hidden"] // s["heads"], "context": context}


def linears(s: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one decoder layer (Llama / Mistral / Qwen2)."""
    h, d, i = s["hidden"], s["head_dim"], s["intermediate"]
    q, kv = s["heads"] * d, s["kv_heads"] * d
    attn = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
    return {**attn, "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def count_params(s: dict) -> int:
    """layers x (linears + q/k/v bias + 2 norms) + embeddings (x2 when not tied) + final norm."""
    bias = (s["heads"] + 2 * s["kv_heads"]) * s["head_dim"] if s["qkv_bias"] else 0
    layer = sum(a * b for a, b in linears(s).values()) + bias + 2 * s["hidden"]
    return s["layers"] * layer + s["vocab"] * s["hidden"] * (1 if s["tied"] else 2) + s["hidden"]


def lora_params(s: dict, lora: Any) -> int:
    """A rank-r adapter on a linear (in, out) adds r x (in + out) parameters (lm_head excluded)."""
    names = linears(s)
    chosen = names if lora.target_modules == "all-linear" else [n for n in names if n in lora.target_modules]
    return s["layers"] * lora.r * sum(sum(names[n]) for n in chosen)


def engine_memory(s: dict, nbytes: int, tp: int, util: float, gpu_gib: float, max_len: int) -> dict:
    """vLLM on one GPU: it takes util x GPU memory; the weights (params x bytes / TP) come first and
    the rest is KV cache. A token's KV = 2 (K, V) x layers x kv heads (split over TP) x head dim x bytes.
    vLLM refuses to start without room for one max_model_len sequence: that is what it needs."""
    weights = count_params(s) * nbytes / tp
    budget = util * gpu_gib * GiB
    per_token = 2 * s["layers"] * max(1, s["kv_heads"] // tp) * s["head_dim"] * nbytes
    kv = max(budget - weights, 0.0)
    tokens = int(kv // per_token)
    note = f"util {util:g}: KV {tokens:,} tokens = {tokens / max_len:.1f} seqs of {max_len}"
    m = dict(weights=weights, kv=kv, kv_tokens=tokens, total=budget, limit=budget, note=note)
    return {**m, "need": weights + per_token * max_len}


def trainer_memory(s: dict, t: TrainConfig, max_length: int) -> dict:
    """One Ray Train worker's GPU. Mixed precision (bf16): weights 2 + grads 2 + Adam 12 (fp32 master,
    m, v) bytes per trained param; fp32: 4 + 4 + 8. ZeRO over the workers: stage 1 shards the
    optimizer, 2 also the grads, 3 also the weights; offload moves the optimizer (and ZeRO-3's
    weights) to CPU. LoRA: the base weights stay, grads and Adam only for the adapter.
    Activations of micro_batch_size x data.max_length tokens (bf16: 2 bytes): a layer keeps about
    10h + 4I values per token (norms, q/k/v, attention output, SwiGLU; flash attention stores no
    scores); gradient checkpointing keeps only each layer's input (h) and recomputes one layer at a
    time. Logits: 2 bytes + an fp32 copy and log-softmax (8) per vocab entry per token."""
    bf16 = t.use_gpu if t.bf16 == "auto" else t.bf16
    w, p, n = (2 if bf16 else 4), count_params(s), t.num_workers
    trained = lora_params(s, t.lora) if t.lora.enabled else p
    weights, grads, optim = w * p, w * trained, (12 if bf16 else 8) * trained
    optim /= n if t.zero_stage >= 1 else 1
    grads /= n if t.zero_stage >= 2 else 1
    weights /= n if t.zero_stage == 3 else 1
    if t.offload:
        optim, weights = 0, (0 if t.zero_stage == 3 else weights)
    tokens, h = t.micro_batch_size * max_length, s["hidden"]
    layer = tokens * (10 * h + 4 * s["intermediate"]) * w
    act = (s["layers"] * tokens * h * w + layer) if t.gradient_checkpointing else s["layers"] * layer
    act += tokens * s["vocab"] * (w + 8)
    total = weights + grads + optim + act
    note = f"ZeRO-{t.zero_stage} over {n}" + " offload" * t.offload + " LoRA" * t.lora.enabled
    return dict(weights=weights, grads=grads, optim=optim, act=act, total=total, need=total, note=note)


def cluster_info() -> dict[str, Any]:
    """GPUs, their type and memory, CPUs: of the Ray cluster at RAY_ADDRESS, else of this machine."""
    addr = os.environ.get("RAY_ADDRESS")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    gpus, mem, gpu_type, nodes, node_gpus = 0, None, None, 1, None
    if addr:
        import ray

        ray.init(address=addr, log_to_driver=False, logging_level="ERROR")  # joins; starts nothing
        try:
            alive = [n for n in ray.nodes() if n.get("Alive")]
            res, nodes = ray.cluster_resources(), len(alive)
            if all("Resources" in n for n in alive):
                node_gpus = [int(n["Resources"].get("GPU", 0)) for n in alive]
        finally:
            ray.shutdown()
        gpus, cpus, source = int(res.get("GPU", 0)), res.get("CPU", 0), f"Ray cluster at {addr}"
        types = sorted({k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")})
        if types:  # Ray names types like "A100-80G" or "H100"; GPU memory is not a Ray resource
            gpu_type, m = ",".join(types), re.search(r"(\d+)GB?$", types[0])
            mem = float(m.group(1)) if m else GPU_GIB.get(types[0])
    else:
        source = "this machine (RAY_ADDRESS unset)"
        if any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/kfd")):  # no GPU driver: no torch import
            import torch

            if torch.cuda.is_available():
                props = torch.cuda.get_device_properties(0)
                gpus, mem, gpu_type = torch.cuda.device_count(), props.total_memory / GiB, props.name
    node_gpus = node_gpus if node_gpus is not None else [gpus]
    return dict(source=source, nodes=nodes, gpus=gpus, cpus=cpus, gpu_type=gpu_type, gpu_memory_gib=mem,
                node_gpus=node_gpus)


def cluster_from_yaml(path: str) -> dict[str, Any]:
    """The cluster a Ray cluster launcher file can grow to: the head, and each worker type at its
    max_workers (within the file's max_workers), by the resources each type declares. A cluster
    that starts its workers at zero is planned at the size its autoscaler may reach, not the nodes
    up now."""
    if not os.path.isfile(path):
        raise ConfigError(f"--cluster-yaml {path}: no such file")
    spec = read_yaml(path)  # not YAML, or not a mapping: a ConfigError naming the file (and the line)
    types, head = spec.get("available_node_types") or {}, spec.get("head_node_type")
    if not types or head not in types:
        raise ConfigError(f"--cluster-yaml {path}: no available_node_types with the head_node_type {head!r}: not a Ray cluster file")
    room = int(spec.get("max_workers", sum(int(t.get("max_workers", 0)) for t in types.values())))
    nodes: list[tuple[str, dict]] = [(head, types[head].get("resources") or {})]
    for name, t in types.items():
        if name != head:
            n = min(int(t.get("max_workers", 0)), room)
            room -= n
            nodes += [(name, t.get("resources") or {})] * n
    counts = {n: sum(x == n for x, _ in nodes) for n in types if n != head}
    launch = ", ".join(f"{k} x {n}" for n, k in counts.items() if k)
    return dict(source=f"{path} at its autoscaler's limit (head {head}; up to {launch or 'no workers'})",
                nodes=len(nodes), gpus=sum(int(r.get("GPU", 0)) for _, r in nodes),
                cpus=sum(r.get("CPU", 0) for _, r in nodes), gpu_type=None, gpu_memory_gib=None,
                node_gpus=[int(r.get("GPU", 0)) for _, r in nodes])


def place_on_nodes(node_gpus: list[int], groups: list[tuple[str, int, float]]) -> list[str]:
    """Ray's accounting, per node: each (name, count, GPUs each) in order; a whole number of GPUs
    needs that many free GPUs on one node (tensor parallel), a fraction goes best-fit to the GPU
    with the least room that holds it (as Ray does). Returns what does not fit."""
    free = [[1.0] * n for n in node_gpus]
    problems = []
    for name, count, each in groups:
        for i in range(count):
            if each <= 0:
                continue
            if each >= 1:
                k = math.ceil(each - 1e-9)
                node = next((g for g in free if sum(x >= 1 - 1e-9 for x in g) >= k), None)
                if node is not None:
                    for j in [j for j, x in enumerate(node) if x >= 1 - 1e-9][:k]:
                        node[j] = 0.0
                    continue
            else:
                fits = [(x, n, j) for n, g in enumerate(free) for j, x in enumerate(g) if x >= each - 1e-9]
                if fits:
                    _, n, j = min(fits)
                    free[n][j] = round(free[n][j] - each, 6)
                    continue
            problems.append(f"{name} {i + 1} of {count} ({each:g} GPUs) fits on no node (GPUs per node: {node_gpus})")
            break
    return problems


def _actor(name: str, model: str, count: int, gpus: float, tp: int, cpus: float) -> dict:
    return dict(actor=name, model=model, count=count, gpus_each=gpus, tp=tp, cpus_each=cpus, memory=None)


def _on(name: str, gpus: float) -> str:
    return f"{name} ({f'{gpus:g} GPUs' if gpus else 'CPU'})"


def plan_stages(cfg: RunConfig, policy_gpus: float, teacher_gpus: float, train_gpus: int) -> list[dict]:
    """The driver's stages in order (driver.run), with where each runs and the GPUs it uses."""
    from rise_ray.demo.warmup import warmup_train_config
    from rise_ray.driver import stage_names
    from rise_ray.manifest import warmup_enabled
    from rise_ray.rollout.weight_transfer import resolve_method

    t, r = cfg.train, cfg.rollout
    wt = warmup_train_config(cfg) if warmup_enabled(cfg) else None
    sync = resolve_method(cfg.sync.method, r)  # what cannot work was refused at load (RunConfig)
    on = _on("policy engines", policy_gpus)
    collect = on + (" + " + _on("teacher engines", teacher_gpus) if r.improve_with == "teacher" else "")
    base = "warm-up SFT on Ray Train workers" if wt else f"model.path {cfg.model.path}: no work"
    where = {
        "base_model": (base, wt.num_workers * wt.use_gpu if wt else 0),
        "collect": (collect, policy_gpus + teacher_gpus),
        "dataset": ("driver (stored ids, weights exp(r/tau))", 0),
        "train": (f"Ray Train: {t.num_workers} worker(s), ZeRO-{t.zero_stage}", train_gpus),
        "sync": (f"weights -> policy engines ({sync})", policy_gpus),
        "eval": (on, policy_gpus),
        "report": ("driver (metrics.json, report.md, turns.png)", 0),
    }
    stages = [(n, *where[n.rsplit("/", 1)[-1]]) for n in stage_names(cfg.iterations)]
    return [{"stage": n, "runs_on": w, "gpus": g} for n, w, g in stages]


def build_plan(cfg: RunConfig, gpu_memory_gb: float | None = None, cluster: dict | None = None) -> dict:
    """The stages, actors, memory per GPU and the verdict, as a JSON-able dict."""
    cluster = cluster or cluster_info()
    gpu_gib = gpu_memory_gb or cluster.get("gpu_memory_gib") or 80.0
    m, r, t, tc = cfg.model, cfg.rollout, cfg.train, cfg.teacher
    distill = r.improve_with == "teacher"

    def engines(role: str, e: Any, path: str | None, shape: dict | None, tp: int, max_len: int, dtype: str):
        """Engine actors of the policy (e = cfg.rollout) or of the teacher (e = cfg.teacher)."""
        tp = tp if e.engine == "vllm" else 1
        max_len = max_len or (shape or {}).get("context") or DEFAULT_CONTEXT  # None: the model's own
        name = f"{role} engines ({e.engine})"
        model = "none (programmatic solver)" if e.engine == "solver" else path or "tiny (model.tiny)"
        a = _actor(name, model, e.num_engines, e.num_gpus_per_engine, tp, e.num_cpus_per_engine)
        if shape and e.num_gpus_per_engine > 0:
            nbytes = 4 if dtype == "float32" else 2  # auto: bf16 on GPU
            if e.engine == "vllm":
                a["memory"] = engine_memory(shape, nbytes, tp, e.gpu_memory_utilization, gpu_gib, max_len)
            else:  # transformers: the weights, and a KV cache that grows with the batch
                wb = count_params(shape) * nbytes
                a["memory"] = dict(weights=wb, total=wb, need=wb, note="KV cache grows with the batch")
        return a

    shape = model_shape(m.path, m.tiny)
    actors = [engines("policy", r, m.path, shape, r.tensor_parallel_size, m.max_model_len, m.dtype)]
    teacher_model = distill and tc.engine != "solver"  # the solver has no model: no shape, no memory
    t_shape = model_shape(tc.path) if teacher_model else None
    if distill:
        actors.append(engines("teacher", tc, tc.path, t_shape, tc.tensor_parallel_size, tc.max_model_len, "auto"))
    trainer = _actor("Ray Train workers", m.path or "tiny (model.tiny)", t.num_workers, train_gpus_per_worker(cfg), 1, t.cpus_per_worker)
    if shape and t.use_gpu:
        trainer["memory"] = trainer_memory(shape, t, cfg.data.max_length)
    actors.append(trainer)

    problems = []
    for a in actors:
        a["gpus"] = a["count"] * a["gpus_each"]
        if a["tp"] > 1 and a["gpus_each"] < a["tp"]:
            problems.append(f"{a['actor']}: tensor_parallel_size {a['tp']} needs {a['tp']} GPUs per engine")
        mem, limit = a["memory"], gpu_gib * GiB
        if mem and mem["need"] > mem.get("limit", limit):
            need, limit = mem["need"] / GiB, mem.get("limit", limit) / GiB
            of = " (gpu_memory_utilization x GPU)" if "kv" in mem else ""
            problems.append(f"{a['actor']}: per-GPU memory {need:.1f} GiB > {limit:.1f} GiB{of}")
    policy_gpus, train_gpus = actors[0]["gpus"], trainer["gpus"]
    teacher_gpus = actors[1]["gpus"] if distill else 0
    # Colocated: the trainer runs on the policy engines' GPUs while they sleep (vLLM sleep mode).
    shared = policy_gpus + train_gpus  # colocated: fractions of the same GPUs (config.train_gpus_per_worker)
    needed, cpus = math.ceil(teacher_gpus + shared), sum(a["count"] * a["cpus_each"] for a in actors)
    if needed > cluster["gpus"]:
        problems.insert(0, f"needs {needed} GPUs, cluster has {cluster['gpus']}")
    if needed <= cluster["gpus"]:  # the totals fit; do they per node?
        groups = [(a["actor"], a["count"], a["gpus_each"]) for a in actors]  # engines first, as they start
        problems += place_on_nodes(cluster.get("node_gpus") or [cluster["gpus"]], groups)
    if cpus > cluster["cpus"]:
        problems.append(f"needs {cpus:g} CPUs, cluster has {cluster['cpus']:g}")

    stages = plan_stages(cfg, actors[0]["gpus"], teacher_gpus, train_gpus)
    plan = dict(config=cfg.name, iterations=cfg.iterations, cluster=cluster, gpu_memory_gib=gpu_gib)
    plan.update(params=count_params(shape) if shape else None, stages=stages, actors=actors)
    plan.update(
        gpus_needed=needed, cpus_needed=cpus, note=None if shape and (t_shape or not teacher_model) else UNKNOWN
    )
    return {
        **plan,
        "problems": problems,
        "verdict": "does not fit: " + "; ".join(problems) if problems else "fits",
    }


def print_plan(plan: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=None if sys.stdout.isatty() else 150)
    c, gpu = plan["cluster"], plan["gpu_memory_gib"]
    p = plan["params"]
    size = "size unknown" if not p else f"{p / 1e9:.3g}B params" if p >= 1e8 else f"{p / 1e6:.3g}M params"
    con.print(f"[bold]Plan for {plan['config']}[/]: {plan['iterations']} iteration(s), policy model {size}")
    gpus = f"{c['gpus']} GPUs" + (f" ({c['gpu_type']})" if c["gpu_type"] else "")
    con.print(f"Cluster: {c['source']}: {c['nodes']} node(s), {gpus}, {c['cpus']:g} CPUs")
    con.print(f"Planning with {gpu:g} GiB per GPU (--gpu-memory-gb)")
    st = Table("#", "stage", "runs on", "GPUs", title="Stages")
    for i, s in enumerate(plan["stages"]):
        st.add_row(str(i), s["stage"], s["runs_on"], f"{s['gpus']:g}")
    at = Table("actor", "model", "count", "GPUs each", "TP", "CPUs each", "GPUs", title="Actors")
    cols = ("weights", "kv", "grads", "optim", "act", "total")
    heads = ("weights", "KV cache", "grads", "optimizer", "activations", "total", "GPU", "note")
    mt = Table("actor", *heads, title="Memory per GPU (GiB)")
    for a in plan["actors"]:
        row = (a["count"], a["gpus_each"], a["tp"], a["cpus_each"], a["gpus"])
        at.add_row(a["actor"], a["model"], *(f"{x:g}" for x in row))
        if m := a["memory"]:
            gib = ("-" if m.get(k) is None else f"{m[k] / GiB:.1f}" for k in cols)
            mt.add_row(a["actor"], *gib, f"{gpu:g}", m["note"])
        elif a["gpus_each"] == 0:
            mt.add_row(a["actor"], *("" for _ in heads[:-1]), "on CPU (host memory)")
    on_gpu = any(a["gpus_each"] for a in plan["actors"])
    con.print(st, at, mt if on_gpu else "Memory: every actor runs on CPU (host memory)")
    if plan["note"]:
        con.print(f"[yellow]{plan['note']}[/]")
    if plan.get("node_types"):
        nt = Table("stage", "bundles go to", "autoscaler launches", title="Node types (Ray's autoscaler, from the head alone)")
        for p in plan["node_types"]:
            launches = ", ".join(f"{k} x {n}" for n, k in p["launches"].items()) or "nothing new"
            nt.add_row(p["what"], ", ".join(p["on"]) + (f"; unplaceable: {p['unplaced']}" if p["unplaced"] else ""), launches)
        con.print(nt)
    con.print(f"GPUs needed: {plan['gpus_needed']}, CPUs needed: {plan['cpus_needed']:g}")
    con.print("[bold green]fits[/]" if not plan["problems"] else f"[bold red]{plan['verdict']}[/]")


def dry_run(
    cfg: RunConfig, gpu_memory_gb: float | None = None, as_json: bool = False, strict: bool = False,
    cluster_yaml: str | None = None,
) -> int:
    """Print the plan; exit code 0 (1 with strict when it does not fit). cluster_yaml: plan for
    the cluster that file can grow to instead of the one at RAY_ADDRESS (or this machine); on a
    launcher-started cluster's head (RAY_ADDRESS set, ~/ray_bootstrap_config.yaml there) that file."""
    # On a cluster the Ray cluster launcher started, its head holds the launcher file here (Ray
    # Tune reads it the same way): plan for what the autoscaler can launch, not the nodes up now.
    bootstrap = os.path.expanduser("~/ray_bootstrap_config.yaml")
    if not cluster_yaml and os.environ.get("RAY_ADDRESS") and os.path.exists(bootstrap):
        cluster_yaml = bootstrap
    plan = build_plan(cfg, gpu_memory_gb, cluster_from_yaml(cluster_yaml) if cluster_yaml else None)
    if cluster_yaml:
        import yaml

        with open(cluster_yaml, encoding="utf-8") as f:
            plan["node_types"] = launch_plan(cfg, yaml.safe_load(f))
    if as_json:
        print(json.dumps(plan, indent=1))
    else:
        print_plan(plan)
    return 1 if strict and plan["problems"] else 0


# --- which node types a cluster launcher file launches for each stage ----------------------------


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
