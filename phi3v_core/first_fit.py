"""First-fit-decreasing bin packing of token lengths: the row assignment of :mod:`phi3v_core.processing.packing`.

A module of its own, without torch, so that ``phi3v-plan`` predicts packing's rows with the very function the
collator packs with (:mod:`planner.packing`) and stays light.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["first_fit_decreasing", "pack_rows"]


def first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``budget`` tokens (first-fit, longest first).

    Within a bin the indices keep the order in which they were placed (longest first); bins are ordered by their first
    (longest) sample. Every length must fit the budget.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length > budget:
            raise ValueError(f"a sample of {length} tokens does not fit a pack budget of {budget}")
        target = next((b for b, free in enumerate(room) if free >= length), None)
        if target is None:
            bins.append([index])
            room.append(budget - length)
        else:
            bins[target].append(index)
            room[target] -= length
    return bins


def pack_rows(lengths: Sequence[int], budget: int) -> tuple[list[list[int]], int]:
    """The packed rows of ``lengths`` under ``budget`` and their width (every row is as wide as the widest).

    First-fit-decreasing rows, unless they would compute at least as many tokens as padding (rows × width ≥ samples ×
    longest: short samples under a large budget can fill fewer, wider rows); then one sample per row, the padded
    batch's shape. The one rule the collator packs by and the planner counts.
    """
    rows = first_fit_decreasing(lengths, budget)
    width = max(sum(lengths[i] for i in row) for row in rows)
    longest = max(lengths)
    if len(rows) * width >= len(lengths) * longest:
        return [[i] for i in range(len(lengths))], longest
    return rows, width
