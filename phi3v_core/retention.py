"""Update retention: the share of trained weights that one optimizer step actually changes.

AdamW moves every trained weight by about the learning rate per step (its first step is exactly ``lr * sign(g)``;
later steps are mostly smaller, so the figure is an upper bound). The new value is then stored in the weights'
dtype. With round-to-nearest a step shorter than half a unit in the last place (ulp) of the weight rounds back to
the old value and is lost: bf16 keeps 8 significant bits, so a weight of 0.02 (ulp 2^-13 ≈ 1.2e-4) ignores every
step below 6.1e-5, and at the full fine-tuning recipe's lr of 5e-6 only weights under 2^-9 ≈ 0.002 move.

For a weight ``w`` with binary exponent ``e = floor(log2 |w|)`` and ``m`` explicit mantissa bits, the step survives
when ``lr > ulp(w) / 2 = 2^(e - m - 1)``, i.e. for ``|w| < T = 2^(E + 1)`` with ``E`` the largest integer below
``log2(lr) + m + 1``. For weights spread as ``N(0, σ)`` the retained share is ``erf(T / (σ √2))``. σ defaults to
0.02 (Phi-3's ``initializer_range``; the issue's "typical size |w| ≈ 0.02").

Layouts that keep the update: fp32 weights (the AMP master copy, DeepSpeed's fp32 partitions, LoRA's fp32
adapters: ``m = 23``), or 16-bit weights with compensated updates (stochastic rounding or Kahan summation keep the
expected step exactly: retention 1). A layout whose retention is below :data:`RETENTION_FLOOR` is never
recommended by ``phi3v-plan`` and ``phi3v-finetune`` refuses it unless told to go on.
"""

from __future__ import annotations

import math

__all__ = ["MANTISSA_BITS", "RETENTION_FLOOR", "TYPICAL_WEIGHT_STD", "retention_note", "update_retention"]

#: Explicit mantissa bits of each storage dtype (IEEE 754 binary32/binary16; bfloat16 keeps fp32's exponent).
MANTISSA_BITS: dict[str, int] = {"fp32": 23, "fp16": 10, "bf16": 7}
#: Spread of the trained weights the figure assumes (Phi-3's ``initializer_range``).
TYPICAL_WEIGHT_STD = 0.02
#: Below this retention a layout cannot apply the updates it is given: never recommended, refused by finetune.
RETENTION_FLOOR = 0.5


def update_retention(
    learning_rate: float, weight_dtype: str, compensated: bool = False, weight_std: float = TYPICAL_WEIGHT_STD
) -> float:
    """Expected share of trained weights that an ``learning_rate``-sized step changes once stored.

    Args:
        learning_rate: Peak learning rate (AdamW's per-element step is at most about this).
        weight_dtype: dtype the optimizer writes the updated weights into (``fp32``, ``bf16``, ``fp16``): the
            master copy where there is one.
        compensated: The optimizer rounds stochastically or keeps a Kahan compensation buffer, so the expected
            update is applied in full whatever the dtype.
        weight_std: Standard deviation of the trained weights.

    Returns:
        A share in [0, 1].

    Raises:
        ValueError: Unknown dtype or a learning rate / spread that is not positive.
    """
    if weight_dtype not in MANTISSA_BITS:
        raise ValueError(f"weight dtype {weight_dtype!r} is not one of {', '.join(MANTISSA_BITS)}")
    if learning_rate <= 0 or weight_std <= 0:
        raise ValueError(f"learning rate ({learning_rate}) and weight spread ({weight_std}) must be > 0")
    if compensated:
        return 1.0
    # E: the largest binade exponent whose half-ulp (2^(E - m - 1)) is still below the step
    largest_exponent = math.ceil(math.log2(learning_rate) + MANTISSA_BITS[weight_dtype] + 1) - 1
    threshold = 2.0 ** (largest_exponent + 1)
    return math.erf(threshold / (weight_std * math.sqrt(2)))


def retention_note(retention: float, learning_rate: float, weight_dtype: str, compensated: bool = False) -> str:
    """One phrase naming the figure and where it comes from (for plan reasons and finetune messages)."""
    how = "with compensated (stochastic-rounding) updates" if compensated else "round-to-nearest"
    return (
        f"update retention {retention:.0%} (share of weights an lr {learning_rate:g} step changes, {weight_dtype} "
        f"weights, {how}, |w| ~ N(0, {TYPICAL_WEIGHT_STD:g}))"
    )
