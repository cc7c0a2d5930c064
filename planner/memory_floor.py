"""The error floor of the held-out memory rows: what no prediction of the step's needs can get below.

The recipe ran some settings on two cards (8xA100-80GB and 8xV100-32GB): same method, precision, attention,
micro-batch, crops and GPU count, so the same tensors. Where the 80 GB card's published peak is higher, the smaller
card proves the step ran in less: the twin's published peak (at most its card's size) bounds what the step needs.
A prediction of what the step needs (the same on any card, as every tensor term is) therefore misses the higher
row by at least ``1 - twin / published``, whatever the model; and since a median never falls below the median of
per-row lower bounds, the never-fitted memory median has a floor too (:func:`memory_floor`). A settings-only
prediction that tries to meet both twins misses one of them by at least ``(a - b) / (a + b)``.

Works on the result rows of :func:`planner.calibration.calibration_report` (dicts), so it imports nothing of it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["memory_floor", "twin_bound"]


def _settings(row: dict[str, Any]) -> tuple[Any, ...]:
    # what decides the tensors of a published row (the card does not): see AnchorRow.setup / AnchorRow.workload
    return row["method"], row["flash_attention"], row["gpus_per_node"], row["nodes"]


def twin_bound(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The same settings published LOWER on another card, and what that says about ``row``; None if there is none.

    Returns ``twin`` (its label), ``published_gb`` (``row``'s), ``needs_at_most_gb`` (the twin's published peak, capped at its card: the step ran
    in that much), ``elastic_at_least_gb`` (``row``'s published peak above it), ``need_floor_pct`` (the least error
    of a prediction of the step's needs on ``row``) and ``pair_floor_pct`` (the least larger-of-two error of one
    prediction for both rows; None where the twin's peak is its card's size). The twin must have the same modelled tensors (a guard against a settings drift).
    """
    best: dict[str, Any] | None = None
    for other in rows:
        if other["row"] == row["row"] or other["gpu"] == row["gpu"] or _settings(other) != _settings(row):
            continue
        if other["allocated_gib"] != row["allocated_gib"] or other["suspect"]:
            continue
        bound = min(other["published_gb"], other["card_gib"])
        if bound >= row["published_gb"] or (best is not None and bound >= best["needs_at_most_gb"]):
            continue
        published = row["published_gb"]
        best = {
            "twin": other["row"],
            "published_gb": published,
            "needs_at_most_gb": bound,
            "elastic_at_least_gb": round(published - bound, 2),
            "need_floor_pct": round(100 * (1 - bound / published), 1),
            # only where the twin is judged as a percentage too (a card-sized twin is judged as "fills the card")
            "pair_floor_pct": None
            if other["memory_saturated"]
            else round(100 * (published - bound) / (published + bound), 1),
        }
    return best


def _median(values: list[float]) -> float | None:
    ordered = sorted(values)
    return (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2 if ordered else None


def memory_floor(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per never-fitted memory row, the least error of a prediction of the step's needs, and the median it forces.

    ``rows``: :func:`planner.calibration.calibration_report`'s rows. Rows without a lower twin get a floor of 0 (no
    bound is known, not that the model could reach it). Returns ``rows`` (label → :func:`twin_bound`, or None),
    ``median_floor_pct`` (the never-fitted median no needs prediction goes below) and ``lines`` (the bounded rows as
    text, for ``--calibration``).
    """
    judged = [r for r in rows if r["memory_role"] == "held_out" and r["memory_held_out_error_pct"] is not None]
    bounds = {r["row"]: twin_bound(r, rows) for r in judged}
    floors = [b["need_floor_pct"] if b else 0.0 for b in bounds.values()]
    lines = [
        f"{label} published {b['published_gb']:g} GB, the same settings {b['needs_at_most_gb']:g} GB on {b['twin']} "
        f"(>= {b['elastic_at_least_gb']:g} GB the step did not need: a needs prediction is >= "
        f"{b['need_floor_pct']:.0f} % off)"
        for label, b in bounds.items()
        if b
    ]
    pair = max((b["pair_floor_pct"] for b in bounds.values() if b and b["pair_floor_pct"] is not None), default=None)
    return {"rows": bounds, "median_floor_pct": _median(floors), "pair_floor_pct": pair, "lines": lines}
