"""Training data: trajectories -> reward-weighted SFT examples (see rise_ray.data.builder)."""

from rise_ray.data.builder import (
    BuildError,
    TurnExample,
    build_dataset,
    build_examples,
    is_dataset_dir,
    layout_rows,
    prepare,
    prepare_dataset,
    read_rows,
    read_stats,
    read_trajectories,
    select_turns,
    turn_weight,
    write_dataset,
)

__all__ = [
    "BuildError",
    "TurnExample",
    "build_dataset",
    "build_examples",
    "is_dataset_dir",
    "layout_rows",
    "prepare_dataset",
    "prepare",
    "read_rows",
    "read_stats",
    "read_trajectories",
    "select_turns",
    "turn_weight",
    "write_dataset",
]
