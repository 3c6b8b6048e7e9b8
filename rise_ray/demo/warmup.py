"""The warm-up's training settings: the `train` section with warmup.train's overrides. The
warm-up itself (demonstrations, then SFT) is rise_ray.train.warmup."""

from __future__ import annotations

from pydantic import ValidationError

from rise_ray.config import ConfigError, RunConfig, TrainConfig


def warmup_train_config(cfg: RunConfig) -> TrainConfig:
    """The `train` section with warmup.train's overrides."""
    try:
        return TrainConfig.model_validate({**cfg.train.model_dump(), **cfg.warmup.train})
    except ValidationError as e:
        raise ConfigError(f"warmup.train: {e}") from None
