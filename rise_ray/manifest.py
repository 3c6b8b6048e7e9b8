"""The run directory's manifest: which stages finished and what they wrote.

A stage is recorded only after its output is complete (written atomically), so a run killed at
any point restarts at the first unfinished stage and redoes nothing that finished.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from rise_ray.files import atomic_write_json


class Manifest:
    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "manifest.json")
        self.data: dict[str, Any] = {"stages": {}}
        # called as on_stage(stage, output, seconds) after a stage ran (not when skipped as done)
        self.on_stage: Callable[[str, Any, float], None] | None = None
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.data = json.load(f)

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def done(self, stage: str) -> bool:
        return stage in self.stages

    def output(self, stage: str) -> Any:
        return self.stages[stage]["output"]

    def record(self, stage: str, output: Any, seconds: float) -> None:
        self.stages[stage] = {"output": output, "seconds": round(seconds, 3), "finished_at": time.time()}
        atomic_write_json(self.path, self.data)

    def run_stage(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` unless the stage already finished; either way return its recorded output."""
        if self.done(stage):
            print(f"[rise] {stage}: done earlier, skipped")
            return self.output(stage)
        print(f"[rise] {stage}: start", flush=True)
        start = time.perf_counter()
        out = fn(*args)
        seconds = time.perf_counter() - start
        self.record(stage, out, seconds)
        print(f"[rise] {stage}: finished in {seconds:.1f}s", flush=True)
        if self.on_stage is not None:
            self.on_stage(stage, out, seconds)
        return out


def latest_model(run_dir: str) -> str | None:
    """The run's latest model directory: the last finished train stage's, else its base model."""
    path = os.path.join(run_dir, "manifest.json")
    with open(path) as f:
        stages = json.load(f).get("stages", {})
    trained = sorted((int(k.split("/")[0][5:]), v["output"]) for k, v in stages.items()
                     if k.startswith("iter_") and k.endswith("/train"))
    out = trained[-1][1] if trained else stages.get("base_model", {}).get("output")
    if out is None:
        return None
    return out if os.path.isabs(out) or os.path.exists(out) else os.path.join(run_dir, out)
