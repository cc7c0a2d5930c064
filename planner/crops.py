"""num_crops from the images: tokens, upscaling and cost at each crop budget, and the smallest that keeps detail.

The HD transform (:func:`phi3v_core.constants.hd_resize_target`, the geometry ``Phi3VImageProcessor`` resizes with)
scales every image so that its long side is ``scale · 336`` for the largest crop grid ``num_crops`` allows, then pads
the short side. An image whose long side is below that is *upscaled*: it costs the tokens of a large image for no extra
detail. One above it is *downscaled*: detail is lost. The rule recommended here: the smallest num_crops at which at
least 90 % of images are shown at their native resolution or more (not downscaled); a larger num_crops only upscales
more of them. Works on weighted samples, so the same table serves a user's folder (``phi3v-plan --data``) and the
recipe's tasks from their image-size distributions (``phi3v-plan --crops-table``). No torch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from phi3v_core.constants import CONTEXT_LENGTH, MAX_NUM_CROPS, hd_resize_target
from phi3v_core.image_sizes import TASK_IMAGES
from planner.estimate import SampleShape, estimate_memory
from planner.memory_types import GIB
from planner.shapes import ModelShape, hd_crop_grid, image_token_count
from planner.train_setup import TrainSetup

__all__ = [
    "CROP_CHOICES",
    "NATIVE_SHARE",
    "RULE",
    "CropRow",
    "CropsTable",
    "WeightedSample",
    "crops_table",
    "envelope",
    "mean_shape",
    "resize_factor",
    "sample_shape",
    "smallest_keeping_detail",
    "task_samples",
]

#: The num_crops values every table shows (the recommended one is added when it is not among them).
CROP_CHOICES = (1, 2, 4, 8, 12, 16)
#: Share of images that must keep their native resolution (or more) at the recommended num_crops.
NATIVE_SHARE = 0.9
RULE = (
    f"the smallest num_crops that shows at least {NATIVE_SHARE:.0%} of images at their native resolution or more "
    "(not downscaled); more crops only upscale them, at the same detail for more tokens"
)

Size = tuple[int, int]


@dataclass(frozen=True)
class WeightedSample:
    """A sample's images and text tokens, with how many samples it stands for (a share for a task's distribution)."""

    image_sizes: tuple[Size, ...]
    text_tokens: int
    weight: float = 1.0


def resize_factor(width: int, height: int, num_crops: int) -> float:
    """Linear scale the HD transform applies to a ``width × height`` image (> 1 upscaled, < 1 downscaled)."""
    new_long, _new_short, _transposed = hd_resize_target(width, height, num_crops)
    return new_long / max(width, height)


def sample_shape(shape: ModelShape, image_sizes: Sequence[Size], text_tokens: int, num_crops: int) -> SampleShape:
    """Tokens and real crops of one sample at ``num_crops`` (the processor's arithmetic)."""
    tokens = crops = 0
    for width, height in image_sizes:
        rows, cols = hd_crop_grid(width, height, num_crops)
        tokens += image_token_count(rows, cols, shape.num_img_tokens)
        crops += rows * cols + 1
    return SampleShape(
        seq_len=tokens + text_tokens,
        vision_crops=crops,
        image_tokens=tokens,
        images=len(image_sizes),
        pixel_slots=len(image_sizes) * (num_crops + 1),
        num_crops=num_crops,
    )


def mean_shape(workloads: Sequence[SampleShape], weights: Sequence[float], num_crops: int) -> SampleShape:
    """The weighted average sample (what the speed model is run on)."""
    total = sum(weights)

    def avg(name: str) -> int:
        return round(sum(getattr(w, name) * k for w, k in zip(workloads, weights, strict=True)) / total)

    return SampleShape(
        seq_len=avg("seq_len"),
        vision_crops=avg("vision_crops"),
        image_tokens=avg("image_tokens"),
        images=avg("images"),
        pixel_slots=round(sum(w.slots * k for w, k in zip(workloads, weights, strict=True)) / total),
        num_crops=num_crops,
    )


def envelope(workloads: Sequence[SampleShape]) -> SampleShape:
    """A sample at least as large as each one in every dimension (tokens, crops, images): memory is planned for a
    micro-batch of it, so a layout that fits it fits every sample."""
    return SampleShape(
        seq_len=max(w.seq_len for w in workloads),
        vision_crops=max(w.vision_crops for w in workloads),
        image_tokens=max(w.image_tokens for w in workloads),
        images=max(w.images for w in workloads),
        pixel_slots=max(w.slots for w in workloads),
        num_crops=workloads[0].num_crops,
    )


def _images(samples: Sequence[WeightedSample]) -> list[tuple[Size, float]]:
    return [(size, s.weight) for s in samples for size in s.image_sizes]


def _native_share(images: Sequence[tuple[Size, float]], num_crops: int) -> float:
    total = sum(w for _, w in images)
    return sum(w for (wd, ht), w in images if resize_factor(wd, ht, num_crops) >= 1) / total


def smallest_keeping_detail(samples: Sequence[WeightedSample]) -> tuple[int, float]:
    """The num_crops :data:`RULE` recommends and the share of images it keeps at native resolution or more.

    The share only grows with num_crops; where no num_crops reaches :data:`NATIVE_SHARE`, the largest (most detail).
    """
    images = _images(samples)
    if not images:
        return 1, 1.0
    for num_crops in range(1, MAX_NUM_CROPS + 1):
        share = _native_share(images, num_crops)
        if share >= NATIVE_SHARE:
            return num_crops, share
    return MAX_NUM_CROPS, _native_share(images, MAX_NUM_CROPS)


def _weighted_percentile(pairs: Sequence[tuple[float, float]], q: float) -> float:
    """The smallest value whose cumulative weight reaches ``q`` of the total (the nearest-rank percentile)."""
    ordered = sorted(pairs)
    target = q * sum(w for _, w in ordered)
    running = 0.0
    for value, weight in ordered:
        running += weight
        if running >= target - 1e-9:
            return float(value)
    return float(ordered[-1][0])


@dataclass
class CropRow:
    """One num_crops: tokens per sample, how images are resized, and (with a layout) memory and time per epoch."""

    num_crops: int
    tokens_p50: float
    tokens_p95: float
    upscaled: float
    downscaled: float
    peak_gib: float | None = None
    fits: bool | None = None
    epoch_s: float | None = None
    over_context: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``--json``)."""
        return {
            "num_crops": self.num_crops,
            "tokens_per_sample": {"p50": self.tokens_p50, "p95": self.tokens_p95},
            "upscaled_share": round(self.upscaled, 4),
            "downscaled_share": round(self.downscaled, 4),
            "predicted_reserved_gib": None if self.peak_gib is None else round(self.peak_gib, 3),
            "fits": self.fits,
            "epoch_s": self.epoch_s,
            "over_context": self.over_context,
        }


@dataclass
class CropsTable:
    """The num_crops table of one set of samples and the num_crops :data:`RULE` recommends."""

    source: str
    rows: list[CropRow]
    recommended: int
    native_share: float
    rule: str = RULE
    cost_basis: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        """Why :attr:`recommended`: the rule it meets, or that none meets it."""
        kept = f"{self.native_share:.0%} of images keep their native resolution or more"
        if self.native_share >= NATIVE_SHARE:
            return f"num_crops {self.recommended}: {kept}; rule: {self.rule}"
        return (
            f"num_crops {self.recommended}: no num_crops keeps {NATIVE_SHARE:.0%} of images at native resolution or "
            f"more; the largest keeps the most detail ({kept})"
        )

    def row(self, num_crops: int) -> CropRow:
        """The row of ``num_crops``."""
        return next(r for r in self.rows if r.num_crops == num_crops)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``--json``)."""
        return {
            "source": self.source,
            "recommended": self.recommended,
            "native_share_at_recommended": round(self.native_share, 4),
            "rule": self.rule,
            "reason": self.reason,
            "cost_basis": self.cost_basis,
            "notes": self.notes,
            "rows": [r.to_dict() for r in self.rows],
        }


def crops_table(
    samples: Sequence[WeightedSample], shape: ModelShape, source: str, choices: Sequence[int] = CROP_CHOICES
) -> CropsTable:
    """Tokens (p50, p95) and the upscaled/downscaled image shares at each num_crops, and the recommended one."""
    recommended, share = smallest_keeping_detail(samples)
    images = _images(samples)
    total = sum(w for _, w in images) or 1.0
    rows = []
    for num_crops in sorted({*choices, recommended}):
        lengths = [(sample_shape(shape, s.image_sizes, s.text_tokens, num_crops).seq_len, s.weight) for s in samples]
        factors = [(resize_factor(wd, ht, num_crops), w) for (wd, ht), w in images]
        rows.append(
            CropRow(
                num_crops,
                _weighted_percentile(lengths, 0.5),
                _weighted_percentile(lengths, 0.95),
                upscaled=sum(w for f, w in factors if f > 1) / total,
                downscaled=sum(w for f, w in factors if f < 1) / total,
            )
        )
    return CropsTable(source, rows, recommended, share)


def add_costs(
    table: CropsTable,
    samples: Sequence[WeightedSample],
    shape: ModelShape,
    setup: TrainSetup,
    hw: Any,
    calibration: Any,
    dataset_size: int,
    basis: str,
) -> None:
    """Fill each row's predicted reserved peak (a micro-batch of the largest sample, ``setup``'s layout) and time
    per epoch (the mean sample), with the planner's memory and speed models."""
    from planner.calibration import fit_speed_constants
    from planner.layouts import fits_with_headroom
    from planner.shapes import load_shape
    from planner.speed import predict_speed

    constants, _fitted = fit_speed_constants(calibration, load_shape("phi-3-vision"))
    weights = [s.weight for s in samples]
    for row in table.rows:
        workloads = [sample_shape(shape, s.image_sizes, s.text_tokens, row.num_crops) for s in samples]
        memory = estimate_memory(shape, setup, envelope(workloads), calibration.overheads)
        row.peak_gib = memory.reserved / GIB
        row.over_context = envelope(workloads).seq_len > CONTEXT_LENGTH  # finetune refuses such samples
        row.fits = fits_with_headroom(memory, hw.gpu.memory_bytes, calibration) and not row.over_context
        speed = predict_speed(
            shape, mean_shape(workloads, weights, row.num_crops), setup, hw.gpu, hw.interconnect(), constants, dataset_size
        )
        row.epoch_s = speed.epoch_s if speed else None
    table.cost_basis = basis


def task_samples(task: str) -> list[WeightedSample]:
    """A recipe task's samples as a weighted distribution: every combination of its images' sizes
    (:data:`phi3v_core.image_sizes.TASK_IMAGES`), weighted by the product of their shares."""
    spec = TASK_IMAGES[task]
    out: dict[tuple[Size, ...], float] = {}
    for combo in itertools.product(spec.image_sizes, repeat=spec.images_per_record):
        sizes = tuple(sorted(size for size, _ in combo))  # the order of images changes neither tokens nor crops
        out[sizes] = out.get(sizes, 0.0) + math.prod(w for _, w in combo)
    return [WeightedSample(sizes, round(spec.text_tokens), weight) for sizes, weight in out.items()]
