"""Experiment tracking for `observe.tracking`: TensorBoard, MLflow or Weights & Biases, one
tracking run per run directory (a resumed run continues the run it logged to before)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from rise_ray.config import ConfigError, RunConfig

TRACKING_FILE = "tracking.json"  # which tracking run this run directory logs to (resume continues it)


def _missing(backend: str, package: str) -> ConfigError:
    return ConfigError(
        f"observe.tracking={backend} needs the '{package}' package, which is not installed: "
        f"pip install 'rise-ray[track]' (or pip install {package}), or set observe.tracking=none"
    )


def check_installed(backend: str) -> None:
    """observe.tracking's package can be imported (a ConfigError naming it otherwise), checked before
    a run or its dry run starts anything."""
    import importlib.util

    package = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}.get(backend)
    if package and importlib.util.find_spec(package) is None:
        raise _missing(backend, package)


def open_tracker(cfg: RunConfig, run_dir: str) -> _Tracker:
    """The tracking run for this run directory: a new one, or the one it logged to before (resume)."""
    from rise_ray.files import atomic_write_json

    obs = cfg.observe
    state_path = os.path.join(run_dir, TRACKING_FILE)
    state: dict[str, Any] = {}
    if os.path.exists(state_path):
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    resumed = state.get("backend") == obs.tracking
    run_id = state.get("run_id") if resumed else None
    cls = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}[obs.tracking]
    tracker = cls(cfg, run_dir, run_id)
    atomic_write_json(state_path, {"backend": obs.tracking, "run_id": tracker.run_id, "uri": tracker.uri})
    if not resumed:
        tracker.params(cfg.model_dump(mode="json"))
    return tracker


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class _Tracker:
    run_id: str | None = None
    uri: str | None = None

    def params(self, config: dict) -> None: ...
    def scalars(self, values: dict[str, float], step: int) -> None: ...
    def series(self, key: str, points: list[tuple[int, float]], step_name: str) -> None: ...
    def files(self, paths: list[str]) -> None: ...
    def close(self) -> None: ...


def _code_block(text: str) -> str:
    return "    " + text.replace("\n", "\n    ")  # markdown: an indented block keeps YAML/JSON as is


class _TensorBoard(_Tracker):
    """Event files under observe.tracking_uri (default: <run>/tensorboard), written with
    tensorboardX (a dependency of ray[train]); view them with `tensorboard --logdir`."""

    def __init__(self, cfg: RunConfig, run_dir: str, run_id: str | None):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboardX") from None
        self.uri = os.path.abspath(cfg.observe.tracking_uri or os.path.join(run_dir, "tensorboard"))
        # a unique file per writer: a resumed run within the same second would overwrite the first
        self.writer = SummaryWriter(logdir=self.uri, filename_suffix=f".{os.getpid()}.{time.time_ns()}")

    def params(self, config: dict) -> None:
        import yaml

        self.writer.add_text("config", _code_block(yaml.safe_dump(config, sort_keys=False)), 0)
        self.writer.flush()

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def series(self, key: str, points: list[tuple[int, float]], step_name: str) -> None:
        for step, v in points:
            self.writer.add_scalar(key, v, step)
        self.writer.flush()

    def files(self, paths: list[str]) -> None:
        for p in paths:
            name = os.path.basename(p)
            if p.endswith(".png"):
                import matplotlib.image

                self.writer.add_image(name, matplotlib.image.imread(p)[..., :3], 0, dataformats="HWC")
            else:
                with open(p, encoding="utf-8") as f:
                    text = f.read()
                self.writer.add_text(name, text if p.endswith(".md") else _code_block(text), 0)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow(_Tracker):
    """An MLflow run in experiment observe.project at observe.tracking_uri (default: a SQLite store
    <run>/mlflow.db with artifacts under <run>/mlartifacts)."""

    def __init__(self, cfg: RunConfig, run_dir: str, run_id: str | None):
        try:
            import mlflow
        except ImportError:
            raise _missing("mlflow", "mlflow") from None
        self.mlflow = mlflow
        local = cfg.observe.tracking_uri is None
        db = os.path.abspath(os.path.join(run_dir, "mlflow.db"))
        self.uri = cfg.observe.tracking_uri or f"sqlite:///{db}"
        mlflow.set_tracking_uri(self.uri)
        exp = mlflow.get_experiment_by_name(cfg.observe.project)
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            artifacts = f"file://{os.path.abspath(os.path.join(run_dir, 'mlartifacts'))}" if local else None
            exp_id = mlflow.create_experiment(cfg.observe.project, artifact_location=artifacts)
        run = (
            mlflow.start_run(run_id=run_id)
            if run_id
            else mlflow.start_run(experiment_id=exp_id, run_name=cfg.name)
        )
        self.run_id = run.info.run_id

    def params(self, config: dict) -> None:
        self.mlflow.log_params({k: str(v)[:500] for k, v in _flat(config).items()})

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def series(self, key: str, points: list[tuple[int, float]], step_name: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(v), now, int(s)) for s, v in points]
        client = self.mlflow.MlflowClient()
        for i in range(0, len(metrics), 1000):  # a batch takes at most 1000 metrics
            client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def files(self, paths: list[str]) -> None:
        for p in paths:
            self.mlflow.log_artifact(p)

    def close(self) -> None:
        self.mlflow.end_run()


class _WandB(_Tracker):
    """A Weights & Biases run in project observe.project (observe.tracking_uri: the server's base
    URL); files under <run>/wandb. Scalars carry their step as `iteration` (or `train/step`)."""

    def __init__(self, cfg: RunConfig, run_dir: str, run_id: str | None):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        settings = wandb.Settings(base_url=cfg.observe.tracking_uri) if cfg.observe.tracking_uri else None
        self.run = wandb.init(
            project=cfg.observe.project,
            name=cfg.name,
            id=run_id,
            resume="allow",
            dir=run_dir,
            settings=settings,
        )
        self.run_id = self.run.id
        self.uri = cfg.observe.tracking_uri

    def params(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "iteration": step})

    def series(self, key: str, points: list[tuple[int, float]], step_name: str) -> None:
        for s, v in points:
            self.run.log({key: v, step_name: s})

    def files(self, paths: list[str]) -> None:
        for p in paths:
            self.run.save(p, base_path=os.path.dirname(p), policy="now")

    def close(self) -> None:
        self.run.finish()
