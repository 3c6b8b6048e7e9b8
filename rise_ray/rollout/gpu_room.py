"""Room on the GPU before a colocated engine wakes: the trainer that shared the GPU may still be
letting go of its memory when the engine is asked to map its weights and KV cache back."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

# A colocated engine waits this long (seconds) for the trainer's processes to free the GPU memory it
# maps back when it wakes; then it fails, saying how much was free and how much it needed.
WAKE_TIMEOUT_S = float(os.environ.get("RISE_WAKE_TIMEOUT_S", "600"))
WAKE_POLL_S = 1.0

# A memory probe: for a wake-up with these tags, one {"free", "need"} (bytes) per GPU of the engine.
MemoryProbe = Callable[[list[str] | None], list[dict[str, int]]]


def wait_for_room(
    probe: MemoryProbe,
    tags: list[str] | None,
    timeout: float = WAKE_TIMEOUT_S,
    poll: float = WAKE_POLL_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> float:
    """Wait until every GPU's free memory covers what waking with `tags` maps on it; returns the
    seconds waited. The trainer that shared the GPUs may still be letting go of its memory (Ray
    Train's workers exit after the train stage returns): waking into that fails in cuMemCreate
    (or, with less luck, leaves no room for the KV cache), so the wait has a deadline and an error
    that says what holds the GPU."""
    start = clock()
    while True:
        rooms = probe(tags)
        short = [(i, r) for i, r in enumerate(rooms) if r["free"] < r["need"]]
        if not short:
            return clock() - start
        waited = clock() - start
        if waited >= timeout:
            gib = 2**30
            what = "; ".join(
                f"GPU {i} of the engine: {r['free'] / gib:.2f} GiB free, needs {r['need'] / gib:.2f} GiB"
                for i, r in short
            )
            raise RuntimeError(
                f"engine wake-up ({'all' if tags is None else ', '.join(tags)}): {what}, still short after "
                f"{waited:.0f} s (RISE_WAKE_TIMEOUT_S). Another process holds that memory: the trainer's workers "
                "(rollout.colocate_with_trainer) may not have exited, or something else shares the GPU (nvidia-smi)"
            )
        sleep(poll)
