"""``phi3v-plan --data DIR``: one plan on the user's own data.

* num_crops: the rule of :mod:`planner.crops` on the folder's image sizes (unless ``--num-crops`` is given), and the
  table of every choice with its tokens, upscaled images, memory and time per epoch;
* memory for a micro-batch of the largest sample (:meth:`~planner.dataprofile.DataProfile.largest`), so the fit
  verdict of the methods table holds for every sample, and the samples listed as fitting nowhere are judged on the
  same layout the table judged;
* the schedule sized to the data: global batch, epochs and warm-up (:func:`sized_global_batch`,
  :func:`size_schedule`), stated where they differ from the recipe's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from phi3v_core.cli.vocabulary import plural
from planner.crops import CropsTable, add_costs, crops_table
from planner.estimate import SampleShape, estimate_memory
from planner.layouts import fits_with_headroom
from planner.packing import data_packing, remember_lengths
from planner.render import method_preference
from planner.request import Hardware, MethodPlan, PlanRequest, task_profiles
from planner.shapes import ModelShape

__all__ = [
    "MAX_EPOCHS",
    "MIN_RUN_STEPS",
    "MIN_STEPS_PER_EPOCH",
    "DataContext",
    "data_summary",
    "misfits",
    "read_data",
    "size_schedule",
    "sized_global_batch",
]

#: An epoch has at least this many optimizer steps where the data allows (the global batch is lowered for it).
MIN_STEPS_PER_EPOCH = 8
#: A run has at least this many optimizer steps (more epochs, up to :data:`MAX_EPOCHS`).
MIN_RUN_STEPS = 32
MAX_EPOCHS = 10
#: Warm-up is at most this share of the run's steps (phi3v-finetune shortens it to a tenth of --max_steps too).
WARMUP_SHARE = 0.1


@dataclass
class DataContext:
    """The folder's profile at the planned num_crops, its num_crops table, and what was sized to it."""

    profile: Any
    table: CropsTable
    memory_shape: SampleShape
    batch_note: str | None = None
    notes: list[str] = field(default_factory=list)


def sized_global_batch(samples: int, world: int, recipe: int) -> int:
    """The recipe's global batch, lowered (halving, not below the GPU count) until an epoch of ``samples`` has
    :data:`MIN_STEPS_PER_EPOCH` optimizer steps."""
    batch = recipe
    while batch > world and samples / batch < MIN_STEPS_PER_EPOCH:
        batch = max(world, batch // 2)
    return batch


def size_schedule(hyper: dict[str, Any], samples: int, global_batch: int) -> None:
    """Epochs and warm-up of ``hyper`` sized to an epoch of ``samples`` at ``global_batch`` (in place).

    Epochs: the recipe's, raised (up to :data:`MAX_EPOCHS`) until the run has :data:`MIN_RUN_STEPS` optimizer steps.
    Warm-up: the recipe's, shortened to a tenth of the run's steps (so the learning rate leaves warm-up).
    ``hyper["sized_to_data"]`` says what changed (empty when nothing did).
    """
    per_epoch = math.ceil(samples / global_batch)
    epochs = hyper["epochs"]
    changes = []
    if per_epoch * epochs < MIN_RUN_STEPS:
        raised = max(epochs, min(MAX_EPOCHS, math.ceil(MIN_RUN_STEPS / per_epoch)))
        if raised != epochs:
            changes.append(
                f"{raised} epochs instead of the recipe's {epochs:g} (at least {MIN_RUN_STEPS} optimizer steps, "
                f"at most {MAX_EPOCHS} epochs)"
            )
            hyper["epochs"] = epochs = raised
    steps = math.ceil(per_epoch * epochs)
    warmup = int(hyper["warmup_steps"])
    if warmup > WARMUP_SHARE * steps:
        hyper["warmup_steps"] = int(WARMUP_SHARE * steps)
        changes.append(
            f"warm-up {hyper['warmup_steps']} steps instead of the recipe's {warmup} (a tenth of the run's {steps})"
        )
    hyper["sized_to_data"] = (
        f"{samples:,} samples at global batch {global_batch}: {plural(per_epoch, 'optimizer step')} per epoch, {steps} in all"
        + (f"; {'; '.join(changes)}" if changes else "")
    )


def read_data(request: PlanRequest, shape: ModelShape, hw: Hardware) -> tuple[DataContext, PlanRequest]:
    """Profile ``request.data_dir``, choose its num_crops and global batch; the request to plan with."""
    from planner.dataprofile import profile_data

    profile = profile_data(request.data_dir, shape, request.num_crops, skip_bad=request.skip_bad)  # type: ignore[arg-type]
    table = crops_table(profile.weighted(), shape, f"{len(profile.samples):,} samples in {profile.path}")
    notes = []
    if request.num_crops is None:
        if table.recommended != profile.num_crops:
            profile = profile.at_num_crops(shape, table.recommended)
    elif request.num_crops != table.recommended:
        notes.append(f"--num_crops {request.num_crops} as asked; the rule recommends {table.reason}")
    if profile.skipped:
        notes.append(
            f"{plural(len(profile.skipped), 'record')} left out for bad images (--skip_bad; the command passes it "
            f"too); first: {profile.skipped[0]}"
        )
    if not any(Path(request.data_dir).glob("*_val.jsonl")):  # type: ignore[arg-type]
        notes.append(
            f"no *_val.jsonl in {request.data_dir}: the command skips evaluation (--no_eval); add one (e.g. "
            f"{task_prefix(profile)}_val.jsonl) to evaluate before and after training"
        )
    samples = len(profile.samples)
    recipe_batch = int(task_profiles()["common"]["global_batch"])
    batch, batch_note = request.global_batch, None
    if batch is None:
        batch = sized_global_batch(samples, hw.world_size, recipe_batch)
        if batch != recipe_batch:
            smaller = "fewer than" if samples < recipe_batch else "few for"
            batch_note = (
                f"the data has {samples:,} samples, {smaller} the recipe's global batch {recipe_batch}: planned with "
                f"global batch {batch} (at least {MIN_STEPS_PER_EPOCH} optimizer steps per epoch where the data "
                "allows; --batch_size to choose)"
            )
    elif batch > samples:
        batch_note = (
            f"warning: --batch_size {batch} is larger than the data's {samples:,} samples: every epoch is one "
            f"optimizer step of {samples:,} samples"
        )
    request = replace(
        request,
        num_crops=profile.num_crops,
        global_batch=batch,
        dataset_size=request.dataset_size or samples,
    )
    context = DataContext(profile, table, profile.largest(shape), batch_note, notes)
    remember_lengths(request.data_dir, profile.num_crops, profile.lengths)  # type: ignore[arg-type]
    return context, request


def task_prefix(profile: Any) -> str:
    """The name part of the folder's ``<name>_train.jsonl``."""
    return Path(profile.path).name.rsplit("_train.jsonl", 1)[0]


def misfits(
    profile: Any,
    shape: ModelShape,
    methods: list[MethodPlan],
    recommended: str | None,
    calibration: Any,
) -> dict[str, Any]:
    """Samples that fit no micro-batch (micro-batch 1 of the layout the methods table judged) under the recommended
    method, or the recipe's first supported one when nothing fits; each with the largest num_crops at which it would.
    """
    judged = [m for m in methods if m.method == recommended] or [
        m for name in method_preference() for m in methods if m.method == name and m.supported
    ]
    if not judged or judged[0].setup is None:
        return {"method": None, "count": 0, "samples": []}
    chosen = judged[0]
    setup = replace(chosen.setup, micro_batch=1)
    verdicts: dict[tuple[Any, ...], int | None] = {}
    found = []
    for sample, length in zip(profile.samples, profile.lengths, strict=True):
        key = (sample.image_sizes, sample.text_tokens)
        if key not in verdicts:
            verdicts[key] = next(
                (
                    crops
                    for crops in range(profile.num_crops, 0, -1)
                    if fits_with_headroom(
                        estimate_memory(shape, setup, sample.sample_shape(shape, crops), calibration.overheads),
                        chosen.capacity_bytes,
                        calibration,
                    )
                ),
                None,
            )
        if verdicts[key] != profile.num_crops:
            found.append({"sample": sample.where, "seq_len": length, "fits_at_num_crops": verdicts[key]})
    found.sort(key=lambda item: -item["seq_len"])  # the longest first
    return {"method": chosen.method, "count": len(found), "samples": found[:20]}


def _layout_text(m: MethodPlan) -> str:
    parts = [f"micro-batch {m.micro_batch} x {m.grad_accum}", f"checkpointing {'on' if m.gradient_checkpointing else 'off'}"]
    if m.optim != "adamw":
        parts.append(m.optim)
    if m.offload != "none":
        parts.append(f"offload {m.offload}")
    return ", ".join(parts)


def data_summary(
    context: DataContext,
    shape: ModelShape,
    hw: Hardware,
    methods: list[MethodPlan],
    recommended: str | None,
    calibration: Any,
    dataset_size: int,
) -> dict[str, Any]:
    """The plan's ``data`` section: the profile, the num_crops table with memory and time per epoch of the
    recommended layout, the schedule and the samples that fit nowhere."""
    profile = context.profile
    data = profile.to_dict()
    data["task"] = profile.task
    data["largest_sample"] = {
        "seq_len": context.memory_shape.seq_len,
        "vision_crops": context.memory_shape.vision_crops,
        "images": context.memory_shape.images,
    }
    best = next((m for m in methods if m.method == recommended), None)
    if best is not None and best.setup is not None:
        add_costs(
            context.table, profile.weighted(), shape, best.setup, hw, calibration, dataset_size,
            f"{best.method}, {_layout_text(best)} (the recommended layout)",
        )  # fmt: skip
    else:
        context.table.notes.append("no method fits: no memory or time per epoch")
    data["num_crops_table"] = context.table.to_dict()
    data["notes"] = context.notes
    data["batch_note"] = context.batch_note
    data["schedule"] = best.hyperparameters.get("sized_to_data") if best is not None else None
    data["does_not_fit"] = misfits(profile, shape, methods, recommended, calibration)
    data["packing"] = None
    if best is not None and best.setup is not None:
        from planner.calibration import fit_speed_constants
        from planner.shapes import load_shape

        constants, _fitted = fit_speed_constants(calibration, load_shape("phi-3-vision"))
        rates = constants.rates(hw.gpu, best.setup.precision)
        data["packing"] = data_packing(profile.lengths, shape, best.setup, profile.mean_shape, rates, constants)
    return data
