"""MFU conventions: which FLOPs a model-FLOPs utilisation divides, named so that every printed MFU says which.

Tools disagree by 1.5x on the "same" MFU because they count different FLOPs. phi3v-bench stores three counts per
optimizer step and prints each MFU with its convention's label (:func:`mfu_label`):

* ``counted`` - the matrix products of the step counted from its shapes (:mod:`phi3v_core.flops`, the rules of
  torch's ``FlopCounterMode``): what the model really computes, frozen parts without weight gradients, the first
  layer without an input gradient, supervised-only logits, no gradient-checkpointing recompute. phi3v-plan's
  predicted MFU counts the same way (:mod:`planner.speed`).
* ``6N`` - 6 FLOPs per token for each of all N parameters (2 forward, 2 for the input gradient, 2 for the weight
  gradient; Kaplan et al. 2020, PaLM's appendix B), plus causal attention.
* ``4N+6Nt`` - 4 FLOPs per token for each frozen parameter (forward and input gradient: a frozen base, as in LoRA,
  computes no weight gradients) and 6 for each trainable one, plus causal attention. Equal to ``6N`` for full
  fine-tuning.

Causal attention, per decoder layer and sequence of ``s`` tokens: ``QKᵀ`` and ``AV`` over the ``s(s+1)/2``
(query, key) pairs a causal mask keeps - each pair counted once, not the full ``s²`` square - at 2 FLOPs per
multiply-add over the attention width (heads x head_dim), forward plus a backward of twice the forward:
``12 · layers · width · s(s+1)/2``. Tokens are the decoder's (image tokens included); N is every parameter once per
decoder token, the usual simplification for a vision-language model.

Packed rows (``--packing``): every convention counts what the samples need, as if each were trained alone. A
sequence is a sample, not a row (a packed row's block-diagonal causal mask keeps no pair across samples), and the
tokens are the samples' real tokens (a row's padding tail is not model work). ``counted`` charges each sample its own
attention square likewise (:func:`phi3v_core.flops.decoder_sequences`). The *hardware* FLOPs differ: with sdpa or
eager the kernel computes the whole row's score matrix under the dense mask (``width²`` per row), with
flash-attention-2 each sample's square only. MFU divides model FLOPs, so packing raises MFU only through real work
done faster, never through the padding or the masked-out pairs it computes.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CONVENTIONS",
    "COUNTED",
    "FROZEN_BASE",
    "SIX_N",
    "causal_attention_flops",
    "frozen_base_flops",
    "mfu_label",
    "six_n_flops",
]

COUNTED = "counted"
SIX_N = "6N"
FROZEN_BASE = "4N+6Nt"

#: Convention → what it counts (shown beside tables that print MFU).
CONVENTIONS: dict[str, str] = {
    COUNTED: "matrix products counted from the shapes (frozen parts without weight gradients), no recompute",
    SIX_N: "6·N per token for all N parameters, plus causal attention",
    FROZEN_BASE: "4·N_frozen + 6·N_trainable per token (a frozen base has no weight gradients), plus causal attention",
}


def mfu_label(convention: str) -> str:
    """``MFU [convention]``: the column or line heading of an MFU figure."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown MFU convention {convention!r}; one of {', '.join(CONVENTIONS)}")
    return f"MFU [{convention}]"


def causal_attention_flops(layers: int, width: int, seq_lens: Sequence[int]) -> int:
    """Training FLOPs of the causal attention products of ``seq_lens`` sequences (see the module docstring)."""
    pairs = sum(s * (s + 1) // 2 for s in seq_lens)
    return 12 * layers * width * pairs


def six_n_flops(total_params: int, tokens: int, attention_flops: int = 0) -> int:
    """``6·N·tokens`` plus attention: the ``6N`` convention."""
    return 6 * total_params * tokens + attention_flops


def frozen_base_flops(total_params: int, trainable_params: int, tokens: int, attention_flops: int = 0) -> int:
    """``(4·N_frozen + 6·N_trainable)·tokens`` plus attention: the ``4N+6Nt`` convention."""
    frozen = max(total_params - trainable_params, 0)
    return (4 * frozen + 6 * trainable_params) * tokens + attention_flops
