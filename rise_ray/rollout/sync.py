"""Weight sync helpers: read trained weights once, and check that engines really hold them.

The check compares each engine's next-token log-probabilities on a probe prompt with a float32
reference of the checkpoint computed by transformers on CPU, in a Ray task with resources of its
own (never in the driver process: on a GPU node that would land on GPU 0, whose memory an engine
holds). Against an fp32 reference only the engine's own rounding remains, so the tolerance follows
the engine's dtype: `sync.tolerance` for fp32 engines; for bf16 / fp16 ones `sync.tolerance_half`
or 2% of the probe's largest |logit|, whichever is larger (bf16 alone rounds logits of magnitude
4-32 to steps of 0.03-0.125, and the error of a bf16 forward grows with them).

What it catches: a wrong or garbled tensor (the distance to the checkpoint exceeds the tolerance),
and a sync that did nothing (the engine sits nearer the weights it held before than the two
checkpoints are apart). When the update moved the probe's log-probabilities by less than the
tolerance, the second cannot be told from rounding: the result says `conclusive: false`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ray
import torch

PROBE = [{"role": "user", "content": "Solve for x: 3*x+4=19"}]
FP32_TOLERANCE = 1e-2
REFERENCE_TIMEOUT_S = float(os.environ.get("RISE_SYNC_REFERENCE_TIMEOUT_S", "1800"))


def load_state_dict(checkpoint: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (safetensors only; never pickle)."""
    from safetensors.torch import load_file

    from rise_ray.models.source import checkpoint_weight_files

    state: dict[str, torch.Tensor] = {}
    for f in checkpoint_weight_files(checkpoint):
        state.update(load_file(f))
    return state


def checkpoint_params(checkpoint: str) -> int:
    """Parameters in a checkpoint, from the headers of the safetensors files that are loaded (a
    `consolidated*` copy of the weights beside HF-format shards is not; nothing is read)."""
    from rise_ray.models.source import checkpoint_weight_files

    total = 0
    for f in checkpoint_weight_files(checkpoint):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        header.pop("__metadata__", None)
        for entry in header.values():
            n = 1
            for d in entry["shape"]:
                n *= d
            total += n
    return total


def _reference(checkpoints: list[str], k: int) -> dict[str, Any]:
    """fp32 top-k log-probabilities of each checkpoint on the probe, on CPU, one model at a time,
    and the largest |logit| of the first (half-precision rounding grows with it)."""
    from rise_ray.rollout.hf import HFEngine

    out, max_logit = [], 0.0
    for i, path in enumerate(checkpoints):
        engine = HFEngine(path, dtype=torch.float32, device="cpu")
        with torch.inference_mode():
            logits = engine.model(input_ids=torch.tensor([engine._ids(PROBE)])).logits[0, -1].float()
        values, indices = torch.log_softmax(logits, dim=-1).topk(k)
        out.append([(int(t), float(v)) for t, v in zip(indices.tolist(), values.tolist(), strict=True)])
        if i == 0:
            max_logit = float(logits.abs().max())
        del engine
    return {"logprobs": out, "max_logit": max_logit, "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id()}


def reference_logprobs(checkpoints: list[str], k: int = 8) -> dict[str, Any]:
    """Run `_reference` as a Ray task that reserves a CPU and the fp32 model's memory."""
    memory = int(4 * max(checkpoint_params(c) for c in checkpoints) * 1.2) + 2**28
    task = ray.remote(_reference).options(num_cpus=1, memory=memory, max_retries=0)
    ref = task.remote(checkpoints, k)
    try:
        return ray.get(ref, timeout=REFERENCE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise RuntimeError(
            f"weight sync check: the fp32 reference of {checkpoints[0]} (1 CPU, {memory / 2**30:.1f} GiB of "
            f"memory) did not finish within {REFERENCE_TIMEOUT_S:.0f} s (RISE_SYNC_REFERENCE_TIMEOUT_S): no node "
            "has that much free memory, or loading is that slow; set sync.check=false to skip the check"
        ) from None


def distance(a: list[tuple[int, float]], b: list[tuple[int, float]], k: int) -> float:
    """Max |logprob difference| over b's top tokens that a also ranks. Near-ties can swap the last
    ranks, so tokens outside a's top-k are skipped, but never more than half; a different top
    token is an infinite distance."""
    da, db = dict(a), dict(b)
    common = [t for t in db if t in da]
    if not db or next(iter(db)) not in da or len(common) < max(1, k // 2):
        return float("inf")
    return max(abs(da[t] - db[t]) for t in common)


# bf16 / fp16 engines: the error grows with the logits' magnitude (up to ~1.4% of the largest |logit|
# against this fp32 reference: docs/scaling.md, "logprob check"), so the bound is 2% of it.
HALF_PER_LOGIT = 0.02


def default_tolerance(dtype: str, max_logit: float = 0.0, fp32: float = FP32_TOLERANCE, half: float = 0.25) -> float:
    return fp32 if "float32" in dtype else max(half, HALF_PER_LOGIT * max_logit)


def check_engines(
    pool, checkpoint: str, tolerance: float | None = None, previous: str | None = None, k: int = 8,
    tolerance_half: float = 0.25,
) -> dict[str, Any]:
    """Compare every engine with the checkpoint's fp32 reference; raise RuntimeError on a mismatch.

    `previous`: the weights the engines held before the sync; given, a sync that did nothing is
    caught whenever the two checkpoints differ by more than the rounding. `tolerance` None: by the
    engines' dtype (FP32_TOLERANCE, or `tolerance_half` for bf16 / fp16)."""
    start = time.perf_counter()
    paths = [checkpoint] + ([previous] if previous and previous != checkpoint else [])
    ref = reference_logprobs(paths, k)
    want = ref["logprobs"][0]
    old = ref["logprobs"][1] if len(paths) > 1 else None
    moved = distance(old, want, k) if old is not None else None
    dtypes = pool.dtypes()
    worst = 0.0

    def tol_of(dtype: str) -> float:
        return tolerance if tolerance is not None else default_tolerance(dtype, ref["max_logit"], half=tolerance_half)

    for i, (got, dtype) in enumerate(zip(pool.top_logprobs(PROBE, k), dtypes, strict=True)):
        tol = tol_of(dtype)
        err = distance(got, want, k)
        if err == float("inf"):
            raise RuntimeError(
                f"weight sync check failed: engine {i} ({dtype}) top tokens {[t for t, _ in got]} do not match "
                f"{checkpoint}'s {[t for t, _ in want]}"
            )
        if err > tol:
            raise RuntimeError(
                f"weight sync check failed: engine {i} ({dtype}) logprobs differ from {checkpoint}'s fp32 "
                f"reference by {err:.3g} > tolerance {tol:g}"
            )
        if old is not None:
            # Nearer the old weights than half their distance to the new, and twice as near them
            # as to the new: rounding (about equal both ways) cannot do that; a no-op sync does.
            to_old = distance(got, old, k)
            if to_old < moved / 2 and 2 * to_old < err:
                raise RuntimeError(
                    f"weight sync check failed: engine {i} ({dtype}) still holds the previous weights ({previous}): "
                    f"{to_old:.3g} from them, {err:.3g} from {checkpoint} (the two are {moved:.3g} apart)"
                )
        worst = max(worst, err)
    tols = [tol_of(d) for d in dtypes]
    return {
        "max_logprob_error": worst,
        "tolerance": max(tols),
        "engine_dtypes": sorted(set(dtypes)),
        "moved": moved,  # how far the update moved the probe (None: no previous weights given)
        # Could a sync that did nothing be told apart? (None: no previous weights to compare.)
        "conclusive": None if moved is None else moved > 4 * worst,
        "max_logit": ref["max_logit"],
        "reference_node": ref["node_id"],
        "reference_pid": ref["pid"],
        "seconds": round(time.perf_counter() - start, 3),
    }
