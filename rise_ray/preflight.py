"""What a run would fail on, checked before Ray starts: `rise run` and `rise run --dry-run` decide
here alike (one code path), and `rise eval`, `rise train` and `rise serve` use the parts they need.

The config's own cross-field rules run at load (config.RunConfig); these need the env built, the
data files read or the model sources looked at. Nothing is fetched: hub data and hub models are
checked when the run reads them.
"""

from __future__ import annotations

from rise_ray.config import ConfigError, RunConfig, warmup_enabled
from rise_ray.envs import make_env
from rise_ray.envs.base import is_hub_name
from rise_ray.models.source import source_kind
from rise_ray.tracking import check_installed


def check_model_source(field: str, source: str | None) -> None:
    """model.path / teacher.path names something `rise model get` can read (None: the tiny model);
    local sources are checked, packaged names and hub ids are fetched when the run starts."""
    if source is not None:
        try:
            source_kind(source)
        except ConfigError as e:
            raise ConfigError(f"{field}: {e}") from None


def check_run(cfg: RunConfig, training: bool = True) -> None:
    """The env's name and options (the env is built), its local data files (read), the problems of
    the splits the run uses, the warm-up's demonstrations, the model and teacher sources, the
    tracking package. `rise eval`: training=False (no train split, warm-up, teacher or tracking)."""
    hub = {k for k in ("train_path", "test_path") if (p := getattr(cfg.env, k)) and is_hub_name(p)}
    env = make_env(cfg.env.model_copy(update=dict.fromkeys(hub)))  # hub data: read when the run starts
    if any(getattr(env, k.removesuffix("_path")) for k in hub):  # it makes its own problems, reads no data:
        env = make_env(cfg.env)  # it gets the paths as the run's does (the arithmetic env refuses them)
    uses = {cfg.eval.split: f"eval.split={cfg.eval.split}"}
    warmup = training and warmup_enabled(cfg)
    if training and (cfg.iterations > 0 or warmup):
        uses.setdefault("train", f"iterations={cfg.iterations}" + (" and the warm-up" if warmup else ""))
    for split, why in uses.items():
        if not getattr(env, split) and f"{split}_path" not in hub:
            where = {"test": ": set env.test_path", "train": ": set env.train_path"}.get(split, "")
            raise ConfigError(f"{why}: env {env.name!r} has no {split} problems{where}")
    if warmup and (env.train or not hasattr(env, "demo_attempt")):  # hub data: an env that has them
        from rise_ray.demo.warmup import warmup_train_config
        from rise_ray.train.warmup import demonstrations  # pyarrow: loaded only here

        warmup_train_config(cfg)
        try:
            demonstrations(env, 1, cfg.warmup.turns, cfg.warmup.p_correct, cfg.warmup.max_offset, cfg.warmup.seed)
        except ValueError as e:
            raise ConfigError(f"warmup.enabled (on when model.path is unset): {e}") from None
    check_model_source("model.path", cfg.model.path)
    if training:
        check_installed(cfg.observe.tracking)
    if training and cfg.rollout.improve_with == "teacher" and cfg.teacher.engine != "solver":
        check_model_source("teacher.path", cfg.teacher.path)
