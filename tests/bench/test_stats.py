"""The asv-style comparison rule on synthetic samples, with and without a real shift."""

from __future__ import annotations

import random
import statistics

import pytest

from bench.stats import MIB, MemoryTolerance, compare_memory, compare_repeats, relative_noise_pct


def compare_samples(a_repeats, b_repeats, **options):
    """Per-step samples of each repeat, reduced to one value per repeat (their median), then :func:`compare_repeats`."""
    return compare_repeats([statistics.median(r) for r in a_repeats if len(r)],
                           [statistics.median(r) for r in b_repeats if len(r)], **options)


def samples(center: float, *, repeats: int = 3, steps: int = 10, jitter: float = 0.02, seed: int = 0,
            repeat_offsets: list[float] | None = None) -> list[list[float]]:
    """Per-repeat samples around ``center`` with relative Gaussian step jitter and optional per-repeat offsets."""
    rng = random.Random(seed)
    offsets = repeat_offsets or [0.0] * repeats
    return [[center * (1 + off) * (1 + rng.gauss(0, jitter)) for _ in range(steps)] for off in offsets]


def test_real_slowdown_is_a_regression() -> None:
    c = compare_samples(samples(10.0, seed=1), samples(8.0, seed=2))  # -20 % img/s
    assert c.verdict == "regressed"
    assert c.delta_pct == pytest.approx(-20, abs=2)
    assert c.p_value is not None and c.p_value < 1e-4
    assert c.repeats == (3, 3)


def test_real_speedup_is_an_improvement() -> None:
    assert compare_samples(samples(10.0, seed=1), samples(12.0, seed=2)).verdict == "improved"


def test_times_lower_is_better() -> None:
    c = compare_samples(samples(1.0, seed=1), samples(1.3, seed=2), higher_is_better=False)
    assert c.verdict == "regressed"


def test_no_shift_is_same() -> None:
    c = compare_samples(samples(10.0, seed=1), samples(10.0, seed=2))
    assert c.verdict == "same"
    assert abs(c.delta_pct) < 2


def test_significant_but_small_change_stays_below_threshold() -> None:
    # 3 % with tiny jitter is statistically clear, but below the 5 % floor: not worth a CI failure.
    c = compare_samples(samples(10.0, jitter=0.002, seed=1), samples(9.7, jitter=0.002, seed=2))
    assert c.p_value < 0.05
    assert c.verdict == "same"
    assert compare_samples(samples(10.0, jitter=0.002, seed=1), samples(9.7, jitter=0.002, seed=2),
                           threshold_pct=2).verdict == "regressed"


def test_run_to_run_noise_raises_the_bar() -> None:
    # Repeats disagree by ±15 % (e.g. different GPU clocks per process): a 10 % change is within the noise.
    noisy = [-0.15, 0.0, 0.15]
    c = compare_samples(samples(10.0, seed=1, repeat_offsets=noisy), samples(9.0, seed=2, repeat_offsets=noisy))
    assert c.noise_pct == pytest.approx(30, abs=3)
    # Within the noise is unproven, not "same": the reason says so and how many repeats would decide it.
    assert c.verdict == "inconclusive"
    assert "within the run-to-run noise" in c.reason
    assert c.repeats_needed is not None and c.repeats_needed > 3
    assert f"~{c.repeats_needed} repeats per side would decide it" in c.reason


def test_a_large_change_against_one_repeat_is_never_same() -> None:
    # The newcomer's case: -47 % against a 1-repeat baseline, the candidate's repeats scattered by ±30 %.
    a = [[1.0] * 5]
    b = [[0.4] * 5, [0.53] * 5, [0.7] * 5]
    c = compare_samples(a, b)
    assert c.delta_pct == pytest.approx(-47, abs=1)
    assert c.verdict == "inconclusive"
    assert c.ci_pct is None  # no interval with one repeat on a side
    # the spread of B's repeats sizes the advice
    assert c.repeats_needed is not None and c.repeats_needed >= 3
    assert "would decide it" in c.reason


def test_with_no_spread_observed_the_advice_is_the_minimum() -> None:
    c = compare_samples([[1.0] * 5], [[0.5] * 5])
    assert c.verdict == "inconclusive" and c.repeats_needed is None
    assert "run >= 3 repeats per side (no repeat-to-repeat spread observed yet)" in c.reason


def test_repeats_to_decide_grows_with_spread_and_shrinks_with_the_change() -> None:
    from bench.stats import repeats_to_decide

    tight = repeats_to_decide([10.0, 10.1, 9.9], [9.0, 9.1, 8.9], -10.0)
    loose = repeats_to_decide([10.0, 11.0, 9.0], [9.0, 10.0, 8.0], -10.0)
    assert tight == 3 and loose > tight
    assert repeats_to_decide([10.0, 11.0, 9.0], [7.0, 8.0, 6.0], -30.0) < loose


def test_confidence_interval_brackets_the_change() -> None:
    c = compare_samples(samples(10.0, seed=1), samples(8.0, seed=2))
    low, high = c.ci_pct
    assert low < c.delta_pct < high < 0


def test_too_few_repeats_is_inconclusive() -> None:
    c = compare_samples(samples(10.0, repeats=2, seed=1), samples(7.0, repeats=2, seed=2))
    assert c.verdict == "inconclusive"
    assert "repeats" in c.reason
    assert compare_samples(samples(10.0, repeats=2, seed=1), samples(7.0, repeats=2, seed=2),
                           min_repeats=2).verdict == "regressed"


def test_large_but_insignificant_change_is_inconclusive() -> None:
    # Per-repeat medians differ by ~20 % and exceed the noise bound, but three processes per side scatter so much
    # that the test on per-repeat medians cannot prove it: inconclusive.
    a = [[10.0] * 5, [10.2] * 5, [13.0] * 5]
    b = [[7.6] * 5, [8.1] * 5, [10.9] * 5]
    c = compare_samples(a, b)
    assert c.delta_pct == pytest.approx(-20.6, abs=0.5)
    assert abs(c.delta_pct) > max(5.0, c.noise_pct)
    assert c.p_value is not None and c.p_value >= 0.05
    assert c.verdict == "inconclusive" and "not significant" in c.reason


def test_steps_of_one_process_are_not_independent_evidence() -> None:
    # Steps are nearly identical inside each process, processes differ by a few percent. Pooled per-step samples
    # would "prove" the 7 % gap (30 vs 30 near-identical values); one median per process does not.
    a = samples(10.0, jitter=0.002, seed=1, repeat_offsets=[0.0, 0.08, -0.02])
    b = samples(10.0, jitter=0.002, seed=2, repeat_offsets=[-0.07, 0.01, -0.09])
    c = compare_samples(a, b)
    assert c.p_value is not None and c.p_value >= 0.05
    assert c.verdict == "inconclusive"
    from scipy.stats import mannwhitneyu

    pooled = mannwhitneyu([x for r in a for x in r], [x for r in b for x in r]).pvalue
    assert pooled < 0.05  # what the old pooled-steps rule would have called


@pytest.mark.parametrize("seed", range(20))
def test_a_real_ten_percent_shift_is_flagged_and_noise_is_not(seed: int) -> None:
    # Realistic repeats: 1 % step jitter and 1.5 % process-to-process spread, three processes per side.
    rng = random.Random(seed)

    def side(center: float, offset_seed: int) -> list[list[float]]:
        offsets = [rng.gauss(0, 0.015) for _ in range(3)]
        return samples(center, jitter=0.01, seed=offset_seed, repeat_offsets=offsets)

    base = side(10.0, seed * 3 + 1)
    assert compare_samples(base, side(9.0, seed * 3 + 2)).verdict == "regressed"
    assert compare_samples(base, side(10.0, seed * 3 + 3)).verdict == "same"


def test_relative_noise() -> None:
    assert relative_noise_pct([10.0]) == 0.0
    assert relative_noise_pct([9.0, 10.0, 11.0]) == pytest.approx(20.0)  # 2 * MAD(1) / 10


def test_empty_side_is_an_error() -> None:
    with pytest.raises(ValueError):
        compare_samples([], [[1.0]])


@pytest.mark.parametrize(
    ("field", "a", "b", "verdict"),
    [
        ("gpu_allocated_bytes", 10_000 * MIB, 10_050 * MIB, "same"),        # +0.5 %: allocator noise
        ("gpu_allocated_bytes", 10_000 * MIB, 10_200 * MIB, "regressed"),   # +2 %: real
        ("gpu_allocated_bytes", 10_000 * MIB, 9_700 * MIB, "improved"),
        ("gpu_allocated_bytes", 10 * MIB, 10 * MIB + 512 * 1024, "same"),  # 5 % of a tiny model, under 1 MiB
        ("gpu_reserved_bytes", 10_000 * MIB, 10_300 * MIB, "same"),         # +3 %: fragmentation
        ("gpu_reserved_bytes", 10_000 * MIB, 11_000 * MIB, "regressed"),
    ],
)
def test_memory_tolerances(field, a, b, verdict) -> None:
    assert compare_memory(field, a, b).verdict == verdict


def test_memory_tolerance_override() -> None:
    assert compare_memory("gpu_allocated_bytes", 100, 101, MemoryTolerance(0.0, 0)).verdict == "regressed"
