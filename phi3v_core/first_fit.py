"""First-fit-decreasing bin packing of token lengths: the row assignment of :mod:`phi3v_core.processing.packing`.

A module of its own, without torch, so that ``phi3v-plan`` predicts packing's rows with the very function the
collator packs with (:mod:`planner.packing`) and stays light.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["first_fit_decreasing"]


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
