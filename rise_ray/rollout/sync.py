"""Weight sync helpers: read trained weights once, and check that engines really hold them."""

from __future__ import annotations

import glob
import os

import torch

PROBE = [{"role": "user", "content": "Solve for x: 3*x+4=19"}]


def load_state_dict(checkpoint: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (safetensors only; never pickle)."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(checkpoint, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{checkpoint}: no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def check_engines(pool, checkpoint: str, tolerance: float, k: int = 8) -> float:
    """Max |logprob| difference between every engine and the checkpoint run with transformers."""
    from rise_ray.rollout.hf import HFEngine

    want = dict(HFEngine(checkpoint).top_logprobs(PROBE, k))
    worst = 0.0
    for i, got in enumerate(pool.top_logprobs(PROBE, k)):
        got = dict(got)
        ids = list(want)
        if set(got) != set(ids):
            # Near-ties can swap the last ranks; compare the tokens both agree on, but never fewer
            # than the top half.
            common = [t for t in ids if t in got]
            if len(common) < max(1, k // 2) or ids[0] not in got:
                raise RuntimeError(f"weight sync check failed: engine {i} top tokens {list(got)} != {ids}")
            ids = common
        err = max(abs(got[t] - want[t]) for t in ids)
        if err > tolerance:
            raise RuntimeError(f"weight sync check failed: engine {i} logprobs differ by {err:.2e} > {tolerance}")
        worst = max(worst, err)
    return worst
