"""Deciding whether a change between two benchmark runs is real: the asv-style rule ``compare`` applies.

Throughput (img/s). Each side holds, per repeat (= fresh process), the img/s of every timed step. The unit of
evidence is the **repeat**: steps of one process share its clocks, placement and allocator state, so they are not
independent samples, and a test on pooled steps would be overconfident. Every statistic below therefore works on
**per-repeat values**, one per fresh process: the repeat's img/s = images per step ÷ its median step time
(:meth:`bench.results.Metrics.repeat_throughputs`). A result's img/s - in ``run``, ``matrix``, ``report`` and
``compare`` alike - is the **median of its per-repeat values** (:data:`STATISTIC`), so one result has one number.

* ``delta_pct`` compares the two sides' medians of per-repeat values.
* ``noise_pct`` is the run-to-run noise: for each side, 2 x the median absolute deviation of the per-repeat values,
  relative to their median; the larger side wins.
* ``ci_pct`` is the 95 % confidence interval of the change (Welch, difference of the per-repeat means, in % of A's
  mean); ``None`` while a side has fewer than 2 repeats.
* A change is called only when every one of these holds:
  1. ``|delta_pct| > threshold_pct`` (default 5 %), otherwise the verdict is ``same``;
  2. ``|delta_pct| > noise_pct``, otherwise ``inconclusive`` (within the run-to-run noise);
  3. both sides have at least ``min_repeats`` repeats (default 3), otherwise ``inconclusive``;
  4. Welch's two-sided t-test on the per-repeat values gives ``p < alpha`` (default 0.05). Not Mann-Whitney:
     with three values per side its smallest two-sided p is 0.1, so it could never call a change at the default
     repeats; the mean of a process's step times is close to normal, which Welch needs.
  A large change is never ``same``: when it is unproven it is ``inconclusive``, and ``repeats_needed`` says how
  many repeats per side would decide it, from the observed repeat-to-repeat spread (80 % power at ``alpha``).

Memory is not sampled, so it uses tolerances instead of a test: allocated bytes are nearly deterministic for the same
code and shapes (tolerance max(1 %, 1 MiB)); reserved and NVML bytes include allocator fragmentation and the CUDA
context (tolerance max(5 %, 256 MiB)).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from phi3v_core.cli.vocabulary import plural

__all__ = [
    "MEMORY_TOLERANCES",
    "RULE_TEXT",
    "MemoryComparison",
    "MemoryTolerance",
    "SampleComparison",
    "Verdict",
    "STATISTIC",
    "compare_memory",
    "compare_repeats",
    "relative_noise_pct",
    "repeat_p_value",
    "repeats_to_decide",
]

Verdict = Literal["regressed", "improved", "same", "inconclusive"]

MIB = 1 << 20


#: The statistic behind every img/s a result shows (``run``, ``matrix``, ``report``, ``compare``).
STATISTIC = "median over repeats of (images per step ÷ the repeat's median step time)"


@dataclass(frozen=True)
class SampleComparison:
    """Outcome of comparing sampled measurements (baseline ``a`` vs candidate ``b``).

    Attributes:
        a: Median of the baseline's per-repeat values.
        b: Median of the candidate's per-repeat values.
        delta_pct: ``(b - a) / a * 100``.
        noise_pct: Run-to-run noise in percent (see module docstring).
        p_value: Two-sided Welch t-test p-value on per-repeat values (``None`` when a side has fewer than 2
            repeats).
        repeats: Repeats on each side.
        verdict: ``regressed``, ``improved``, ``same`` or ``inconclusive``.
        reason: Why the verdict is what it is, in one sentence.
        ci_pct: 95 % confidence interval of the change in percent (Welch; ``None`` with < 2 repeats on a side).
        repeats_needed: For an unproven change: repeats per side that would decide it (``None`` otherwise).
        statistic: What ``a`` and ``b`` are (:data:`STATISTIC`).
    """

    a: float
    b: float
    delta_pct: float
    noise_pct: float
    p_value: float | None
    repeats: tuple[int, int]
    verdict: Verdict
    reason: str
    ci_pct: tuple[float, float] | None = None
    repeats_needed: int | None = None
    statistic: str = STATISTIC

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


def relative_noise_pct(repeat_medians: Sequence[float]) -> float:
    """Return 2 x MAD of per-repeat values relative to their median, in percent (0 for a single repeat)."""
    if len(repeat_medians) < 2:
        return 0.0
    center = statistics.median(repeat_medians)
    if center == 0:
        return 0.0
    mad = statistics.median(abs(x - center) for x in repeat_medians)
    return 200.0 * mad / abs(center)


def compare_repeats(
    a_values: Sequence[float],
    b_values: Sequence[float],
    *,
    higher_is_better: bool = True,
    threshold_pct: float = 5.0,
    alpha: float = 0.05,
    min_repeats: int = 3,
) -> SampleComparison:
    """Compare one value per repeat on each side with the rule in the module docstring.

    Args:
        a_values: Baseline, one value per repeat (:meth:`bench.results.Metrics.repeat_throughputs`).
        b_values: Candidate, same form.
        higher_is_better: True for throughput, False for times.
        threshold_pct: Smallest relative change worth reporting, in percent.
        alpha: Significance level of the Welch test.
        min_repeats: Repeats each side needs before a change can be called.

    Returns:
        A :class:`SampleComparison` whose ``reason`` says why.

    Raises:
        ValueError: A side has no values.
    """
    if not a_values or not b_values:
        raise ValueError("both sides need at least one sample")
    a_med, b_med = statistics.median(a_values), statistics.median(b_values)
    delta = (b_med - a_med) / a_med * 100.0 if a_med else 0.0
    noise = max(relative_noise_pct(a_values), relative_noise_pct(b_values))
    p_value = repeat_p_value(a_values, b_values)
    ci = _welch_ci_pct(a_values, b_values)
    repeats = (len(a_values), len(b_values))
    needed: int | None = None
    shown = f"Δ {delta:+.1f}%"
    if abs(delta) <= threshold_pct:
        verdict: Verdict = "same"
        reason = f"|Δ| {abs(delta):.1f}% <= threshold {threshold_pct:g}%"
    else:
        verdict = "inconclusive"
        needed = repeats_to_decide(a_values, b_values, delta, alpha, min_repeats)
        advice = (f"~{needed} repeats per side would decide it (from the observed spread)" if needed
                  else f"run >= {max(min_repeats, 2)} repeats per side (no repeat-to-repeat spread observed yet)")
        few = f", and A has {repeats[0]}, B {plural(repeats[1], 'repeat')}" if min(repeats) < min_repeats else ""
        if abs(delta) <= noise:
            reason = f"{shown} is within the run-to-run noise {noise:.1f}% (2×MAD of per-repeat values){few}; {advice}"
        elif min(repeats) < min_repeats:
            reason = f"{shown} but A has {repeats[0]} and B {plural(repeats[1], 'repeat')}, < {min_repeats}; {advice}"
        elif p_value is None or p_value >= alpha:
            reason = f"{shown} not significant (Welch p={p_value:.2g} >= {alpha:g}); {advice}"
        else:
            needed = None
            better = (delta > 0) == higher_is_better
            verdict = "improved" if better else "regressed"
            reason = f"{shown} > max({threshold_pct:g}%, noise {noise:.1f}%), Welch p={p_value:.2g} < {alpha:g}"
    return SampleComparison(a_med, b_med, delta, noise, p_value, repeats, verdict, reason, ci, needed)


def _welch_ci_pct(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """``level`` confidence interval of (mean b - mean a) in % of mean a (Welch-Satterthwaite degrees of freedom)."""
    if len(a) < 2 or len(b) < 2 or not statistics.mean(a):
        return None
    ma, mb = statistics.mean(a), statistics.mean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = mb - ma
    if va + vb == 0:
        return (100.0 * diff / ma, 100.0 * diff / ma)
    from scipy.stats import t

    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(t.ppf(0.5 + level / 2, dof)) * math.sqrt(va + vb)
    return (100.0 * (diff - half) / ma, 100.0 * (diff + half) / ma)


def repeats_to_decide(
    a: Sequence[float], b: Sequence[float], delta_pct: float, alpha: float = 0.05, min_repeats: int = 3
) -> int | None:
    """Repeats per side at which a change of ``delta_pct`` would be significant at ``alpha`` with 80 % power.

    The spread is the relative standard deviation of the per-repeat values of the sides that have two or more
    (pooled); ``None`` when neither side does (nothing observed to size it from). Never below ``min_repeats``.
    """
    spreads = [statistics.stdev(v) / statistics.mean(v) for v in (a, b) if len(v) >= 2 and statistics.mean(v)]
    if not spreads or not delta_pct:
        return None
    sd = math.sqrt(sum(s * s for s in spreads) / len(spreads))
    z = statistics.NormalDist().inv_cdf(1 - alpha / 2) + statistics.NormalDist().inv_cdf(0.8)
    # Two-sample normal approximation, plus one repeat for the t distribution's heavier tails at small n.
    n = math.ceil(2 * (z * sd / (abs(delta_pct) / 100.0)) ** 2) + 1
    return max(min_repeats, 2, n)


def repeat_p_value(a_medians: Sequence[float], b_medians: Sequence[float]) -> float | None:
    """Two-sided Welch t-test p-value between per-repeat values (``None`` with < 2 per side)."""
    if len(a_medians) < 2 or len(b_medians) < 2:
        return None
    if statistics.pstdev(a_medians) == 0 and statistics.pstdev(b_medians) == 0:
        return 0.0 if statistics.mean(a_medians) != statistics.mean(b_medians) else 1.0
    from scipy.stats import ttest_ind

    return float(ttest_ind(a_medians, b_medians, equal_var=False).pvalue)


#: How ``compare`` states its rule (shown under every comparison).
RULE_TEXT = (
    "img/s = median over repeats of (images per step ÷ the repeat's median step time); a change is called when "
    "|Δ| > max({threshold:g}%, noise = 2×MAD of per-repeat values), >= {repeats} repeats per side and "
    "Welch t-test p < {alpha:g}; CI = 95% Welch interval of the change"
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
