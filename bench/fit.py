"""Refuse what cannot fit, before building it: the planner's memory prediction for a run, against this machine.

``phi3v-bench run`` and every ``matrix`` cell ask, before a worker starts, whether the configuration's predicted
memory fits here: device memory per GPU (the planner's reserved peak, :func:`planner.estimate.estimate_memory`)
against the card's memory as NVML reports it, and host RAM per node (:func:`planner.host_memory.process_host_bytes`
per process: on a CPU the whole step's tensors, with ``--offload optimizer`` its fp32 states, and the runtime measured
beside them) against what ``psutil`` says is available less the share left to the system
(:func:`planner.host_memory.shortfall`). A configuration that does not fit is refused with both numbers and the
nearest layout that does (the fewest flags changed); ``--force`` runs it anyway, and the kernel's OOM killer or the
CUDA allocator then has the last word, as before.

The prediction is the planner's, so it carries the planner's error (README "Planner"): a run is refused only when
its prediction is above the memory there is, never for the planner's headroom margin.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bench.config import BenchConfig
from bench.layout import run_flag
from phi3v_core.environment import ram_bytes
from phi3v_core.methods import METHOD_NAMES, get_method
from planner.fit_check import device_memory_bytes, host_available_bytes
from planner.host_memory import PROCESS_BASELINE_BYTES, shortfall, system_reserve_bytes

__all__ = [
    "PROCESS_BASELINE_BYTES", "Memory", "available", "fit_problem", "fit_problems", "fitting_cells",
    "host_available_bytes", "nearest_fit", "predict", "system_reserve_bytes",
]

GIB = 1 << 30
#: The fields a nearer layout may change, in the order its flags are printed.
_VARIED = ("method", "precision", "micro_batch", "gradient_checkpointing", "optim", "offload")


@dataclass(frozen=True)
class Memory:
    """Memory of one configuration (predicted) or one machine (available).

    Attributes:
        device_bytes: Per GPU (None on a CPU, or unknown).
        host_bytes: Per node (None: unknown); of a machine, what psutil calls available.
        host_total_bytes: Of a machine, its RAM (the share left to the system is taken from it; None: none).
    """

    device_bytes: float | None
    host_bytes: float | None
    host_total_bytes: float | None = None


def available(gpu: bool, nvml: Any | None = None) -> Memory:
    """This machine: the GPUs' memory (NVML) when ``gpu``, and the host RAM available (psutil)."""
    return Memory(device_memory_bytes(nvml) if gpu else None, host_available_bytes(), ram_bytes())


def predict(cfg: BenchConfig, gpu: bool) -> Memory:
    """The planner's memory for ``cfg``: reserved peak per GPU, host RAM per node."""
    from bench.selfcheck_plan import check_sample_shape, check_setup
    from planner.calibration import load_calibration
    from planner.estimate import estimate_memory
    from planner.host_memory import process_host_bytes
    from planner.shapes import load_shape

    shape = load_shape(cfg.model)
    setup = check_setup(cfg, cuda=gpu)  # ZeRO-2 buckets as the worker's TrainConfig sets them
    workload = check_sample_shape(cfg, shape)
    processes = cfg.world_size // cfg.nodes  # per node
    host = process_host_bytes(shape, setup, workload, cuda=gpu) * processes  # on a CPU every tensor is host RAM
    if gpu:
        return Memory(estimate_memory(shape, setup, workload, load_calibration().overheads).reserved, host)
    return Memory(None, host)


def _short(need: Memory, have: Memory) -> list[str]:
    """What is over (``device``, ``host``), comparing only numbers known on both sides."""
    over = []
    if need.device_bytes is not None and have.device_bytes is not None and need.device_bytes > have.device_bytes:
        over.append("device")
    if need.host_bytes is not None and shortfall(need.host_bytes, have.host_bytes, have.host_total_bytes):
        over.append("host")
    return over


def _variants(cfg: BenchConfig, gpu: bool) -> Iterator[tuple[BenchConfig, dict[str, Any]]]:
    """Layouts near ``cfg`` with the fields they change (field: value): checkpointing, micro-batch,
    optimizer/offload, method, and on a CPU bf16 for fp32 (a LoRA base is built in the compute dtype, half the bytes)."""
    world = cfg.world_size
    precisions = [cfg.precision] + (["bf16"] if not gpu and cfg.precision == "fp32" else [])
    micro_batches = [m for m in (1, 2, 4, 8, 16, 32, 64) if cfg.global_batch % (m * world) == 0] or [cfg.micro_batch]
    methods = [cfg.method] + [m for m in METHOD_NAMES if m != cfg.method and (gpu or not get_method(m).quantized)]
    for method in methods:
        options = [("adamw", "none")]
        if gpu and get_method(method).trains_base:
            options += [("adamw_8bit_fp32_master", "none"), ("adamw_8bit", "none"), ("adamw", "optimizer")]
        for optim, offload in options:
            for checkpointing, micro, precision in itertools.product(
                    (cfg.gradient_checkpointing, not cfg.gradient_checkpointing), micro_batches, precisions):
                variant = dataclasses.replace(cfg, method=method, optim=optim, offload=offload, precision=precision,
                                              gradient_checkpointing=checkpointing, micro_batch=micro)
                changes = {f: getattr(variant, f) for f in _VARIED if getattr(variant, f) != getattr(cfg, f)}
                if changes:
                    yield variant, changes


def _as_flags(changes: dict[str, Any]) -> str:
    """``--per_device_train_batch_size 1 --no_gradient_checkpointing``: ``run``'s flags for ``changes``."""
    return " ".join(word for field, value in changes.items() for word in run_flag(field, value))


def _as_assignments(changes: dict[str, Any]) -> str:
    """``--set micro_batch=1 gradient_checkpointing=off``: ``matrix``'s words for ``changes``."""
    words = [f"{f}={('on' if v else 'off') if isinstance(v, bool) else v}" for f, v in changes.items()]
    return "--set " + " ".join(words)


def nearest_fit(cfg: BenchConfig, have: Memory, gpu: bool) -> tuple[dict[str, Any], Memory] | None:
    """The fields the nearest layout that fits ``have`` changes (field: value) and its prediction (None: none does).

    Nearest: the same method before another, the same precision before another (it changes the numbers, a layout
    does not), then the fewest flags changed; among equals the faster layout (no checkpointing, then the larger
    micro-batch, then no offload).
    """
    found = []
    for variant, changes in _variants(cfg, gpu):
        need = predict(variant, gpu)
        if not _short(need, have):
            rank = (variant.method != cfg.method, variant.precision != cfg.precision, len(changes),
                    variant.gradient_checkpointing, -variant.micro_batch, variant.offload != "none")  # fmt: skip
            found.append((rank, changes, need))
    if not found:
        return None
    _rank, changes, need = min(found, key=lambda item: item[0])
    return changes, need


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def fit_problem(cfg: BenchConfig, gpu: bool, have: Memory | None = None, *, matrix: bool = False) -> str | None:
    """One line when ``cfg`` is predicted not to fit this machine (None when it fits or nothing is known).

    Args:
        cfg: A validated configuration.
        gpu: It runs on GPUs (the planner's device prediction applies).
        have: The machine's memory (detected when omitted: NVML and psutil).
        matrix: Word the nearest layout as ``matrix --set`` assignments instead of ``run`` flags.
    """
    have = have or available(gpu)
    need = predict(cfg, gpu)
    over = _short(need, have)
    if not over:
        return None
    parts = []
    if "device" in over:
        parts.append(f"{_gib(need.device_bytes or 0)} per GPU (predicted reserved peak), {_gib(have.device_bytes or 0)} on the card")
    if "host" in over:
        processes = cfg.world_size // cfg.nodes
        where = "host RAM per node" if gpu else f"host RAM ({processes} process{'es' if processes > 1 else ''} on the CPU)"
        parts.append(shortfall(need.host_bytes or 0.0, have.host_bytes, have.host_total_bytes, where))
    nearest = nearest_fit(cfg, have, gpu)
    if nearest is not None:
        changes, fits = nearest
        size = _gib(fits.device_bytes) + " per GPU" if fits.device_bytes is not None else _gib(fits.host_bytes or 0)
        advice = f"nearest layout that fits: {_as_assignments(changes) if matrix else _as_flags(changes)} (predicted {size})"
    elif cfg.model != "tiny":
        advice = "no layout of any method fits; try --model tiny or a machine with more memory"
    else:
        advice = "no layout of any method fits"
    return (f"{cfg.cell_id()} is predicted not to fit: needs {'; '.join(parts)}; {advice}; "
            "pass --force to run it anyway")


def fit_problems(cells: list[BenchConfig], gpu: bool, have: Memory | None = None, *, matrix: bool = False) -> list[str]:
    """:func:`fit_problem` for each cell (the machine read once)."""
    have = have or available(gpu)
    return [problem for cell in cells if (problem := fit_problem(cell, gpu, have, matrix=matrix)) is not None]


def fitting_cells(cells: list[BenchConfig], gpu: bool, have: Memory | None = None) -> tuple[list[BenchConfig], list[str]]:
    """The cells of a sweep predicted to fit, and one line per cell left out (a sweep goes on without them)."""
    have = have or available(gpu)
    kept, skipped = [], []
    for cell in cells:
        problem = fit_problem(cell, gpu, have, matrix=True)
        (skipped.append(f"skipped {problem}") if problem else kept.append(cell))
    return kept, skipped
