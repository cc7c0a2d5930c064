"""Deciding whether a change between two benchmark runs is real: the asv-style rule ``compare`` applies.

Throughput (img/s). Each side holds, per repeat (= fresh process), the img/s of every timed step.

* ``delta_pct`` compares the medians of the pooled per-step samples.
* ``noise_pct`` is the run-to-run noise: for each side, 2 x the median absolute deviation of the per-repeat medians,
  relative to their median; the larger side wins. It catches process-level variation (clocks, placement) that
  per-step samples inside one process cannot show.
* A change is called only when every one of these holds:
  1. both sides have at least ``min_repeats`` repeats (default 3), otherwise the verdict is ``inconclusive``;
  2. ``|delta_pct| > max(threshold_pct, noise_pct)`` (default threshold 5 %);
  3. the two-sided Mann-Whitney U test on the pooled per-step samples gives ``p < alpha`` (default 0.05),
     as in asv (which uses p < 0.002 and a 10 % factor) and google-benchmark (alpha 0.05).
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
    "MemoryComparison",
    "MemoryTolerance",
    "SampleComparison",
    "Verdict",
    "compare_memory",
    "compare_samples",
    "relative_noise_pct",
]

Verdict = Literal["regressed", "improved", "same", "inconclusive"]

MIB = 1 << 20


@dataclass(frozen=True)
class SampleComparison:
    """Outcome of comparing sampled measurements (baseline ``a`` vs candidate ``b``).

    Attributes:
        a: Median of the pooled baseline samples.
        b: Median of the pooled candidate samples.
        delta_pct: ``(b - a) / a * 100``.
        noise_pct: Run-to-run noise in percent (see module docstring).
        p_value: Two-sided Mann-Whitney U p-value (``None`` when a side has fewer than 2 samples).
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
        alpha: Significance level of the Mann-Whitney U test.
        min_repeats: Repeats each side needs before a change can be called.

    Returns:
        A :class:`SampleComparison`.

    Raises:
        ValueError: A side has no samples at all.
    """
    a_reps = [list(r) for r in a_repeats if len(r)]
    b_reps = [list(r) for r in b_repeats if len(r)]
    a_all = [x for r in a_reps for x in r]
    b_all = [x for r in b_reps for x in r]
    if not a_all or not b_all:
        raise ValueError("both sides need at least one sample")
    a_med, b_med = statistics.median(a_all), statistics.median(b_all)
    delta = (b_med - a_med) / a_med * 100.0 if a_med else 0.0
    noise = max(
        relative_noise_pct([statistics.median(r) for r in a_reps]),
        relative_noise_pct([statistics.median(r) for r in b_reps]),
    )
    p_value = None
    if len(a_all) >= 2 and len(b_all) >= 2:
        from scipy.stats import mannwhitneyu

        p_value = float(mannwhitneyu(a_all, b_all, alternative="two-sided").pvalue)

    bound = max(threshold_pct, noise)
    repeats = (len(a_reps), len(b_reps))
    if abs(delta) <= bound:
        verdict: Verdict = "same"
        reason = f"|Δ| {abs(delta):.1f}% <= {bound:.1f}%"
    elif min(repeats) < min_repeats:
        verdict = "inconclusive"
        reason = f"needs >= {min_repeats} repeats per side, has {repeats[0]}/{repeats[1]}"
    elif p_value is None or p_value >= alpha:
        verdict = "inconclusive"
        reason = f"not significant (p={p_value:.3g} >= {alpha})" if p_value is not None else "too few samples"
    else:
        better = (delta > 0) == higher_is_better
        verdict = "improved" if better else "regressed"
        reason = f"|Δ| {abs(delta):.1f}% > {bound:.1f}%, p={p_value:.2g}"
    return SampleComparison(a_med, b_med, delta, noise, p_value, repeats, verdict, reason)


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
