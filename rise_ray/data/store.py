"""Files of the data set: trajectories read from the collector's parquet files, and a data set
directory (`examples.parquet`: input_ids, weights, units, ...; `stats.json`) written and read."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from rise_ray.envs.base import DataError
from rise_ray.rollout.episodes import Trajectory

FORMAT = "rise-ray-sft-v1"
EXAMPLES_FILE = "examples.parquet"
STATS_FILE = "stats.json"
TRAJECTORY_FIELDS = ("problem_id", "question", "reference", "turns")
TURN_FIELDS = ("response", "reward", "correct")


class BuildError(ValueError):
    """Trajectories or a tokenizer that cannot make a training set; the message says why."""


def trajectory_files(path: str) -> list[str]:
    """Parquet files under `path` (a file, or a directory searched recursively), sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such trajectories file or directory")
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    files = [f for f in files if not os.path.basename(f).startswith(".")]
    if not files:
        raise DataError(f"{path}: no .parquet trajectory files found")
    return files


def write_trajectories(trajs: list[Trajectory], path: str) -> None:
    """Trajectories to one parquet file, written atomically (the collector's and evaluation's output)."""
    import io

    import pyarrow.parquet as pq

    from rise_ray.files import atomic_write_bytes
    from rise_ray.rollout.episodes import to_table

    buf = io.BytesIO()
    pq.write_table(to_table(trajs), buf)
    atomic_write_bytes(path, buf.getvalue())


def read_trajectories(path: str) -> list[Trajectory]:
    """Trajectories from parquet files (one row per trajectory, as the collector writes them)."""
    import pyarrow.parquet as pq

    out: list[Trajectory] = []
    for f in trajectory_files(path):
        try:
            table = pq.read_table(f)
        except Exception as e:  # a corrupt or foreign file becomes a clear data error
            raise DataError(f"{f}: not a readable parquet file ({e})") from None
        missing = [c for c in TRAJECTORY_FIELDS if c not in table.column_names]
        if missing:
            raise DataError(f"{f}: not a trajectories file: missing column(s) {missing} (has {table.column_names})")
        for k, rec in enumerate(table.to_pylist()):
            rec.setdefault("degenerate_dropped", 0)
            rec.setdefault("stop_reason", "turns")
            rec.setdefault("meta", "{}")
            for j, t in enumerate(rec["turns"] or []):
                miss = [c for c in TURN_FIELDS if t.get(c) is None]
                if miss:
                    raise DataError(f"{f}: row {k} turn {j}: missing field(s) {miss}")
            try:
                out.append(Trajectory.from_record(rec))
            except TypeError as e:
                raise DataError(f"{f}: row {k}: not a trajectory record ({e})") from None
    return out


def write_dataset(rows: list[dict[str, Any]], stats: dict[str, Any], out_dir: str) -> str:
    """examples.parquet + stats.json, each written to a temp file then moved into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rise_ray.files import atomic_write_json

    if not rows:
        raise BuildError(f"no training examples: every turn was filtered out (stats: {stats})")
    os.makedirs(out_dir, exist_ok=True)
    schema = pa.schema(
        [
            ("input_ids", pa.list_(pa.int32())),
            ("weights", pa.list_(pa.float32())),
            ("units", pa.int32()),
            ("num_tokens", pa.int32()),
            ("trained_tokens", pa.int32()),
            ("problem_id", pa.string()),
            ("turns", pa.list_(pa.int32())),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    tmp = os.path.join(out_dir, f".tmp-{os.getpid()}-{EXAMPLES_FILE}")
    pq.write_table(table, tmp)
    os.replace(tmp, os.path.join(out_dir, EXAMPLES_FILE))
    atomic_write_json(os.path.join(out_dir, STATS_FILE), stats)
    return out_dir


def is_dataset_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, EXAMPLES_FILE)) and os.path.isfile(os.path.join(path, STATS_FILE))


def read_stats(path: str) -> dict[str, Any]:
    f = os.path.join(path, STATS_FILE)
    try:
        with open(f, encoding="utf-8") as fh:
            stats = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{f}: cannot read the data set stats ({e})") from None
    if stats.get("format") != FORMAT:
        raise DataError(f"{f}: not a {FORMAT} data set (format={stats.get('format')!r})")
    return stats


def read_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a data set directory (for tests and the non-Ray baseline)."""
    import pyarrow.parquet as pq

    read_stats(path)
    return pq.read_table(os.path.join(path, EXAMPLES_FILE)).to_pylist()
