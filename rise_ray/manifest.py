"""The run directory: its lock, its manifest (which stages finished, what they wrote, and with
which config), and the checks a run makes before it uses the directory.

A stage is recorded only after its output is complete (written atomically), so a run killed at
any point restarts at the first unfinished stage and redoes nothing that finished. Each record
holds a fingerprint of the config fields the stage depends on, and the paths it wrote relative to
the run directory (a run resumes from any working directory, or after the directory moved).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from typing import Any

from rise_ray.config import ConfigError, RunConfig, read_yaml, warmup_enabled
from rise_ray.files import atomic_write_json
from rise_ray.protocol import flatten

STAGE_KINDS = ("collect", "dataset", "train", "sync", "eval")  # the order within an iteration
# Fields that change where and how fast a stage runs, not what it writes: a run may resume on
# other hardware with other values.
RESOURCE_FIELDS = (
    "rollout.num_engines", "rollout.num_cpus_per_engine", "rollout.num_gpus_per_engine", "rollout.cpu_threads",
    "rollout.batch_size", "rollout.kv_cache_memory_bytes", "rollout.gpu_memory_utilization",
    "rollout.tensor_parallel_size", "rollout.colocate_with_trainer", "eval.batch_size",
    "train.cpus_per_worker", "train.cpu_threads", "train.max_failures", "train.log_every_steps",
    "train.prefetch_batches", "train.save_every_steps", "train.keep_checkpoints", "train.length_groups",
    "train.gradient_checkpointing", "train.offload",
)
RESOURCE_FIELDS += tuple(f"warmup.{f}" for f in RESOURCE_FIELDS if f.startswith("train."))  # warmup.train overrides


class RunDirError(ConfigError):
    """A run directory that cannot be used as it is; the message names the file or the stage."""


# --- the lock -----------------------------------------------------------------------------------


class RunLock:
    """An exclusive flock on RUN_DIR/.lock while a run uses the directory. The kernel releases it
    when its process ends in any way (SIGKILL included), so the lock of a dead run is simply taken
    over; the file names the holder (pid, host, start) for the message a second run gets."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, ".lock")
        self.fd: int | None = None
        self.taken_over: dict[str, Any] | None = None  # the holder a dead run left in the file

    def __enter__(self) -> RunLock:
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(f"{self.run_dir} is in use by another rise run ({_describe(holder)}); "
                              "wait for it to finish or stop that process") from None
        except OSError as e:  # a file system without locks: run, but say what is not guarded
            print(f"[rise] {self.path}: cannot lock ({e}); a second run on this directory would not be stopped")
            os.close(fd)
            return self
        self.taken_over = _read_holder(fd) or None  # a clean exit empties the file
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        if self.taken_over:
            print(f"[rise] {self.run_dir}: taking over the lock of a run that is gone ({_describe(self.taken_over)})")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # written half-way at this instant, or not ours
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "holder unknown: it is starting up"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("started_at", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {since}"


# --- config fingerprints ------------------------------------------------------------------------


def _depends_on(cfg: RunConfig, stage: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(field prefixes the stage reads, prefixes among them it does not): what its output depends
    on besides the outputs of the stages before it."""
    kind = stage.rsplit("/", 1)[-1]
    engines = ("seed", "rollout.engine", "model.max_model_len", "model.dtype")  # how the policy samples
    test_only, train_only = ("env.test_path", "env.num_test"), ("env.train_path", "env.num_train")
    if kind == "base_model":
        if not warmup_enabled(cfg):
            return ("model", "warmup.enabled"), ()
        overridden = tuple(f"train.{k}" for k in cfg.warmup.train)  # warm-up trains with warmup.train over train
        # its data settings are overridden too, and its demonstrations' reward 0 weighs exp(0 / tau) = 1
        return ("model", "warmup", "env", "train", "data"), (
            *test_only, *overridden, "data.criteria", "data.center_rewards", "data.dedupe", "data.tau",
            "data.turns_after_correct", "data.after_correct_weight", "data.first_turn_weight")
    if kind == "collect":
        teacher = ("teacher",) if cfg.rollout.improve_with == "teacher" else ()
        return (*engines, "rollout", "env", *teacher), test_only
    if kind == "dataset":
        window = ("rollout.context_window",) if cfg.data.context_window == "rollout" else ()
        return ("data", "env", *window), (*test_only, *train_only)
    if kind == "train":
        return ("train",), ()
    if kind == "eval":
        return (*engines, "eval", "env"), train_only
    return (), ()  # sync: its output is the engines' state, rebuilt from the checkpoints on resume


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def stage_fields(cfg: RunConfig | dict[str, Any], stage: str, like: RunConfig | None = None) -> dict[str, Any]:
    """The dotted config fields `stage` depends on, with their values. A dict config (an old
    config.yaml) is read with the dependencies of `like`."""
    flat = flatten(cfg if isinstance(cfg, dict) else cfg.model_dump(mode="json"))
    dep_cfg = cfg if isinstance(cfg, RunConfig) else like
    if dep_cfg is None:
        raise TypeError("stage_fields of a dict config needs like=RunConfig")
    include, exclude = _depends_on(dep_cfg, stage)
    return {k: v for k, v in flat.items() if _under(k, include) and not _under(k, (*exclude, *RESOURCE_FIELDS))}


def fingerprint(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def stage_order(stage: str) -> tuple[int, int]:
    """base_model, iter_0/eval, then each iteration's stages, report last."""
    if stage == "base_model":
        return (-1, 0)
    if stage == "report":
        return (1 << 30, 0)
    it, _, kind = stage.partition("/")
    if not it.removeprefix("iter_").isdigit():  # a stage of another kind: after base_model, before the rest
        return (-1, 1)
    return (int(it.removeprefix("iter_")), STAGE_KINDS.index(kind) if kind in STAGE_KINDS else len(STAGE_KINDS))


def stage_dirs(stage: str) -> list[str]:
    """What a stage writes, relative to the run directory (removed when the stage is redone)."""
    if stage == "base_model":
        return ["base_model", "warmup"]
    it, _, kind = stage.partition("/")
    sub = {"collect": "trajectories", "dataset": "dataset", "train": "checkpoint", "eval": "eval"}.get(kind)
    return [os.path.join(it, sub)] if sub else []


# --- paths inside the run directory -------------------------------------------------------------


def _relative(obj: Any, root: str, key: list[Any], found: list[list[Any]]) -> Any:
    """obj with every absolute path inside root made relative to it; their keys go to `found`."""
    if isinstance(obj, str) and os.path.isabs(obj):
        path = os.path.normpath(obj)
        if path == root or path.startswith(root + os.sep):
            found.append(key)
            return os.path.relpath(path, root)
    if isinstance(obj, dict):
        return {k: _relative(v, root, [*key, k], found) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_relative(v, root, [*key, i], found) for i, v in enumerate(obj)]
    return obj


def _get(obj: Any, key: list[Any]) -> Any:
    for k in key:
        obj = obj[k]
    return obj


def _set(obj: Any, key: list[Any], value: Any) -> Any:
    if not key:
        return value
    _get(obj, key[:-1])[key[-1]] = value
    return obj


def _well_formed(entry: Any) -> bool:
    if not isinstance(entry, dict) or "output" not in entry or not isinstance(entry.get("run_paths", []), list):
        return False
    try:
        return all(isinstance(_get(entry["output"], key), str) for key in entry.get("run_paths", []))
    except (KeyError, IndexError, TypeError):
        return False


class Manifest:
    def __init__(self, run_dir: str, cfg: RunConfig | None = None):
        self.run_dir = os.path.abspath(run_dir)
        self.path = os.path.join(self.run_dir, "manifest.json")
        self.cfg = cfg  # when set, each record holds the fingerprint of the fields its stage depends on
        self.data: dict[str, Any] = {"stages": {}}
        # called as on_stage(stage, output, seconds) after a stage ran, and with seconds None when it
        # was skipped as done (its recorded output, for what the stages after it read)
        self.on_stage: Callable[[str, Any, float | None], None] | None = None
        if os.path.exists(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    self.data = json.load(f)
            except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
                raise RunDirError(f"{self.path}: damaged, not valid JSON ({e}); the run directory cannot "
                                  "be resumed as it is: restore the file, or delete it to redo every stage") from None
            if not isinstance(self.data, dict) or not isinstance(self.data.get("stages"), dict):
                raise RunDirError(f"{self.path}: damaged, no 'stages' mapping; restore the file, or delete it "
                                  "to redo every stage")
            for stage, entry in self.stages.items():
                if not _well_formed(entry):
                    raise RunDirError(f"{self.path}: damaged record of stage {stage!r}; restore the file, or "
                                      "delete the record to redo that stage and the ones after it")

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def done(self, stage: str) -> bool:
        return stage in self.stages

    def output(self, stage: str) -> Any:
        """The stage's output, its paths inside the run directory made absolute again."""
        entry = self.stages[stage]
        out = json.loads(json.dumps(entry["output"]))
        for key in entry.get("run_paths", []):
            out = _set(out, key, os.path.join(self.run_dir, _get(out, key)))
        return out

    def outputs(self, stage: str) -> list[str]:
        """The files and directories the stage's record says it wrote."""
        entry = self.stages[stage]
        paths = [_get(entry["output"], key) for key in entry.get("run_paths", [])]
        if stage.endswith("/eval"):  # the report reads it
            paths.append(os.path.join(stage, "metrics.json"))
        return [os.path.join(self.run_dir, p) for p in paths]

    def record(self, stage: str, output: Any, seconds: float) -> None:
        run_paths: list[list[Any]] = []
        entry = {"output": _relative(output, self.run_dir, [], run_paths), "run_paths": run_paths,
                 "seconds": round(seconds, 3), "finished_at": time.time()}
        if self.cfg is not None and stage != "report":
            entry["fingerprint"] = fingerprint(stage_fields(self.cfg, stage))
        self.stages[stage] = entry
        atomic_write_json(self.path, self.data)

    def run_stage(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` unless the stage already finished; either way return its recorded output."""
        if self.done(stage):
            print(f"[rise] {stage}: done earlier, skipped")
            out = self.output(stage)
            if self.on_stage is not None:
                self.on_stage(stage, out, None)
            return out
        print(f"[rise] {stage}: start", flush=True)
        start = time.perf_counter()
        out = fn(*args)
        seconds = time.perf_counter() - start
        self.record(stage, out, seconds)
        print(f"[rise] {stage}: finished in {seconds:.1f}s", flush=True)
        if self.on_stage is not None:
            self.on_stage(stage, out, seconds)
        return out

    # --- before a run uses the directory ----------------------------------------------------------

    def changed(self, cfg: RunConfig) -> dict[str, list[str]]:
        """{finished stage: the fields that differ} for the stages `cfg` would not reproduce."""
        old = self._old_config()
        defaults = flatten(RunConfig().model_dump(mode="json"))
        out: dict[str, list[str]] = {}
        for stage, entry in self.stages.items():
            fp = entry.get("fingerprint")  # records written before fingerprints have none
            if fp is None or fp == fingerprint(new := stage_fields(cfg, stage)):
                continue
            was = stage_fields(old, stage, like=cfg) if old is not None else {}
            if old is not None:  # fields added to the schema since the stage ran hold their defaults
                new = {k: v for k, v in new.items() if k in was or defaults.get(k, v) != v or k not in defaults}
                if fp == fingerprint(new):
                    continue
            diff = [f"{k} ({_short(was, k)} -> {_short(new, k)})"
                    for k in sorted(set(was) | set(new)) if _short(was, k) != _short(new, k)]
            out[stage] = diff or ["(config.yaml does not say which: it no longer matches the stage; edited, or cut short?)"]
        return out

    def missing(self) -> dict[str, list[str]]:
        """{finished stage: the recorded outputs that are gone}."""
        out = {s: [p for p in self.outputs(s) if not os.path.exists(p)] for s in self.stages if s != "report"}
        return {s: paths for s, paths in out.items() if paths}

    def drop_from(self, first: str) -> list[str]:
        """Forget `first` and every stage after it, and remove what they wrote; returns them."""
        dropped = [s for s in self.stages if stage_order(s) >= stage_order(first)]
        for s in dropped:
            del self.stages[s]
            for d in stage_dirs(s):
                shutil.rmtree(os.path.join(self.run_dir, d), ignore_errors=True)
        atomic_write_json(self.path, self.data)
        return dropped

    def _old_config(self) -> dict[str, Any] | None:
        try:
            return read_yaml(os.path.join(self.run_dir, "config.yaml"))
        except ConfigError:
            return None


def _short(fields: dict[str, Any], key: str) -> str:
    text = json.dumps(fields[key]) if key in fields else "unset"
    return text if len(text) <= 40 else text[:37] + "..."


def open_run_dir(cfg: RunConfig, run_dir: str, redo_changed: bool = False, redo_missing: bool = False) -> Manifest:
    """The manifest of a run directory that `cfg` may continue (the caller holds its lock).

    Finished stages that `cfg` would not reproduce are an error naming the fields, or with
    redo_changed are redone; so are finished stages whose outputs are gone (redo_missing: the
    `--resume` case). A redone stage takes the stages after it along. config.yaml then describes
    `cfg`, which matches every stage left in the manifest."""
    from rise_ray.config import dump_config

    manifest = Manifest(run_dir, cfg)
    changed, missing = manifest.changed(cfg), manifest.missing()
    if changed and not redo_changed:
        lines = [f"  {s}: {', '.join(fields)}" for s, fields in changed.items()]
        raise RunDirError(f"{manifest.run_dir}: the config differs from the one these finished stages ran with:\n"
                          + "\n".join(lines) + "\nrun it with that config, or add --redo-changed to redo "
                          f"{min(changed, key=stage_order)} and the stages after it")
    if missing and not redo_missing:
        lines = [f"  {s}: {', '.join(paths)}" for s, paths in missing.items()]
        raise RunDirError(f"{manifest.run_dir}: recorded outputs are missing:\n" + "\n".join(lines)
                          + f"\n`rise run --resume {manifest.run_dir}` redoes {min(missing, key=stage_order)} "
                          "and the stages after it")
    redo = [*changed, *missing]
    if redo:
        first = min(redo, key=stage_order)
        why = "its config changed" if first in changed else "its outputs are missing"
        print(f"[rise] {first}: {why}: redoing it and the stages after it "
              f"({', '.join(manifest.drop_from(first))})", flush=True)
    restamp = {s: fp for s, e in manifest.stages.items()  # equal but for fields the schema gained since
               if e.get("fingerprint") not in (None, fp := fingerprint(stage_fields(cfg, s)))}
    for s, fp in restamp.items():
        manifest.stages[s]["fingerprint"] = fp
    if restamp:
        atomic_write_json(manifest.path, manifest.data)
    dump_config(cfg, os.path.join(manifest.run_dir, "config.yaml"))
    return manifest


def run_models(run_dir: str) -> dict[str, str]:
    """Every model of the run, oldest first: iter_0 (the base model), then iter_k for each finished
    train stage."""
    manifest = Manifest(run_dir)
    models = {"iter_0": manifest.output("base_model")} if manifest.done("base_model") else {}
    for _, stage in sorted((stage_order(s), s) for s in manifest.stages if s.endswith("/train") and manifest.done(s)):
        models[stage.split("/")[0]] = manifest.output(stage)
    return models


def latest_model(run_dir: str) -> str | None:
    """The run's latest model: its last finished train stage's checkpoint, else its base model."""
    models = run_models(run_dir)
    return list(models.values())[-1] if models else None
