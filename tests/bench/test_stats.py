"""The asv-style comparison rule on synthetic samples, with and without a real shift."""

from __future__ import annotations

import random

import pytest

from bench.stats import MIB, MemoryTolerance, compare_memory, compare_samples, relative_noise_pct


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
    assert c.p_value is not None and c.p_value < 1e-6
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
    assert c.verdict == "same"


def test_too_few_repeats_is_inconclusive() -> None:
    c = compare_samples(samples(10.0, repeats=2, seed=1), samples(7.0, repeats=2, seed=2))
    assert c.verdict == "inconclusive"
    assert "repeats" in c.reason
    assert compare_samples(samples(10.0, repeats=2, seed=1), samples(7.0, repeats=2, seed=2),
                           min_repeats=2).verdict == "regressed"


def test_large_but_insignificant_change_is_inconclusive() -> None:
    # Medians differ by 20 % and the repeats agree (no run-to-run noise), but the steps overlap so widely that
    # Mann-Whitney cannot tell the two apart: the change is not proven.
    a = [[1.0, 10.0, 19.0]] * 3
    b = [[1.0, 8.0, 19.0]] * 3
    c = compare_samples(a, b)
    assert c.delta_pct == pytest.approx(-20) and c.noise_pct == 0
    assert c.p_value is not None and c.p_value >= 0.05
    assert c.verdict == "inconclusive" and "not significant" in c.reason


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
