"""FLOPs of one optimizer step for MFU: counted from the shapes (the default) or traced on fake tensors.

* :func:`analytic_step_flops` (``phi3v-bench run``'s default, ``--flops analytic``): the model's config, what the
  method trains, gradient checkpointing and each micro-batch's shapes through :mod:`phi3v_core.flops`; milliseconds.
* :func:`trace_step_flops` (``--flops trace``, to check the analytic count): the identical step (same method, same
  micro-batch shapes) on fake tensors under ``FlopCounterMode``, with attention in plain matrix products (SDPA's
  math backend) so the count is the same whichever kernel the timed steps used. It costs no GPU memory but 1.5-3
  CPU-minutes for the full-size model. Traced once with gradient checkpointing off (``model_flops``) and once as
  configured (``hardware_flops``, recompute included); the count is the same in every repeat, so it is traced once
  per configuration and kept in a :class:`FlopCache` keyed by everything it depends on (:func:`flop_cache_key`).

A test pins the two counts to each other within 1 % for every method, checkpointing setting and logits mode. Both
run after the timed window closes (:mod:`bench.measure`'s protocol), on rank 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "FlopCache",
    "StepFlops",
    "analytic_step_flops",
    "attention_step_flops",
    "cached_step_flops",
    "count_step_flops",
    "flop_cache_key",
    "flop_trace_attn",
    "step_micro_batches",
    "trace_step_flops",
]


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one optimizer step on one rank (forward + backward of every micro-batch; optimizer excluded).

    Attributes:
        model_flops: Without recompute (gradient checkpointing off): the work the model needs. For packed rows
            (``--packing``) the analytic count charges each sample as if alone (its tokens, its own attention
            square); the trace replays the rows as sdpa's math backend runs them (whole rows: the hardware view).
        hardware_flops: What the hardware runs: ``model_flops`` plus the forward recompute of checkpointing, and
            for packed rows their padding tails and, with sdpa/eager, attention over whole rows.
        traced_attn: Attention implementation used for the trace (``eager`` or ``sdpa`` with its math backend);
            None when counted analytically (the count does not depend on the kernel).
        traced_shapes: Distinct micro-batch shapes counted (``input_ids`` shape, crops).
        source: ``trace`` (:func:`trace_step_flops`) or ``analytic`` (:func:`analytic_step_flops`).
        attention_flops: The decoder's causal attention products of the step (:mod:`phi3v_core.mfu`), added to
            the ``6N`` and ``4N+6Nt`` conventions' counts; ``None`` where not counted.
    """

    model_flops: int
    hardware_flops: int
    traced_attn: str | None
    traced_shapes: int
    source: str = "trace"
    attention_flops: int | None = None


def flop_trace_attn(attn: str) -> str:
    """The attention the FLOP trace uses for a run with ``attn``: eager stays eager, every fused kernel is SDPA.

    SDPA is then forced to its math backend, whose matrix products ``FlopCounterMode`` counts like eager's; the
    flash-attn package's kernels and the CPU flash kernel are invisible to it.
    """
    return "eager" if attn == "eager" else "sdpa"


def _shape_key(batch: dict[str, Any]) -> tuple:
    return tuple(
        (k, tuple(v.shape)) if isinstance(v, torch.Tensor) else (k, repr(v)) for k, v in sorted(batch.items())
    )


def trace_step_flops(
    train_cfg: Any, micro_batches: Sequence[dict[str, Any]], *, with_recompute: bool = True
) -> StepFlops:
    """Count the FLOPs of one optimizer step by replaying it on fake tensors (no real memory, CPU only).

    The model is built from ``train_cfg`` exactly as training builds it (same preset or folder config, same method
    through :func:`phi3v_core.methods.get_method`), on the meta device, then materialised as fake tensors; each
    distinct micro-batch shape runs forward and backward once under ``FlopCounterMode``. Everything is traced in
    fp32 (FLOPs do not depend on the dtype) and QLoRA as LoRA (bitsandbytes cannot run on fakes; its 4-bit matmuls
    do the same multiply-adds after dequantisation).

    Args:
        train_cfg: The run's :class:`phi3v_core.training.TrainConfig`.
        micro_batches: Collated micro-batches of one optimizer step on this rank, as the Trainer feeds them.
        with_recompute: Also trace with checkpointing on for ``hardware_flops`` (otherwise it equals
            ``model_flops``; halves the cost when only MFU is needed).

    Returns:
        A :class:`StepFlops`.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from phi3v_core.config import get_config
    from phi3v_core.methods import get_method
    from phi3v_core.model import Phi3VForCausalLM
    from phi3v_core.model.checkpointing import enable_activation_checkpointing

    attn = flop_trace_attn(train_cfg.attn)
    method = "lora" if train_cfg.method == "qlora" else train_cfg.method
    traced_cfg = dataclasses.replace(train_cfg, method=method, precision="fp32", attn=attn)
    counts: dict[tuple, int] = {}
    for batch in micro_batches:
        counts[_shape_key(batch)] = counts.get(_shape_key(batch), 0) + 1
    distinct = {_shape_key(b): b for b in micro_batches}

    def count(checkpointing: bool) -> int:
        with torch.device("meta"):
            model = Phi3VForCausalLM(get_config(train_cfg.model, attn_implementation=attn))
        model.config.use_cache = False
        if checkpointing:
            enable_activation_checkpointing(model)
        model, _report = get_method(method).prepare(model, traced_cfg.method_options("meta"))
        model.train()
        total = 0
        with FakeTensorMode(allow_non_fake_inputs=True), sdpa_kernel(SDPBackend.MATH):
            model.to_empty(device="cpu")
            for key, batch in distinct.items():
                counter = FlopCounterMode(display=False)
                with counter:
                    loss = model(**batch).loss
                    loss.backward()
                total += int(counter.get_total_flops()) * counts[key]
                model.zero_grad(set_to_none=True)
        return total

    model_flops = count(checkpointing=False)
    recompute = train_cfg.gradient_checkpointing and with_recompute
    hardware_flops = count(checkpointing=True) if recompute else model_flops
    return StepFlops(model_flops, hardware_flops, attn, len(distinct))


def analytic_step_flops(train_cfg: Any, micro_batches: Sequence[dict[str, Any]]) -> StepFlops:
    """The FLOPs :func:`trace_step_flops` measures, counted from the shapes (:mod:`phi3v_core.flops`; no model).

    Same inputs, same numbers (pinned by a test for every method, checkpointing setting and logits mode): the
    model's config, what the method trains, gradient checkpointing, and each micro-batch's shapes. Logits are
    counted where the model computes them in training: at supervised positions, unless
    ``Phi3VForCausalLM.supervised_logits`` is off. Packed rows are the exception: the model count is per sample
    (each as if trained alone), the hardware count is as the run's attention kernel computes the rows.
    """
    from phi3v_core.config import get_config
    from phi3v_core.flops import ModelDims, TrainableParts, micro_batch_shape, step_flops
    from phi3v_core.model import Phi3VForCausalLM

    dims = ModelDims.from_config(get_config(train_cfg.model))
    parts = TrainableParts.for_method(train_cfg.method, lora_rank=train_cfg.lora_rank,
                                      lora_lm_head=train_cfg.lora_lm_head, freeze_vision=train_cfg.freeze_vision)
    logits = "supervised" if Phi3VForCausalLM.supervised_logits else "full"
    shapes = [micro_batch_shape(batch, dims, logits) for batch in micro_batches]
    count = step_flops(dims, parts, shapes, checkpointing=bool(train_cfg.gradient_checkpointing), logits=logits,
                       attn=getattr(train_cfg, "attn", "sdpa"))
    return StepFlops(count.model_flops, count.hardware_flops, None, len(set(shapes)), source="analytic")


def count_step_flops(
    train_cfg: Any, micro_batches: Sequence[dict[str, Any]], how: str, cache: FlopCache | None
) -> tuple[StepFlops, bool]:
    """One step's FLOPs ``how`` = ``analytic`` or ``trace`` (through ``cache``); ``(flops, read from the cache)``."""
    if how == "analytic":
        flops, cached = analytic_step_flops(train_cfg, micro_batches), False
    elif how == "trace":
        flops, cached = cached_step_flops(train_cfg, micro_batches, cache)
    else:
        raise ValueError(f"FLOPs are counted 'analytic' or 'trace', not {how!r}")
    return dataclasses.replace(flops, attention_flops=attention_step_flops(train_cfg, micro_batches)), cached


def attention_step_flops(train_cfg: Any, micro_batches: Sequence[dict[str, Any]]) -> int:
    """Causal attention FLOPs of one step on one rank (:func:`phi3v_core.mfu.causal_attention_flops`).

    A sequence's length is a packed sample's length (a packed row holds several sequences: ``PackInfo``), else
    its attention mask's sum (padding attends nothing), else the row's length.
    """
    from phi3v_core.config import get_config
    from phi3v_core.flops import ModelDims
    from phi3v_core.mfu import causal_attention_flops

    dims = ModelDims.from_config(get_config(train_cfg.model))
    lengths: list[int] = []
    for batch in micro_batches:
        mask = batch.get("attention_mask")
        packing = batch.get("packing")
        if packing is not None:
            lengths += [int(n) for row in packing.rows for n in row]
        elif mask is not None:
            lengths += [int(v) for v in mask.sum(dim=-1).tolist()]
        else:
            rows, seq_len = (int(v) for v in batch["input_ids"].shape)
            lengths += [seq_len] * rows
    return causal_attention_flops(dims.layers, dims.heads * dims.head_dim, lengths)


def flop_cache_key(train_cfg: Any, micro_batches: Sequence[dict[str, Any]], *, with_recompute: bool = True) -> str:
    """Everything :func:`trace_step_flops` depends on, hashed: the model's full config (every shape), the method
    and its options, the traced attention, gradient checkpointing, and each micro-batch shape (sequence length,
    micro-batch size, crops) with how many of the step's micro-batches have it."""
    from phi3v_core.config import get_config

    attn = flop_trace_attn(train_cfg.attn)
    method = "lora" if train_cfg.method == "qlora" else train_cfg.method
    traced_cfg = dataclasses.replace(train_cfg, method=method, precision="fp32", attn=attn)
    shapes: dict[str, int] = {}
    for batch in micro_batches:
        shapes[repr(_shape_key(batch))] = shapes.get(repr(_shape_key(batch)), 0) + 1
    parts = {
        "model": get_config(train_cfg.model, attn_implementation=attn).to_dict(),
        "method": method,
        "options": repr(traced_cfg.method_options("meta")),
        "attn": attn,
        "checkpointing": bool(train_cfg.gradient_checkpointing and with_recompute),
        "micro_batches": shapes,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class FlopCache:
    """FLOP counts on disk, one JSON file per :func:`flop_cache_key` (the runner gives every repeat of a
    configuration the same folder, so only the first repeat traces). Unreadable entries count as missing."""

    directory: Path

    def get(self, key: str) -> StepFlops | None:
        """The stored count, or None."""
        try:
            return StepFlops(**json.loads((self.directory / f"{key}.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def put(self, key: str, flops: StepFlops) -> None:
        """Store ``flops`` (atomically: a half-written entry is never read)."""
        from phi3v_core.io import atomic_write_text

        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.directory / f"{key}.json", json.dumps(dataclasses.asdict(flops)))


def cached_step_flops(
    train_cfg: Any, micro_batches: Sequence[dict[str, Any]], cache: FlopCache | None, *, with_recompute: bool = True
) -> tuple[StepFlops, bool]:
    """:func:`trace_step_flops` through ``cache``: ``(flops, True)`` when it was stored, else traced and stored."""
    key = flop_cache_key(train_cfg, micro_batches, with_recompute=with_recompute)
    found = cache.get(key) if cache is not None else None
    if found is not None:
        return found, True
    flops = trace_step_flops(train_cfg, micro_batches, with_recompute=with_recompute)
    if cache is not None:
        cache.put(key, flops)
    return flops, False


def step_micro_batches(train_cfg: Any, dataset: Any, micro_batch: int, grad_accum: int) -> list[dict[str, Any]]:
    """The first optimizer step's micro-batches, collated as :func:`phi3v_core.training.train` collates them."""
    from phi3v_core.training.collate import training_collator

    collator = training_collator(
        getattr(train_cfg, "packing", False),
        getattr(train_cfg, "pack_tokens", None),
        getattr(train_cfg, "attn", "sdpa"),
        getattr(train_cfg, "supervised_logits_only", False),
    )
    batches = []
    for k in range(grad_accum):
        examples = [dataset[(k * micro_batch + i) % len(dataset)] for i in range(micro_batch)]
        batches.append(collator(examples))
    return batches

