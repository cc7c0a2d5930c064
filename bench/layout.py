"""Which memory layout ``phi3v-bench run`` measures: the planner's for this card and method, or the seed recipe's.

A layout is micro-batch (and so gradient accumulation), gradient checkpointing, optimizer and optimizer offload —
the fields ``phi3v-plan`` chooses per card. On a GPU the bench measures the planner's layout by default
(``--layout plan``), so that what is measured is what the plan predicts and recommends; ``--layout recipe`` measures
the seed's (checkpointing on, micro-batch 1, AdamW, no offload). Flags given on the command line always win, field
by field. On a CPU the planner has no layout (it plans GPUs), so the tiny protocol's defaults stay (``recipe``).

The source is recorded in every result (``config.layout``) and printed on the run's card; ``compare`` and
``report`` show the layout beside each row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench.config import BenchConfig, DeviceDescription, choose_defaults
from phi3v_core.cli.vocabulary import SHARED_FLAGS
from phi3v_core.constants import MODEL_PRESET_NAMES, OFFLOAD_NAMES, OPTIM_NAMES
from phi3v_core.errors import ConfigError

__all__ = ["LAYOUTS", "LAYOUT_FIELDS", "RECIPE_LAYOUT", "layout_label", "plan_request", "resolve_layout", "run_flag"]

#: Where a run's layout comes from.
LAYOUTS: tuple[str, ...] = ("plan", "recipe")
#: The BenchConfig fields a layout sets.
LAYOUT_FIELDS: tuple[str, ...] = ("micro_batch", "gradient_checkpointing", "checkpoint_towers", "optim", "offload")
#: The seed recipe's layout (its scripts: checkpointing always on, AdamW, batch_size_per_gpu 1, no DeepSpeed offload).
RECIPE_LAYOUT: dict[str, Any] = {
    "micro_batch": 1, "gradient_checkpointing": True, "checkpoint_towers": "both", "optim": "adamw", "offload": "none",
}


def run_flag(field: str, value: Any) -> list[str]:
    """``phi3v-bench run``'s words that set the :class:`BenchConfig` field ``field`` (a shared flag, or
    ``gradient_checkpointing``) to ``value``, in the primary spelling of :data:`~phi3v_core.cli.vocabulary.SHARED_FLAGS`
    (what a printed command uses, never an alias)."""
    if field == "gradient_checkpointing":
        return ["--gradient_checkpointing" if value else "--no_gradient_checkpointing"]
    return [SHARED_FLAGS[field].primary, str(value)]


def _checkpointing(values: Mapping[str, Any]) -> str:
    """``on``, ``off`` or ``llm only`` / ``vision only`` (per-tower checkpointing)."""
    towers = values.get("checkpoint_towers", "both")
    return ("on" if towers == "both" else f"{towers} only") if values["gradient_checkpointing"] else "off"


def layout_label(config: Mapping[str, Any] | Any) -> str:
    """``plan: micro-batch 2 × 4, checkpointing off, adamw`` for a config or its identity dict (source if known)."""
    values = config if isinstance(config, Mapping) else config.to_dict()
    world = int(values.get("gpus", 1)) * int(values.get("nodes", 1))
    micro = int(values["micro_batch"])
    accum = int(values.get("global_batch", micro * world)) // max(micro * world, 1)
    parts = [
        f"micro-batch {micro} × {accum}",
        f"checkpointing {_checkpointing(values)}",
        str(values["optim"]),
    ]
    if values.get("offload", "none") != "none":
        parts.append(f"offload {values['offload']}")
    source = values.get("layout")
    return (f"{source}: " if source else "") + ", ".join(parts)


def plan_request(values: Mapping[str, Any]) -> Any:
    """The :class:`~planner.request.PlanRequest` of a run (method, model, batch, GPUs, crops, profile) on the
    detected GPUs: what ``--layout plan`` and the run's advice (:mod:`bench.advice`) ask the planner."""
    from planner.recommend import PlanRequest

    return PlanRequest(
        methods=(values["method"],), count=values["gpus"], nodes=values["nodes"], task=values["seq_profile"],
        num_crops=values["num_crops"], global_batch=values["global_batch"],
        model=values["model"] if values["model"] in MODEL_PRESET_NAMES else "phi-3.5-vision",
    )  # fmt: skip


def _planned(values: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The planner's layout for ``values`` (method, model, batch, GPUs, crops, profile) on the detected GPUs."""
    from planner.recommend import plan

    result = plan(plan_request(values))
    method = result.method(values["method"])
    card = f"{result.hardware.gpus_per_node}x {result.hardware.gpu.key}"
    if not (method.supported and method.fits):
        return None, f"phi3v-plan finds no layout of {values['method']} that fits {card} ({method.reasons[0]})"
    layout = {
        "micro_batch": method.micro_batch,
        "gradient_checkpointing": method.gradient_checkpointing,
        "checkpoint_towers": method.checkpoint_towers,
        "optim": method.optim,
        "offload": method.offload,
    }
    step = f", predicted {method.speed.step_s:.2f} s per step" if method.speed and method.speed.step_s else ""
    return layout, f"phi3v-plan's layout for {values['method']} on {card}{step}"


def resolve_layout(
    values: dict[str, Any], fixed: set[str], gpu: bool, requested: str | None
) -> tuple[dict[str, Any], list[str]]:
    """Set the layout fields of ``values`` that are not ``fixed``, and ``layout`` (where they came from).

    Args:
        values: Every BenchConfig field (``BenchConfig.to_dict()`` of the flags and the machine's defaults).
        fixed: Fields given on the command line or set by the machine's defaults (they are kept).
        gpu: A CUDA GPU is here (the planner plans GPUs only).
        requested: ``--layout`` (None: ``plan`` on a GPU, ``recipe`` on a CPU).

    Returns:
        The values with ``layout`` and the layout fields set, and the reasons for the card.

    Raises:
        ConfigError: ``--layout plan`` on a machine without a GPU.
    """
    if requested is not None and requested not in LAYOUTS:
        raise ConfigError(f"--layout {requested!r} is not one of {', '.join(LAYOUTS)}")
    if requested == "plan" and not gpu:
        raise ConfigError("--layout plan needs a CUDA GPU (phi3v-plan plans GPUs only); on a CPU use --layout recipe")
    source = requested or ("plan" if gpu else "recipe")
    layout, reasons = dict(RECIPE_LAYOUT), []
    if source == "plan" and values.get("model") == "tiny":
        source, why = "recipe", "the tiny model has no phi3v-plan layout (its protocol sets the micro-batch)"
        reasons.append(f"layout recipe: {why}")
    elif source == "plan" and BenchConfig.from_dict(values).problems():
        source = "recipe"  # the flags are wrong: BenchConfig.problems() names them before anything is planned
    elif source == "plan":
        planned, why = _planned(values)
        if planned is None:
            source = "recipe"
            reasons.append(f"layout recipe: {why}; measuring the seed's layout instead")
        else:
            unusable = [k for k, v in planned.items() if (k == "optim" and v not in OPTIM_NAMES)
                         or (k == "offload" and v not in OFFLOAD_NAMES)]  # fmt: skip
            layout.update({k: v for k, v in planned.items() if k not in unusable})
            reasons.append(f"layout plan: {why} (--layout recipe for the seed's)")
    else:
        reasons.append("layout recipe: " + ("the seed's (checkpointing on, AdamW, no offload)" if gpu else
                                            "the planner plans GPUs only; the CPU keeps its defaults"))
    values = {**values, **{name: layout[name] for name in LAYOUT_FIELDS if name not in fixed}}
    per_step = values["micro_batch"] * values["gpus"] * values["nodes"]
    # a bad number (gpus 0, a negative batch) is left for BenchConfig.problems() to name
    if per_step > 0 and values["global_batch"] % per_step and "micro_batch" not in fixed:
        values["micro_batch"] = 1  # the plan's micro-batch does not divide this global batch: the recipe's does
    values["layout"] = source
    reasons.append(layout_label(values))
    return values, reasons


def machine_config(
    values: Mapping[str, Any], device: DeviceDescription, layout: str | None = None
) -> tuple[BenchConfig, list[str]]:
    """One set of defaults for ``run`` and every ``matrix`` cell: the fields given, then this machine's defaults
    (:func:`bench.config.choose_defaults`), then the layout's; so a run and a sweep cell meet in ``compare``.

    Args:
        values: The fields given (flags, or a cell's preset/--set/--grid values).
        device: The machine.
        layout: ``plan`` or ``recipe`` (default: the machine's).

    Returns:
        The config and the reasons for each default chosen.
    """
    given = dict(values)
    defaults, reasons = choose_defaults(device, given.get("model"))
    merged = {**defaults, **given}
    merged, layout_reasons = resolve_layout(
        BenchConfig(**merged).to_dict(), set(merged), device.gpu_name is not None, layout
    )
    reasons += layout_reasons
    explicit = sorted(name for name in given if name in (*defaults, *LAYOUT_FIELDS) and name != "model")
    if explicit:
        reasons.append("given on the command line: " + ", ".join(f"{n} {merged[n]}" for n in explicit))
    return BenchConfig(**merged), reasons

