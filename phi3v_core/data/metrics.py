"""Evaluation metrics of the recipe: ANLS (DocVQA) and normalised exact-match accuracy (the other tasks).

Both return a fraction in [0, 1] (the recipe's published numbers are these ×100).

**ANLS case sensitivity.** The recipe strips the prediction (``strip()`` then ``strip('.')``) but keeps its case and
leaves the ground truths untouched, so its ANLS is case-sensitive ("Pepsi" vs "PEPSI" scores 0.4 → 0). The official
DocVQA evaluation lower-cases both sides. We default to ``case_sensitive=True`` so scores are comparable with the
recipe's published table (83.65 etc.); pass ``case_sensitive=False`` for the official-style variant, which lower-cases
prediction and references (it changes nothing else). Every result should record which variant produced it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import Levenshtein

__all__ = [
    "ANLS_THRESHOLD",
    "METRICS",
    "accuracy",
    "anls",
    "anls_score",
    "compute_metric",
    "normalize_answer",
    "normalize_prediction",
]

logger = logging.getLogger(__name__)

#: ANLS threshold τ: a normalised Levenshtein distance at or above it scores 0.
ANLS_THRESHOLD = 0.5


def normalize_prediction(text: str) -> str:
    """The recipe's prediction clean-up: surrounding whitespace, then surrounding periods (case kept)."""
    return text.strip().strip(".")


def normalize_answer(text: str) -> str:
    """Accuracy normalisation, applied to both sides: ``strip()``, ``strip('.')``, ``lower()``."""
    return text.strip().strip(".").lower()


def anls_score(
    prediction: str, references: Sequence[str], *, threshold: float = ANLS_THRESHOLD, case_sensitive: bool = True
) -> float:
    """ANLS of one prediction: ``max`` over references of ``1 - NL`` if ``NL < threshold`` else 0.

    ``NL = Levenshtein(reference, prediction) / max(len(reference), len(prediction))``. The prediction is normalised
    with :func:`normalize_prediction`; an empty prediction scores 0.

    Args:
        prediction: Generated answer.
        references: Accepted ground-truth answers (at least one).
        threshold: τ (0.5 in DocVQA).
        case_sensitive: ``True`` is the recipe's behaviour; ``False`` lower-cases both sides.

    Returns:
        Score in [0, 1].
    """
    if not references:
        raise ValueError("anls_score needs at least one reference answer")
    pred = normalize_prediction(prediction)
    if not pred:
        return 0.0
    if not case_sensitive:
        pred = pred.lower()
    best = 0.0
    for reference in references:
        gt = reference if case_sensitive else reference.lower()
        longest = max(len(gt), len(pred))
        distance = Levenshtein.distance(gt, pred) / longest
        score = 1.0 - distance if distance < threshold else 0.0
        best = max(best, score)
    return best


def _check_lengths(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} questions; they must pair up")
    if not predictions:
        raise ValueError("no predictions to score")


def anls(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    threshold: float = ANLS_THRESHOLD,
    case_sensitive: bool = True,
) -> float:
    """Mean ANLS over questions (see :func:`anls_score`).

    Args:
        predictions: One generated answer per question.
        references: Accepted answers per question.
        threshold: τ.
        case_sensitive: Recipe default ``True``; see the module docstring.

    Returns:
        Mean score in [0, 1].
    """
    _check_lengths(predictions, references)
    empty = sum(1 for p in predictions if not normalize_prediction(p))
    if empty:
        # The recipe prints a warning for empty generations; they score 0 and usually mean generation stopped early.
        logger.warning("%d of %d predictions are empty and score 0", empty, len(predictions))
    scores = [
        anls_score(p, refs, threshold=threshold, case_sensitive=case_sensitive)
        for p, refs in zip(predictions, references)
    ]
    return sum(scores) / len(scores)


def accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Exact-match accuracy after :func:`normalize_answer` on both sides; a match with any reference counts.

    Args:
        predictions: One generated answer per question.
        references: Accepted answers per question.

    Returns:
        Fraction correct in [0, 1].
    """
    _check_lengths(predictions, references)
    correct = sum(
        1 for p, refs in zip(predictions, references) if normalize_answer(p) in {normalize_answer(r) for r in refs}
    )
    return correct / len(predictions)


#: Metric name (as in the recipe's eval JSON keys) → function(predictions, references) -> float.
METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {"anls": anls, "accuracy": accuracy}


def compute_metric(
    name: str, predictions: Sequence[str], references: Sequence[Sequence[str]], **kwargs: object
) -> float:
    """Dispatch to a metric by name (``"anls"`` or ``"accuracy"``); extra keyword arguments go to the metric.

    Raises:
        ValueError: Unknown metric name.
    """
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
    return METRICS[name](predictions, references, **kwargs)  # type: ignore[call-arg]
