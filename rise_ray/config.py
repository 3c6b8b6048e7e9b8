"""The run configuration: one pydantic schema, YAML files, and `key=value` dotted overrides.

A bad config fails at load with the field's path and the reason (ConfigError), never a
traceback from deep inside the run.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rise_ray.serve_config import ServeConfig

SOLVER_TASKS = ("mul", "add")  # the arithmetic tasks teacher.engine=solver reads (rise_ray.rollout.solver)
DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "demo", "default.yaml")  # the embedded default


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the field and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EnvConfig(_Strict):
    name: str = "search"  # search | arithmetic | gsm8k | math
    train_path: str | None = None  # local JSONL, or a `datasets` hub name ("openai/gsm8k")
    test_path: str | None = None
    num_train: int | None = Field(None, ge=1)  # cap on problems used (None = all)
    num_test: int | None = Field(None, ge=1)
    unparsed_reward: float = -1.0  # reward when no answer can be read (the paper's GSM8K code: -1)
    feedback: str = "The answer is incorrect. Please try again."
    repeat_question: bool = True
    options: dict[str, Any] = Field(default_factory=dict)  # env-specific (e.g. arithmetic ranges)
    # paper: grade as the paper's code does, so numbers compare with its tables (GSM8K: an integer in
    # the last \boxed{}; MATH: the last \boxed{} compared after the MATH benchmark's normalisation).
    grading: Literal["default", "paper"] = "default"


class TinyModelConfig(_Strict):
    # hidden_size / num_heads is the head size: vLLM's CPU attention takes 32, 64, 80, ... (not 16).
    hidden_size: int = Field(64, ge=16)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(1, ge=1)
    intermediate_size: int = Field(192, ge=16)
    max_position_embeddings: int = Field(1024, ge=64)
    seed: int = 0  # the random initialisation


class ModelConfig(_Strict):
    # A local HF directory, a .gguf file, a packaged model ("smollm2-135m-instruct") or a hub id
    # (rise_ray.models.source); None = build the tiny model.
    path: str | None = None
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    max_model_len: int | None = Field(None, ge=32)  # None: the model's own context; a number caps it
    # For models without one (base models): "plain" (role-tagged lines) or a Jinja chat template.
    # None: the tokenizer's own, and a clear error where it has none.
    chat_template: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU


class RolloutConfig(_Strict):
    engine: Literal["hf", "vllm"] = "hf"
    # waves: every turn of a batch waits for its slowest reply; async: each episode advances on its
    # own inside the engine actor (vllm: its next turn joins the running batch; rollout/episodes.py)
    schedule: Literal["waves", "async"] = "waves"
    num_engines: int = Field(1, ge=1)  # persistent engine actors
    num_cpus_per_engine: float = Field(1.0, gt=0)
    num_gpus_per_engine: float = Field(0.0, ge=0)
    # torch threads of a CPU engine (None: what Ray gives, one per reserved CPU). Stages run one at a
    # time, so an engine may use cores that its fractional reservation leaves to the idle trainer.
    cpu_threads: int | None = Field(None, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    batch_size: int = Field(64, ge=1)  # problems per Ray Data batch
    kv_cache_memory_bytes: int = Field(2**30, ge=2**20)  # vLLM on CPU (see rollout/vllm.py)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    turns: int = Field(5, ge=1)  # turns per collected trajectory
    best_of_n: int = Field(8, ge=1)  # candidates for the improved answer at a wrong turn
    improve_with: Literal["self", "teacher"] = "self"  # self-distillation or distillation
    # Attempts kept in the prompt after the question: the latest k (None: all). The paper's code
    # counts the question too: its --context_window c keeps c - 1 attempts.
    context_window: int | None = Field(None, ge=1)
    stop_when_correct: bool = True  # the paper's collection: a trajectory ends at its first correct answer
    problems_per_iteration: int | None = Field(None, ge=1)  # None: every training problem each iteration
    # Turns >= 2: a candidate repeating a wrong earlier answer is never the improved response (where
    # all do, the turn is context, not trained). Not in the paper's code.
    improve_distinct: bool = False
    # GPU: share the trainer's GPUs instead of holding GPUs of their own. The engines sleep (vLLM
    # sleep mode frees weights and KV cache) while the trainer runs and wake after the sync.
    colocate_with_trainer: bool = False
    seed: int = 0


class TeacherConfig(_Strict):
    path: str | None = None  # required when rollout.improve_with == "teacher", unless engine is solver
    # solver: no model, a programmatic worked solution for the arithmetic env (rise_ray.rollout.solver)
    engine: Literal["hf", "vllm", "solver"] = "hf"
    num_engines: int = Field(1, ge=1)
    num_cpus_per_engine: float = Field(1.0, gt=0)
    num_gpus_per_engine: float = Field(0.0, ge=0)
    tensor_parallel_size: int = Field(1, ge=1)  # a teacher larger than one GPU (e.g. 70B on 4 x 80 GB)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=32)  # None: the model's own context; a number caps it
    chat_template: str | None = None  # as model.chat_template


class EvalConfig(_Strict):
    turns: int = Field(5, ge=1)
    parallel: int = Field(5, ge=1)  # m{k}@t1 / p{k}@t1: k parallel first answers
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    context_window: int | None = Field(None, ge=1)  # attempts kept in the prompt, as rollout.context_window
    batch_size: int = Field(64, ge=1)
    seed: int = 1234
    # Problems evaluated: test, or val (held out from train and test: tune on it, report on test).
    split: Literal["test", "val"] = "test"


class DataConfig(_Strict):
    """Trajectories -> weighted training examples (rise_ray.data.builder)."""

    # Which turns are trained (the paper's `criteria`): all | better (reward above the previous
    # turn's) | best (no earlier turn did better) | success (correct turns only).
    criteria: Literal["all", "better", "best", "success"] = "all"
    tau: float = Field(0.4, gt=0)  # turn weight = exp(reward / tau)
    center_rewards: bool = False  # subtract the prompt's mean reward first (the AWR-like variant)
    max_weight: float | None = Field(None, gt=0)  # cap on a turn's weight
    only_successful: bool = False  # keep only trajectories that end correct
    dedupe: bool = True  # drop empty and repeated responses within a trajectory (the paper's code)
    stop_at_correct: bool = True  # cut a trajectory after its first correct turn (the paper's code)
    # With stop_at_correct false: the turns kept after the first correct one (None: all); each
    # teaches "keep it", and many outweigh the turns that teach changing a wrong one.
    turns_after_correct: int | None = Field(None, ge=0)
    # Times the weight of every kept turn after the first correct one (below 1: see above).
    after_correct_weight: float = Field(1.0, ge=0)
    # Times the first turn's weight: at full weight its right answers lift m1@t1 (and m5@t1) faster
    # than later turns learn to correct; 0 trains only turns that follow an attempt.
    first_turn_weight: float = Field(1.0, ge=0)
    layout: Literal["packed", "prefix"] = "packed"  # packed: one row per trajectory; prefix: per turn
    max_length: int = Field(2048, ge=8)  # tokens per example
    overflow: Literal["truncate_left", "drop"] = "truncate_left"  # too-long examples
    # Attempts in the prompt: "rollout" = as the rollout's, None = all, k = the latest k.
    context_window: Annotated[int, Field(ge=1)] | Literal["rollout"] | None = "rollout"
    shuffle: bool = True
    seed: int = 0
    # Iteration k trains on the trajectories of iterations 1..k (the paper's Algorithm 1 grows one
    # data set across iterations); False: on iteration k's own trajectories only.
    aggregate: bool = True


class LoRAConfig(_Strict):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    merge: bool = True  # save the merged model (True) or the adapter alone (False)


class TrainConfig(_Strict):
    """Reward-weighted SFT on Ray Train + DeepSpeed (rise_ray.train)."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    # torch threads of a CPU worker (None: one per reserved CPU). Stages run one at a time, so a
    # worker may use cores that idle engine actors hold (as rollout.cpu_threads does the other way).
    cpu_threads: int | None = Field(None, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 0
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(1, ge=1)
    micro_batch_size: int = Field(4, ge=1)  # rows per worker per forward
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step (per worker)
    # Forward passes per micro-batch: its rows sorted by length and cut into this many runs. The
    # step's gradient is the same (the loss is a sum over rows); padding shrinks. 1 = off.
    length_groups: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.04, ge=0, le=1)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    max_grad_norm: float = Field(1.0, ge=0)  # 0 = no clipping
    gradient_checkpointing: bool = False
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    save_every_steps: int = Field(0, ge=0)  # 0 = only the final model
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=-1)  # worker restarts Ray Train may make (-1 = unlimited)
    log_every_steps: int = Field(1, ge=1)
    offload: bool = False  # DeepSpeed ZeRO offload of optimizer states (and ZeRO-3 parameters) to CPU
    prefetch_batches: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"  # Ray Data batches made ahead; auto: 1 on GPU, 0 on CPU
    seed: int = 0
    bf16: bool | Literal["auto"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # Extra DeepSpeed config merged over ours, e.g. {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    deepspeed: dict[str, Any] = Field(default_factory=dict)


class WarmupConfig(_Strict):
    """Warm-up SFT that turns the random tiny model into the embedded default's base model."""

    enabled: bool | None = None  # None: on when the tiny model is built here (model.path unset)
    num_problems: int = Field(4000, ge=1)  # demonstrations, drawn from the training problems
    turns: int = Field(3, ge=1)  # attempts per demonstration; each an independent guess
    p_correct: float = Field(0.35, ge=0, le=1)  # chance a demonstrated guess is right
    max_offset: int = Field(3, ge=1)  # a wrong guess is off by 1..max_offset
    seed: int = 0
    train: dict[str, Any] = Field(
        default_factory=lambda: {"lr": 3e-3, "epochs": 3, "micro_batch_size": 64, "warmup_ratio": 0.02}
    )  # overrides of the `train` section for the warm-up only


class SyncConfig(_Strict):
    check: bool = True  # compare engine logprobs with the trained checkpoint's fp32 reference after every sync
    # max |logprob difference| from that reference: None = by the engines' dtype (1e-2 for fp32; for
    # bf16 / fp16 tolerance_half or 2% of the probe's largest |logit|, whichever is larger)
    tolerance: float | None = Field(None, gt=0)
    tolerance_half: float = Field(0.25, gt=0)
    # How the weights travel: files = safetensors in shared memory (CPU and GPU); nccl / ipc = vLLM's
    # native weight transfer (GPU only). auto: ipc when colocated on GPU, nccl on GPU, files on CPU.
    method: Literal["auto", "files", "nccl", "ipc"] = "auto"
    bucket_mb: int = Field(1024, ge=1)  # tensors sent per transfer step (bounds the extra GPU memory)


class ClusterConfig(_Strict):
    # How long a stage waits for Ray to place its engines or trainer workers before failing: on a
    # cluster that scales from zero the autoscaler is launching their nodes (boot, image, setup).
    scale_up_timeout_s: float = Field(1800.0, gt=0)
    # Ray's accelerator type every GPU actor asks for (e.g. A100-80G): an autoscaler launches only
    # node types declaring `accelerator_type:<X>` (cluster/*.yaml). null: any GPU node.
    accelerator_type: str | None = None


class ObserveConfig(_Strict):
    """Per-stage metrics in the Ray dashboard / Prometheus, and optional experiment tracking."""

    ray_metrics: bool = True  # export stage metrics with ray.util.metrics
    tracking: Literal["none", "tensorboard", "mlflow", "wandb"] = "none"
    tracking_uri: str | None = None  # mlflow tracking URI / tensorboard dir; None: inside the run directory
    project: str = "rise-ray"  # mlflow experiment / wandb project


class RunConfig(_Strict):
    name: str = "default"
    run_dir: str = "runs"
    seed: int = 0
    env: EnvConfig = Field(default_factory=EnvConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    iterations: int = Field(2, ge=0)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    observe: ObserveConfig = Field(default_factory=ObserveConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @field_validator("name")
    @classmethod
    def _name_inside_run_dir(cls, name: str) -> str:  # runs/<name> must stay inside run_dir
        if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise ValueError("must be one directory name inside run_dir (no '/', not '.' or '..')")
        return name

    @model_validator(mode="after")
    def _teacher_needs_path(self) -> RunConfig:
        if self.rollout.improve_with == "teacher" and not self.teacher.path and self.teacher.engine != "solver":
            raise ValueError("rollout.improve_with is 'teacher' but teacher.path is not set")
        if self.teacher.engine == "solver" and self.env.name != "arithmetic":
            raise ValueError(f"teacher.engine 'solver' solves the arithmetic env's questions, not env.name "
                             f"{self.env.name!r}")
        if self.teacher.engine == "solver" and self.teacher.num_gpus_per_engine > 0:
            raise ValueError("teacher.engine 'solver' runs no model: set teacher.num_gpus_per_engine=0")
        task = self.env.options.get("task", "linear")  # the arithmetic env's default task
        if self.teacher.engine == "solver" and task not in SOLVER_TASKS:
            raise ValueError(f"teacher.engine 'solver' reads only 'What is a*b?' / 'a+b' (env.options.task mul or add),"
                             f" not env.options.task {task!r}: every answer would be graded wrong")
        lora = self.train.lora
        if lora.enabled and not lora.merge and self.iterations > 0:
            raise ValueError(f"train.lora.merge=false saves an adapter, which the engines cannot load at the sync of "
                             f"each of the {self.iterations} iterations: set train.lora.merge=true (or iterations=0)")
        if self.train.offload and self.train.zero_stage == 0:
            raise ValueError("train.offload is DeepSpeed ZeRO's offload: set train.zero_stage to 1, 2 or 3")
        r = self.rollout
        if r.colocate_with_trainer and not (self.train.use_gpu and 0.5 < r.num_gpus_per_engine < 1 and r.tensor_parallel_size == 1):
            raise ValueError("rollout.colocate_with_trainer shares each GPU between an engine and a trainer worker: "
                             "set train.use_gpu=true, rollout.num_gpus_per_engine between 0.5 and 1 (e.g. 0.6: Ray's "
                             "bookkeeping only, more than half keeps two engines off one GPU; memory is "
                             "gpu_memory_utilization) and rollout.tensor_parallel_size=1")
        if r.colocate_with_trainer and self.train.num_workers > r.num_engines:
            raise ValueError(f"rollout.colocate_with_trainer pairs each trainer worker with an engine's GPU: "
                             f"train.num_workers ({self.train.num_workers}) > rollout.num_engines ({r.num_engines})")
        if self.sync.method in ("nccl", "ipc") and (r.engine != "vllm" or r.num_gpus_per_engine == 0):
            raise ValueError(f"sync.method '{self.sync.method}' is vLLM's weight transfer between GPUs: set "
                             f"rollout.engine=vllm and rollout.num_gpus_per_engine > 0, or sync.method=files")
        if self.sync.method == "ipc" and r.tensor_parallel_size > 1:
            raise ValueError("sync.method 'ipc' needs rollout.tensor_parallel_size=1 (or sync.method=nccl)")
        return self


def warmup_enabled(cfg: RunConfig) -> bool:
    """The base model is warmed up: warmup.enabled, or by default when the tiny model is built here."""
    return cfg.warmup.enabled if cfg.warmup.enabled is not None else cfg.model.path is None


def train_gpus_per_worker(cfg: RunConfig) -> float:
    """GPUs a Ray Train worker asks for. Colocated, it takes what the engine leaves of a GPU, so Ray
    packs an engine and a worker onto each GPU (the engine sleeps while the worker trains)."""
    if not cfg.train.use_gpu:
        return 0.0
    return round(1.0 - cfg.rollout.num_gpus_per_engine, 6) if cfg.rollout.colocate_with_trainer else 1.0


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override '{item}': expected key=value with a dotted key, e.g. rollout.turns=3")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': value is not valid YAML ({e})") from None
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' was already set to a value")
        node[leaf] = value
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; any other value, and an empty mapping ({}: clear it), replaces."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and v and isinstance(out.get(k), dict) else v
    return out


def _format(e: ValidationError, source: str) -> str:
    """One line for one error (the usual case: a typo), else a line per error under the header."""
    lines = []
    for err in e.errors():
        msg = err["msg"]
        if not err["loc"]:  # a cross-field rule (RunConfig's validator): its message names the fields
            lines.append(msg.removeprefix("Value error, "))
            continue
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        got = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {err.get('input')!r})"
        lines.append(f"{'.'.join(str(p) for p in err['loc'])}: {msg}{got}")
    if len(lines) == 1:
        return f"invalid config ({source}): {lines[0]}"
    return "\n".join([f"invalid config ({source}):", *(f"  {line}" for line in lines)])


def read_yaml(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields, got {type(data).__name__}")
    return data


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The resolved config: defaults < YAML file < key=value overrides."""
    data = read_yaml(path) if path else {}
    data = merge(data, parse_overrides(overrides or []))
    source = path or "defaults"
    if overrides:
        source += " + overrides " + " ".join(overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None


def dump_config(cfg: RunConfig, path: str) -> None:
    from rise_ray.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
