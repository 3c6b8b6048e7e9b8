"""Reward-weighted SFT on Ray Train + DeepSpeed (+ LoRA): see trainer.train and loop."""

from rise_ray.train.trainer import TrainError, train, train_command

__all__ = ["TrainError", "train", "train_command"]
