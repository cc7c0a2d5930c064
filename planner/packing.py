"""Packing in the planner: padding padded vs packed, rows per micro-batch, memory at the pack budget, and speed in
real tokens.

A padded micro-batch computes ``samples × longest`` tokens; ``phi3v-finetune --packing`` places its samples into
rows with the collator's own first-fit-decreasing (:func:`phi3v_core.first_fit.pack_rows`, run here on
the lengths) up to a budget (default: the micro-batch's longest sample; ``--pack_tokens N``), every row as wide as the
widest, and one sample per row where that would compute more than padding. Flash-attention-2 instead flattens the micro-batch into one row of variable-length sequences.

Speed comes from the planner's own terms (:func:`planner.speed.micro_step_times`), read off as the cost of one
decoder row of ``s`` tokens, ``per_sample + per_token·s + per_square·s²`` (three evaluations; the model is exactly
quadratic in the row length), plus each sample's vision cost, the same padded or packed. What a micro-batch pays:

* padded, sdpa/eager: every row is the longest sample wide, attention over the whole row (the mask hides padding,
  computes it anyway); flash-attention-2 unpads inside attention (each sample's own square), not in the linears;
* packed, sdpa/eager: rows of the packed width; attention over the **whole row**, across the samples the
  block-diagonal mask separates: a row of four 500-token samples costs 2,000² where alone they cost 4 × 500²;
* packed, flash-attention-2: real tokens only; attention per sample (variable-length kernels).

So with sdpa a packed row may not pay (a larger ``--pack_tokens`` makes rows longer, attention quadratically
dearer), with flash-attention-2 it always removes the padding. Packing is offered where it is predicted at least
:data:`PAYS_MARGIN` faster. Memory: rows at the pack budget (:func:`packed_memory`); the padded micro-batch of the
largest sample is the bound at the default budget, so packing never needs more memory there.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from typing import Any

from phi3v_core.cli.vocabulary import THROUGHPUT_UNIT
from phi3v_core.first_fit import pack_rows
from planner.estimate import SampleShape, estimate_memory
from planner.memory_types import MemoryEstimate, MemoryItem
from planner.shapes import ModelShape
from planner.speed import Rates, SpeedConstants, SpeedPrediction, micro_step_times
from planner.train_setup import TrainSetup

__all__ = [
    "PAYS_MARGIN",
    "PackingPrediction",
    "RowCost",
    "TokenSums",
    "data_packing",
    "lengths_for",
    "packed_memory",
    "packing_reason",
    "predict_packing",
    "remember_lengths",
    "row_cost",
    "scaled_speed",
    "token_sums",
]

#: Packing is recommended only where predicted at least this much faster than padding (its mask and bookkeeping
#: cost a little that the speed model does not count).
PAYS_MARGIN = 1.02
#: Samples a length distribution is simulated with (a seeded draw of a larger set).
SIMULATED_SAMPLES = 2048
#: Seeded shuffles averaged (the Trainer shuffles every epoch).
SHUFFLES = 2
FLASH = "flash_attention_2"


@dataclass(frozen=True)
class TokenSums:
    """What the micro-batches of a length distribution compute, padded and packed (summed over micro-batches).

    Attributes:
        samples: Samples simulated.
        micro_batches: Micro-batches simulated.
        real: Tokens of the samples.
        squares: Sum over samples of length² (attention of each sample alone).
        padded: Tokens a padded micro-batch computes (rows × longest).
        padded_rows_square: Sum over padded rows of width².
        packed: Tokens the packed rows compute (rows × packed width; flash-attention-2: the real tokens).
        packed_rows_square: Sum over packed rows of width² (flash-attention-2: per sample).
        packed_rows: Packed rows (flash-attention-2: one per micro-batch).
        packed_content_square: Sum over packed rows of (tokens of its samples)² (padding excluded).
        widest: The widest packed row.
    """

    samples: int
    micro_batches: int
    real: int
    squares: float
    padded: int
    padded_rows_square: float
    packed: int
    packed_rows_square: float
    packed_rows: int
    widest: int
    packed_content_square: float = 0.0


def token_sums(
    lengths: Sequence[int], micro_batch: int, attn: str, pack_tokens: int | None = None, shuffles: int = SHUFFLES
) -> TokenSums:
    """Padded and packed token counts of ``lengths`` in micro-batches of ``micro_batch`` (cached: the layout search
    asks for the same micro-batches under every method and option); see :func:`_token_sums`."""
    return _token_sums(tuple(lengths), micro_batch, attn, pack_tokens, shuffles)


@lru_cache(maxsize=256)
def _token_sums(
    lengths: tuple[int, ...], micro_batch: int, attn: str, pack_tokens: int | None, shuffles: int
) -> TokenSums:
    """Padded and packed token counts of ``lengths`` in micro-batches of ``micro_batch``.

    Args:
        lengths: Tokens per sample.
        micro_batch: Samples per micro-batch (the last, partial one included).
        attn: ``flash_attention_2`` flattens each micro-batch into one row; others pack rows of ``pack_tokens``.
        pack_tokens: Row budget; None = each micro-batch's longest sample (the collator's default).
        shuffles: Seeded shuffles averaged (the Trainer's random sampler); 0: the given order.

    Raises:
        ValueError: A sample longer than ``pack_tokens``.
    """
    orders = [list(lengths)]
    if shuffles:
        orders = []
        for seed in range(shuffles):
            order = list(lengths)
            random.Random(seed).shuffle(order)
            orders.append(order)
    totals = [0] * 10
    widest = 0
    for order in orders:
        for start in range(0, len(order), micro_batch):
            chunk = order[start : start + micro_batch]
            longest = max(chunk)
            if attn == FLASH:  # one flattened row; attention per sample
                rows, width, square = 1, sum(chunk), sum(n * n for n in chunk)
                content = square
            else:
                bins, width = pack_rows(chunk, pack_tokens or longest)  # the collator's rows
                rows, square = len(bins), len(bins) * width * width
                content = sum(sum(chunk[i] for i in b) ** 2 for b in bins)
            widest = max(widest, width)
            values = (len(chunk), 1, sum(chunk), sum(n * n for n in chunk), len(chunk) * longest,
                      len(chunk) * longest * longest, rows * width if attn != FLASH else width, square, rows, content)  # fmt: skip
            totals = [t + v for t, v in zip(totals, values, strict=True)]
    n = len(orders)
    samples, micro, real, squares, padded, padded_sq, packed, packed_sq, rows_total, content = (t / n for t in totals)
    return TokenSums(round(samples), round(micro), round(real), squares, round(padded), padded_sq, round(packed),
                     packed_sq, round(rows_total), widest, content)  # fmt: skip


@dataclass(frozen=True)
class RowCost:
    """Seconds of one micro-step, split the way padding and packing change it (the planner's speed terms).

    Attributes:
        per_sample: Per sample, whatever its row: the vision tower and projector, the loss's constant part, launches.
        per_token: Per decoder token computed (padding included): the linears, norms, element-wise work.
        per_square: Per attention-score element (one row of ``s`` tokens: ``s²``).
    """

    per_sample: float
    per_token: float
    per_square: float

    def seconds(self, samples: float, tokens: float, squares: float) -> float:
        """Time of ``samples`` computed as ``tokens`` decoder tokens with ``squares`` attention elements."""
        return self.per_sample * samples + self.per_token * tokens + self.per_square * squares


def row_cost(
    shape: ModelShape, setup: TrainSetup, mean: SampleShape, rates: Rates, constants: SpeedConstants
) -> RowCost:
    """Read :func:`planner.speed.micro_step_times` as ``a + b·s + c·s²`` per decoder row, plus ``mean``'s vision."""
    single = replace(setup, micro_batch=1)
    # Logits: at labelled positions only (``logits="supervised"``), never at padding: a per-sample cost. Unknown
    # labels count every real token of the mean sample, the speed model's convention.
    supervised = mean.supervised_tokens if mean.supervised_tokens is not None else mean.seq_len
    base = max(256, supervised)  # at or above it the loss is constant per sample

    def seconds(workload: SampleShape) -> float:
        return sum(micro_step_times(shape, workload, single, rates, constants)[0].values())

    def text_only(seq: int) -> float:
        return seconds(SampleShape(seq_len=seq, vision_crops=0, image_tokens=0, images=0, pixel_slots=0,
                                   num_crops=mean.num_crops, supervised_tokens=supervised))  # fmt: skip

    t1, t2, t3 = (text_only(k * base) for k in (1, 2, 3))
    square = (t3 - 2 * t2 + t1) / (2 * base * base)
    token = (t2 - t1) / base - square * 3 * base
    constant = t1 - token * base - square * base * base
    longest = max(mean.seq_len, base)
    vision = seconds(replace(mean, seq_len=longest, supervised_tokens=supervised)) - text_only(longest)
    return RowCost(constant + vision, token, square)


@dataclass
class PackingPrediction:
    """Padding and speed of one layout padded vs packed (``--json``: ``packing``).

    Attributes:
        micro_batch: Samples per micro-batch.
        attn: The attention implementation (decides how a packed row is computed).
        pack_tokens: ``--pack_tokens`` (None: the micro-batch's longest sample, the default).
        padding_padded: Share of computed tokens that are padding without packing.
        padding_packed: With packing.
        rows_per_micro_batch: Mean rows a packed micro-batch has (padded: ``micro_batch``).
        widest_row: The widest packed row (the memory bound).
        speed_up: Predicted real tokens/s packed ÷ padded (None where the speed is unknown).
        padded_slowdown: Micro-step time padded ÷ every sample computed alone (the planner's mean-sample speed).
        packed_slowdown: The same, packed.
        cross_attention: Share of a packed micro-batch's attention spent across samples (masked, computed).
    """

    micro_batch: int
    attn: str
    pack_tokens: int | None
    padding_padded: float
    padding_packed: float
    rows_per_micro_batch: float
    widest_row: int
    speed_up: float | None
    cross_attention: float
    padded_slowdown: float | None = None
    packed_slowdown: float | None = None

    @property
    def pays(self) -> bool:
        """Predicted at least :data:`PAYS_MARGIN` faster."""
        return self.speed_up is not None and self.speed_up >= PAYS_MARGIN

    @property
    def reason(self) -> str:
        """When packing pays here, and why not where it does not."""
        speed = f"{self.speed_up:.2f}x real tokens/s" if self.speed_up is not None else "speed unknown"
        padding = f"padding {self.padding_padded:.0%} → {self.padding_packed:.0%} of computed tokens"
        if self.micro_batch == 1:
            return "micro-batch 1: nothing to pack"
        if self.padding_packed >= self.padding_padded - 0.005:
            return (
                f"packing does not pay: no two samples of a micro-batch share a row of the budget ({padding}); "
                "a larger --pack_tokens or micro-batch would let them"
            )
        if self.pays:
            return f"packing pays: {padding}, predicted {speed}"
        if self.attn != FLASH and self.cross_attention > 0.05:
            return (
                f"packing does not pay with {self.attn}: {padding}, but a packed row computes attention over the whole "
                f"row ({self.cross_attention:.0%} of it across samples); predicted {speed} (flash-attention-2 packs "
                "per sample)"
            )
        return f"packing does not pay: {padding}, predicted {speed}"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``--json``)."""
        return {
            "micro_batch": self.micro_batch,
            "attention": self.attn,
            "pack_tokens": self.pack_tokens,
            "padding_fraction_padded": round(self.padding_padded, 4),
            "padding_fraction_packed": round(self.padding_packed, 4),
            "rows_per_micro_batch": round(self.rows_per_micro_batch, 3),
            "widest_row": self.widest_row,
            "speed_up": None if self.speed_up is None else round(self.speed_up, 4),
            "cross_sample_attention": round(self.cross_attention, 4),
            "pays": self.pays,
            "reason": self.reason,
        }


def predict_packing(sums: TokenSums, attn: str, pack_tokens: int | None, cost: RowCost | None) -> PackingPrediction:
    """Padding and predicted speed-up of ``sums`` (one micro-batch size) under ``cost``."""
    padded_squares = sums.squares if attn == FLASH else sums.padded_rows_square  # FA2 unpads inside attention
    speed_up = padded_slowdown = packed_slowdown = None
    if cost is not None:
        alone = cost.seconds(sums.samples, sums.real, sums.squares)
        padded = cost.seconds(sums.samples, sums.padded, padded_squares)
        packed = cost.seconds(sums.samples, sums.packed, sums.packed_rows_square)
        speed_up, padded_slowdown, packed_slowdown = padded / packed, padded / alone, packed / alone
    return PackingPrediction(
        micro_batch=math.ceil(sums.samples / sums.micro_batches),
        attn=attn,
        pack_tokens=pack_tokens,
        padding_padded=1 - sums.real / sums.padded,
        padding_packed=1 - sums.real / sums.packed,
        rows_per_micro_batch=sums.packed_rows / sums.micro_batches,
        widest_row=sums.widest,
        speed_up=speed_up,
        cross_attention=0.0 if attn == FLASH else max(0.0, 1 - sums.squares / max(sums.packed_content_square, 1.0)),
        padded_slowdown=padded_slowdown,
        packed_slowdown=packed_slowdown,
    )


def packed_memory(
    shape: ModelShape, setup: TrainSetup, largest: SampleShape, pack_tokens: int | None, overheads: Any
) -> MemoryEstimate:
    """Reserved peak of a packed micro-batch of ``setup.micro_batch`` samples as large as ``largest``.

    Rows at the pack budget: flash-attention-2 one flattened row of all samples; sdpa/eager ``R`` rows of
    ``max(pack_tokens, longest)`` tokens, ``R`` as few as the tokens allow (never more than the samples), each
    carrying its share of the crops. With sdpa the block-diagonal mask (a bool per score, and its additive copy each
    layer saves for backward) grows with the row²; the padded micro-batch of ``largest`` carries a mask of its own,
    so only what a wider row adds is counted.
    """
    mb = setup.micro_batch
    if setup.attn == FLASH:
        rows, width = 1, mb * largest.seq_len
    else:
        width = max(pack_tokens or 0, largest.seq_len)
        rows = min(mb, math.ceil(mb * largest.seq_len / width))
    per_row = SampleShape(
        seq_len=width,
        vision_crops=math.ceil(mb * largest.vision_crops / rows),
        image_tokens=min(width, math.ceil(mb * largest.image_tokens / rows)),
        images=math.ceil(mb * largest.images / rows),
        pixel_slots=math.ceil(mb * largest.slots / rows),
        num_crops=largest.num_crops,
        supervised_tokens=None if largest.supervised_tokens is None else mb * largest.supervised_tokens // rows,
    )
    memory = estimate_memory(shape, replace(setup, micro_batch=rows), per_row, overheads)
    if setup.attn != "sdpa":
        return memory  # eager: the estimate counts its S×S terms per row; flash: no mask
    layers = 1 if setup.gradient_checkpointing else shape.num_layers
    per_square = 1 + setup.act_bytes * layers
    extra = per_square * (rows * width * width - mb * largest.seq_len**2)
    if extra <= 0:
        return memory
    item = MemoryItem("packed attention mask", extra, f"{rows} row(s) of {width} tokens: bool mask + additive copy")
    cache = extra * (overheads.cache_fraction if overheads is not None else 0.0)
    return replace(memory, items=[*memory.items, item], allocated=memory.allocated + extra, cache=memory.cache + cache)


def scaled_speed(speed: SpeedPrediction | None, slowdown: float | None) -> SpeedPrediction | None:
    """``speed`` with its micro-steps ``slowdown`` times as long (the optimizer, the communication and the step
    overhead stay as they are)."""
    if speed is None or slowdown is None:
        return None
    fixed = ("optimizer", "communication", "step overhead")
    compute = sum(v for k, v in speed.times.items() if k not in fixed)
    times = {k: v if k in fixed else v * slowdown for k, v in speed.times.items()}
    ratio = speed.step_s / (speed.step_s - compute + compute * slowdown)
    return replace(
        speed,
        samples_per_s=speed.samples_per_s * ratio,
        per_gpu=speed.per_gpu * ratio,
        mfu=None if speed.mfu is None else speed.mfu * ratio,
        times=times,
        compute_s=speed.compute_s * slowdown,
        step_s=speed.step_s / ratio,
        epoch_s=None if speed.epoch_s is None else speed.epoch_s / ratio,
    )


_REMEMBERED: dict[tuple[str, int], list[int]] = {}


def remember_lengths(data_dir: str, num_crops: int, lengths: Sequence[int]) -> None:
    """Keep a ``--data`` folder's lengths (profiled by :func:`planner.dataplan.read_data` before any search)."""
    _REMEMBERED[(str(data_dir), num_crops)] = list(lengths)


def lengths_for(request: Any, shape: ModelShape, num_crops: int) -> list[int]:
    """The plan's length distribution: the ``--data`` folder's lengths (empty if it was not profiled), else a seeded
    draw from the task's published image sizes (:data:`phi3v_core.image_sizes.TASK_IMAGES`)."""
    if request.data_dir:
        lengths = _REMEMBERED.get((str(request.data_dir), num_crops), [])
        if len(lengths) > SIMULATED_SAMPLES:
            lengths = random.Random(0).sample(lengths, SIMULATED_SAMPLES)
        return lengths
    return _task_lengths(request.task, shape, num_crops)


@cache
def _task_lengths(task: str, shape: ModelShape, num_crops: int) -> list[int]:
    """:data:`SIMULATED_SAMPLES` samples of ``task``: each image drawn from the task's size shares, tokens by the
    processor's arithmetic (:meth:`planner.estimate.SampleShape.from_images`), plus the task's text tokens."""
    from phi3v_core.image_sizes import TASK_IMAGES

    spec = TASK_IMAGES.get(task)
    if spec is None:
        return []
    sizes = [size for size, _share in spec.image_sizes]
    tokens = [SampleShape.from_images(shape, num_crops, size, text_tokens=0).image_tokens for size in sizes]
    rng = random.Random(0)
    shares = [share for _size, share in spec.image_sizes]
    return [
        sum(rng.choices(tokens, weights=shares, k=spec.images_per_record)) + round(spec.text_tokens)
        for _ in range(SIMULATED_SAMPLES)
    ]


def data_packing(
    lengths: Sequence[int],
    shape: ModelShape,
    setup: TrainSetup,
    mean: SampleShape,
    rates: Rates | None,
    constants: SpeedConstants,
    micro_batches: Sequence[int] = (2, 4, 8, 16),
) -> dict[str, Any]:
    """``phi3v-plan --data``'s packing table: padding without and with packing and the predicted speed-up at each
    micro-batch, under ``setup``'s attention (the recommended layout's), at the default budget and (sdpa/eager) at
    ``--pack_tokens`` = the longest sample."""
    cost = row_cost(shape, setup, mean, rates, constants) if rates is not None else None
    sizes = sorted({*micro_batches, setup.micro_batch} - {1})
    longest = max(lengths) if setup.attn != FLASH else None

    def at(mb: int, budget: int | None) -> dict[str, Any]:
        return predict_packing(token_sums(lengths, mb, setup.attn, budget), setup.attn, budget, cost).to_dict()

    rows = [{**at(mb, None), "at_longest": at(mb, longest) if longest else None} for mb in sizes]
    return {"attention": setup.attn, "micro_batch": setup.micro_batch, "longest": longest, "rows": rows}


def packing_reason(chosen: Any, candidates: Sequence[Any], images: int) -> list[str]:
    """The recommendation's packing line: why ``--packing`` (the chosen layout's verdict), or why not: the fastest
    fitting packed layout of the same memory options (checkpointing, optimizer, offload), else of any, against the
    chosen one (:mod:`planner.layouts` keeps only packed twins that pay against their own padded layout), in img/s
    (``images`` per sample) as every planner sentence."""
    packing = chosen.layout.packing
    if packing:
        budget = f" --pack_tokens {packing['pack_tokens']}" if packing["pack_tokens"] else ""
        return [f"--packing{budget}: {packing['reason']}"]
    if not chosen.layout.samples_per_s:
        return []

    def options(c: Any) -> tuple[Any, ...]:
        lay = c.layout
        return lay.gradient_checkpointing, lay.checkpoint_towers, lay.optim, lay.offload

    packed = [c for c in candidates if c.layout.packing and c.layout.fits and c.layout.samples_per_s]
    same = [c for c in packed if options(c) == options(chosen)]
    best = max(same or packed, key=lambda c: c.layout.samples_per_s, default=None)
    if best is None:
        return []
    info, lay = best.layout.packing, best.layout
    head = f"no --packing: the fastest packed layout ({lay.micro_batch} x {lay.grad_accum}"
    if not same:
        changed = [f"checkpointing {'on' if lay.gradient_checkpointing else 'off'}"] * (
            lay.gradient_checkpointing != chosen.layout.gradient_checkpointing
        )
        changed += [f"optimizer {lay.optim}"] * (lay.optim != chosen.layout.optim)
        changed += [f"offload {lay.offload}"] * (lay.offload != chosen.layout.offload)
        head += f", which needs {', '.join(changed) or 'other memory options'}"
    why = ""
    if same and info["padding_fraction_packed"] > 0.005:
        why = f": its rows still carry {info['padding_fraction_packed']:.0%} padding"
    if same and best.setup.attn != FLASH and info["cross_sample_attention"] > 0.05:
        why += (", and" if why else ":") + (
            f" with {best.setup.attn} a packed row computes attention over the whole row "
            f"({info['cross_sample_attention']:.0%} of it across samples)"
        )
    per_sample = max(images, 1)
    return [
        f"{head}, {lay.samples_per_s * per_sample:.2f} {THROUGHPUT_UNIT}) is slower than this one "
        f"({chosen.layout.samples_per_s * per_sample:.2f}){why}"
    ]
