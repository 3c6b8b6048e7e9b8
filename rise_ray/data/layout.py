"""Trained turns as examples, and examples as rows (steps 4-5 of rise_ray.data.builder)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rise_ray.data.store import BuildError

# --- examples ---------------------------------------------------------------------------------------


@dataclass
class TurnExample:
    """One trained turn as a prefix-layout example: ids, first trained position, weight."""

    traj_index: int
    turn_index: int
    problem_id: str
    weight: float
    ids: list[int]
    start: int  # ids[start:] are the reply's tokens (trained); ids[:start] the context
    truncated: int = 0  # context tokens cut from the left


def fit_length(ex: TurnExample, max_length: int, overflow: str) -> TurnExample | None:
    """The example within max_length tokens: context cut from the left, or None (dropped)."""
    n = len(ex.ids)
    if n <= max_length:
        return ex
    reply = n - ex.start
    if overflow == "drop" or reply >= max_length:  # the reply needs >= 1 context token before it
        return None
    cut = n - max_length
    return TurnExample(
        ex.traj_index, ex.turn_index, ex.problem_id, ex.weight, ex.ids[cut:], ex.start - cut, cut
    )


# --- 5. layout ------------------------------------------------------------------------------------


def _row(ids: list[int], members: list[TurnExample]) -> dict[str, Any]:
    """The row's token weights: each member's turn weight spread over its n reply tokens (weight / n,
    so the loss takes the turn's mean token CE; see rise_ray.train.loop for the rest)."""
    weights = [0.0] * len(ids)
    trained = 0
    for ex in members:
        n = len(ex.ids) - ex.start
        per_token = ex.weight / n
        for pos in range(ex.start, len(ex.ids)):
            weights[pos] += per_token
        trained += n
    return {
        "input_ids": ids,
        "weights": weights,
        "units": len(members),
        "num_tokens": len(ids),
        "trained_tokens": trained,
        "problem_id": members[0].problem_id,
        "turns": sorted(ex.turn_index for ex in members),
    }


def layout_rows(examples: list[TurnExample], layout: str) -> list[dict[str, Any]]:
    """Rows for `examples` (prefix-layout examples of one trajectory, already length-fitted).

    prefix: one row each. packed: longest first, each example joins the first row whose ids
    start with its ids (and whose position 0 is its position 0: never a truncated example)."""
    if layout == "prefix":
        return [_row(ex.ids, [ex]) for ex in examples]
    if layout != "packed":
        raise BuildError(f"data.layout: unknown layout {layout!r} (packed | prefix)")
    groups: list[tuple[list[int], list[TurnExample]]] = []
    for ex in sorted(examples, key=lambda e: (-len(e.ids), e.turn_index)):
        home = None
        if not ex.truncated:
            for ids, members in groups:
                if not members[0].truncated and ids[: len(ex.ids)] == ex.ids:
                    home = members
                    break
        if home is None:
            groups.append((ex.ids, [ex]))
        else:
            home.append(ex)
    return [_row(ids, members) for ids, members in groups]
