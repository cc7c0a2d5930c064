"""Deciding whether a change between two benchmark runs is real: the asv-style rule ``compare`` applies.

Throughput (img/s). Each side holds, per repeat (= fresh process), the img/s of every timed step. The unit of
evidence is the **repeat**: steps of one process share its clocks, placement and allocator state, so they are not
independent samples, and a test on pooled steps would be overconfident. Every statistic below therefore works on
**per-repeat medians**, one value per fresh process.

* ``delta_pct`` compares the medians of the per-repeat medians.
* ``noise_pct`` is the run-to-run noise: for each side, 2 x the median absolute deviation of the per-repeat medians,
  relative to their median; the larger side wins.
* A change is called only when every one of these holds:
  1. both sides have at least ``min_repeats`` repeats (default 3), otherwise the verdict is ``inconclusive``;
  2. ``|delta_pct| > max(threshold_pct, noise_pct)`` (default threshold 5 %);
  3. Welch's two-sided t-test on the per-repeat medians gives ``p < alpha`` (default 0.05). Not Mann-Whitney:
     with three values per side its smallest two-sided p is 0.1, so it could never call a change at the default
     repeats; the mean of a process's step times is close to normal, which Welch needs.
  A large but unproven change is ``inconclusive``; a small one is ``same``.

Memory is not sampled, so it uses tolerances instead of a test: allocated bytes are nearly deterministic for the same
code and shapes (tolerance max(1 %, 1 MiB)); reserved and NVML bytes include allocator fragmentation and the CUDA
context (tolerance max(5 %, 256 MiB)).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = [
    "MEMORY_TOLERANCES",
    "RULE_TEXT",
    "MemoryComparison",
    "MemoryTolerance",
    "SampleComparison",
    "Verdict",
    "compare_memory",
    "compare_samples",
    "relative_noise_pct",
    "repeat_p_value",
]

Verdict = Literal["regressed", "improved", "same", "inconclusive"]

MIB = 1 << 20


@dataclass(frozen=True)
class SampleComparison:
    """Outcome of comparing sampled measurements (baseline ``a`` vs candidate ``b``).

    Attributes:
        a: Median of the baseline's per-repeat medians.
        b: Median of the candidate's per-repeat medians.
        delta_pct: ``(b - a) / a * 100``.
        noise_pct: Run-to-run noise in percent (see module docstring).
        p_value: Two-sided Welch t-test p-value on per-repeat medians (``None`` when a side has fewer than 2
            repeats, or both are constant).
        repeats: Repeats on each side.
        verdict: ``regressed``, ``improved``, ``same`` or ``inconclusive``.
        reason: One short phrase explaining the verdict.
    """

    a: float
    b: float
    delta_pct: float
    noise_pct: float
    p_value: float | None
    repeats: tuple[int, int]
    verdict: Verdict
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


def relative_noise_pct(repeat_medians: Sequence[float]) -> float:
    """Return 2 x MAD of per-repeat medians relative to their median, in percent (0 for a single repeat)."""
    if len(repeat_medians) < 2:
        return 0.0
    center = statistics.median(repeat_medians)
    if center == 0:
        return 0.0
    mad = statistics.median(abs(x - center) for x in repeat_medians)
    return 200.0 * mad / abs(center)


def compare_samples(
    a_repeats: Sequence[Sequence[float]],
    b_repeats: Sequence[Sequence[float]],
    *,
    higher_is_better: bool = True,
    threshold_pct: float = 5.0,
    alpha: float = 0.05,
    min_repeats: int = 3,
) -> SampleComparison:
    """Compare two sets of sampled measurements with the rule in the module docstring.

    Args:
        a_repeats: Baseline samples, one inner sequence per repeat (e.g. per-step img/s of one process).
        b_repeats: Candidate samples, same layout.
        higher_is_better: True for throughput, False for times.
        threshold_pct: Smallest relative change worth reporting, in percent.
        alpha: Significance level of the test on per-repeat medians.
        min_repeats: Repeats each side needs before a change can be called.

    Returns:
        A :class:`SampleComparison`.

    Raises:
        ValueError: A side has no samples at all.
    """
    a_meds = [statistics.median(r) for r in a_repeats if len(r)]
    b_meds = [statistics.median(r) for r in b_repeats if len(r)]
    if not a_meds or not b_meds:
        raise ValueError("both sides need at least one sample")
    a_med, b_med = statistics.median(a_meds), statistics.median(b_meds)
    delta = (b_med - a_med) / a_med * 100.0 if a_med else 0.0
    noise = max(relative_noise_pct(a_meds), relative_noise_pct(b_meds))
    p_value = repeat_p_value(a_meds, b_meds)

    bound = max(threshold_pct, noise)
    repeats = (len(a_meds), len(b_meds))
    if abs(delta) <= bound:
        verdict: Verdict = "same"
        reason = f"|Δ| {abs(delta):.1f}% <= {bound:.1f}%"
    elif min(repeats) < min_repeats:
        verdict = "inconclusive"
        reason = f"needs >= {min_repeats} repeats per side, has {repeats[0]}/{repeats[1]}"
    elif p_value is None or p_value >= alpha:
        verdict = "inconclusive"
        reason = f"not significant (p={p_value:.3g} >= {alpha})" if p_value is not None else "too few repeats"
    else:
        better = (delta > 0) == higher_is_better
        verdict = "improved" if better else "regressed"
        reason = f"|Δ| {abs(delta):.1f}% > {bound:.1f}%, p={p_value:.2g}"
    return SampleComparison(a_med, b_med, delta, noise, p_value, repeats, verdict, reason)


def repeat_p_value(a_medians: Sequence[float], b_medians: Sequence[float]) -> float | None:
    """Two-sided Welch t-test p-value between per-repeat medians (``None`` with < 2 per side or no spread)."""
    if len(a_medians) < 2 or len(b_medians) < 2:
        return None
    if statistics.pstdev(a_medians) == 0 and statistics.pstdev(b_medians) == 0:
        return 0.0 if statistics.mean(a_medians) != statistics.mean(b_medians) else 1.0
    from scipy.stats import ttest_ind

    return float(ttest_ind(a_medians, b_medians, equal_var=False).pvalue)


#: How ``compare`` states its rule (shown under every comparison).
RULE_TEXT = (
    "per-repeat medians (one value per fresh process): |Δ| > max({threshold:g}%, noise = 2×MAD), "
    "Welch t-test p < {alpha:g}, >= {repeats} repeats per side"
)


@dataclass(frozen=True)
class MemoryTolerance:
    """A change is real when it exceeds both the relative and the absolute tolerance."""

    rel_pct: float
    abs_bytes: int


#: Tolerances per memory field (see module docstring).
MEMORY_TOLERANCES: dict[str, MemoryTolerance] = {
    "gpu_allocated_bytes": MemoryTolerance(1.0, 1 * MIB),
    "cpu_tensor_peak_bytes": MemoryTolerance(1.0, 1 * MIB),
    "gpu_reserved_bytes": MemoryTolerance(5.0, 256 * MIB),
    "nvml_process_bytes": MemoryTolerance(5.0, 256 * MIB),
    "cpu_rss_bytes": MemoryTolerance(5.0, 256 * MIB),
}


@dataclass(frozen=True)
class MemoryComparison:
    """Outcome of comparing one peak-memory figure (lower is better)."""

    field: str
    a: int
    b: int
    delta_pct: float
    verdict: Verdict

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


def compare_memory(name: str, a: int, b: int, tolerance: MemoryTolerance | None = None) -> MemoryComparison:
    """Compare peak bytes ``a`` (baseline) and ``b`` (candidate) of memory field ``name``.

    Args:
        name: A memory field, used to pick the default tolerance from :data:`MEMORY_TOLERANCES`.
        a: Baseline peak bytes.
        b: Candidate peak bytes.
        tolerance: Override of the default tolerance.

    Returns:
        A :class:`MemoryComparison` whose verdict is ``regressed`` (more memory), ``improved`` or ``same``.
    """
    tol = tolerance or MEMORY_TOLERANCES.get(name, MemoryTolerance(5.0, 256 * MIB))
    diff = b - a
    delta = diff / a * 100.0 if a else (0.0 if not diff else float("inf"))
    limit = max(tol.rel_pct / 100.0 * a, tol.abs_bytes)
    if abs(diff) <= limit:
        verdict: Verdict = "same"
    else:
        verdict = "regressed" if diff > 0 else "improved"
    return MemoryComparison(name, a, b, delta, verdict)
