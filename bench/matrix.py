"""Sweeps over many benchmark configurations (``phi3v-bench matrix``).

A sweep is a list of :class:`~bench.config.BenchConfig` cells. They come from a preset (the seed recipe's speed tables
``seed-a100``/``seed-v100``, or the tiny ``quick`` smoke grid), from a custom grid (``method=lora,qlora attn=sdpa,eager``)
or from both: the grid replaces a field across every preset cell. The memory-layout axes the planner chooses between
sweep the same way (``--grid gradient_checkpointing=on,off optim=adamw,adamw_8bit offload=none,optimizer``). The sweep

* validates every cell before running any, and reports all problems at once;
* runs each cell through an injectable ``run_cell(cfg) -> BenchResult`` (default :func:`bench.runner.run_config`);
* records an out-of-memory or a crash in one cell as a result row (status ``oom``/``host_oom``/``killed``/
  ``timeout``/``error`` plus the message, see :mod:`bench.status`) and goes on;
* writes each result atomically as soon as its cell ends, so an interrupted sweep loses at most the running cell;
  when a write fails (disk full, permission) the sweep stops, and the measured result stays in the summary (printed
  by the CLI) with the write error, rather than being lost;
* skips cells whose result file already holds a finished result when re-run (:data:`FINISHED_STATUSES`: ``ok``,
  ``oom`` and ``host_oom``, which are answers about the configuration on this machine); ``error`` (usually fixed by
  a code change), ``timeout`` and ``killed`` (a signal from outside: a scheduler, a user, an OOM killer that left no
  trace) are retried; ``force=True`` re-runs everything.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.config import IDENTITY_FIELDS, BenchConfig, DeviceDescription, canonical_field, parse_field_value
from bench.layout import machine_config
from bench.results import BenchResult, RunEnvironment, utc_now
from bench.status import oom_status
from bench.store import load_result, result_path
from phi3v_core.errors import ConfigError, DataError, raise_all
from phi3v_core.fs import describe_os_error
from phi3v_core.io import atomic_write_text
from phi3v_core.methods import METHOD_NAMES

__all__ = [
    "FINISHED_STATUSES",
    "PRESETS",
    "CellOutcome",
    "MatrixSummary",
    "RunCell",
    "build_cells",
    "classify_failure",
    "parse_assignments",
    "parse_grid",
    "preset_cells",
    "run_matrix",
]

RunCell = Callable[[BenchConfig], BenchResult]

#: Statuses that count as done when a sweep is resumed (see the module docstring for why the others are retried).
FINISHED_STATUSES: tuple[str, ...] = ("ok", "oom", "host_oom")

# The seed's benchmark setup (the Phi-3CookBook fine-tuning guide's speed table): DocVQA, num_crops 16, global batch 64, per-GPU batch 1, 8 GPUs per node.
_SEED_BASE: dict[str, Any] = dict(
    model="phi-3.5-vision", num_crops=16, seq_profile="docvqa", global_batch=64, micro_batch=1, gpus=8,
    gradient_checkpointing=True,
)
# The seed's "flash attention" rows are bf16; its "no flash attention" rows are eager attention with fp16 AMP
# (the recipe loads fp32 weights then), so that is what we measure next to them (results/reference/README.md).
_FA = dict(attn="flash_attention_2", precision="bf16")
_NO_FA = dict(attn="eager", precision="fp16")

#: Preset name -> list of field overrides, one per cell.
PRESETS: dict[str, list[dict[str, Any]]] = {
    # The 10 rows of the seed's 8xA100-80GB table, in its order.
    "seed-a100": [
        {**_SEED_BASE, **_NO_FA, "method": "full", "nodes": 1},
        {**_SEED_BASE, **_FA, "method": "full", "nodes": 1},
        {**_SEED_BASE, **_FA, "method": "full", "nodes": 2},
        {**_SEED_BASE, **_FA, "method": "full", "nodes": 4},
        {**_SEED_BASE, **_NO_FA, "method": "frozen_vision", "nodes": 1},
        {**_SEED_BASE, **_FA, "method": "frozen_vision", "nodes": 1},
        {**_SEED_BASE, **_NO_FA, "method": "lora", "nodes": 1},
        {**_SEED_BASE, **_FA, "method": "lora", "nodes": 1},
        {**_SEED_BASE, **_NO_FA, "method": "qlora", "nodes": 1},
        {**_SEED_BASE, **_FA, "method": "qlora", "nodes": 1},
    ],
    # The 5 rows of the seed's 8xV100-32GB table (Volta: no flash attention, no bf16).
    "seed-v100": [
        {**_SEED_BASE, **_NO_FA, "method": "full", "nodes": 1},
        {**_SEED_BASE, **_NO_FA, "method": "full", "nodes": 2},
        {**_SEED_BASE, **_NO_FA, "method": "full", "nodes": 4},
        {**_SEED_BASE, **_NO_FA, "method": "frozen_vision", "nodes": 1},
        {**_SEED_BASE, **_NO_FA, "method": "lora", "nodes": 1},
    ],
    # A one-GPU smoke sweep on the tiny model: every method with both portable attention kernels.
    "quick": [
        dict(model="tiny", method=method, attn=attn, precision="bf16", num_crops=4, seq_profile="docvqa",
             global_batch=4, micro_batch=2, gpus=1, nodes=1, steps=5, warmup=2, repeats=1)
        for method in METHOD_NAMES
        for attn in ("sdpa", "eager")
    ],
}


def preset_cells(name: str) -> list[dict[str, Any]]:
    """Return the field overrides of preset ``name`` (copies; safe to modify).

    Raises:
        ConfigError: Unknown preset.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return [dict(cell) for cell in PRESETS[name]]


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``key=value`` items (``--set``) into typed BenchConfig field values.

    Raises:
        ConfigError: Malformed item, unknown field or wrong type (all problems at once).
    """
    values: dict[str, Any] = {}
    problems: list[str] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = canonical_field(key.strip().replace("-", "_"))
        if not sep or not key or not text.strip():
            problems.append(f"--set {item!r} must look like key=value (e.g. steps=5)")
            continue
        if key in values:
            problems.append(f"--set {key} is given twice; give each field once")
            continue
        try:
            values[key] = parse_field_value(key, text.strip())
        except ConfigError as exc:
            problems.append(str(exc))
    raise_all(problems)
    return values


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """Parse grid axes such as ``method=lora,qlora`` into ``{field: [values...]}``.

    Only identity fields (what is measured) can be swept; repeats or steps belong in ``--set``.

    Raises:
        ConfigError: Malformed axis, unknown or non-identity field, duplicate axis, wrong type (all at once).
    """
    grid: dict[str, list[Any]] = {}
    problems: list[str] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = canonical_field(key.strip().replace("-", "_"))
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not sep or not key or not values:
            problems.append(f"grid axis {item!r} must look like field=v1,v2 (e.g. method=lora,qlora)")
            continue
        if key in grid:
            problems.append(f"grid axis {key!r} is given twice; list all its values once (e.g. {key}=a,b)")
            continue
        try:
            parsed = [parse_field_value(key, v) for v in values]
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        if key not in IDENTITY_FIELDS:
            problems.append(f"grid axis {key!r} is not swept; sweep one of {', '.join(IDENTITY_FIELDS)} (use --set for {key})")
            continue
        grid[key] = list(dict.fromkeys(parsed))
    raise_all(problems)
    return grid


def build_cells(
    preset: str | None = None,
    grid: Mapping[str, Sequence[Any]] | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: BenchConfig | None = None,
    device: DeviceDescription | None = None,
) -> list[BenchConfig]:
    """Expand a preset and/or grid into validated, de-duplicated cells.

    Order of application: ``base`` (default ``BenchConfig()``) ← preset cell ← ``overrides`` (``--set``) ← grid axis
    values (cartesian product, the first axis varying slowest).

    Args:
        preset: A key of :data:`PRESETS`, or None for one base cell.
        grid: Field -> values to sweep.
        overrides: Fields fixed for every cell (e.g. ``{"steps": 5, "release": "v0.2.0"}``).
        base: Starting config.
        device: The machine: a field no cell sets takes the defaults ``phi3v-bench run`` would take on it
            (:func:`bench.layout.machine_config`), so a sweep cell and a run meet in ``compare``.

    Returns:
        The cells, in sweep order.

    Raises:
        ConfigError: Every invalid cell, each named by its cell id, in one message.
    """
    base = base or BenchConfig()
    starts = preset_cells(preset) if preset else [{}]
    grid = dict(grid or {})
    axes = list(grid)
    cells: list[BenchConfig] = []
    seen: set[str] = set()
    cells_by_problem: dict[str, list[str]] = {}  # one bad grid value spoils many cells; report it once
    for start in starts:
        for combo in itertools.product(*(grid[a] for a in axes)):
            try:
                fields = {**start, **(overrides or {}), **dict(zip(axes, combo))}
                cfg = machine_config(fields, device)[0] if device is not None else base.replace(**fields)
            except TypeError as exc:  # an unknown field name slipped past the parsers
                raise ConfigError(str(exc)) from None
            cell_id = cfg.cell_id()
            if cell_id in seen:
                continue
            seen.add(cell_id)
            for problem in cfg.problems() or cfg.training_problems():  # the check `run` applies, before the sweep
                cells_by_problem.setdefault(problem, []).append(cell_id)
            cells.append(cfg)
    raise_all(
        f"{problem} (cell {ids[0]})" if len(ids) == 1 else f"{problem} ({len(ids)} cells, e.g. {ids[0]})"
        for problem, ids in cells_by_problem.items()
    )
    return cells


def expected_seconds(
    cells: Sequence[BenchConfig], device: DeviceDescription, memory_bytes: float | None
) -> float | None:
    """The sweep's expected duration: per cell, the allowance ``selfcheck`` budgets per fresh process plus the
    planner's step time (on a CPU a fixed per-step allowance for the tiny model), times its repeats. ``None``
    where nothing predicts it (a full-size model on a CPU)."""
    if device.gpu_name is None and any(cfg.model != "tiny" for cfg in cells):
        return None
    from bench.selfcheck_plan import TargetMachine
    from bench.selfcheck_plan import expected_seconds as repeat_seconds
    from planner.shapes import load_shape

    total = 0.0
    for cfg in cells:
        machine = TargetMachine(device, cfg.gpus if device.gpu_name else 0, memory_bytes)
        layers = load_shape(cfg.model).num_layers if device.gpu_name else None
        total += cfg.repeats * repeat_seconds(cfg, machine, layers)
    return total


def classify_failure(exc: BaseException) -> str:
    """Return ``"oom"`` for a GPU out-of-memory failure (torch, NCCL, CUDA driver, cuBLAS, cuDNN), ``"host_oom"`` when
    the host ran out (``MemoryError``, torch's CPU allocator), else ``"error"``; every spelling, any case
    (:func:`bench.status.oom_status`)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "OutOfMemoryError" in names:  # torch.OutOfMemoryError / torch.cuda.OutOfMemoryError
        return "oom"
    if isinstance(exc, MemoryError):
        return "host_oom"
    return oom_status(f"{type(exc).__name__}: {exc}") or "error"


@dataclass
class CellOutcome:
    """What happened to one cell in a sweep: a result status (run now) or ``skipped`` (already finished)."""

    config: BenchConfig
    status: str
    path: Path
    message: str = ""
    result: BenchResult | None = None
    saved: bool = True


@dataclass
class MatrixSummary:
    """All cells of a sweep in order."""

    outcomes: list[CellOutcome] = field(default_factory=list)
    #: Why the sweep stopped early because a result could not be written (``None`` when every write succeeded).
    write_error: str | None = None

    def counts(self) -> dict[str, int]:
        """Return how many cells ended in each status."""
        counts = {s: 0 for s in ("ok", "oom", "error", "skipped")}
        for o in self.outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        cells = []
        for o in self.outcomes:
            cell: dict[str, Any] = {"cell": o.config.cell_id(), "status": o.status, "path": str(o.path),
                                    "message": o.message}
            if not o.saved:
                # The file was not written: the numbers travel in the summary instead of being lost.
                cell.update(saved=False, result=o.result.to_dict() if o.result else None)
            cells.append(cell)
        return {"counts": self.counts(), "cells": cells, "write_error": self.write_error}


def _finished(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        return load_result(path).status in FINISHED_STATUSES
    except DataError:
        return False  # a corrupt or foreign file is re-measured and replaced


def _newer_version(path: Path) -> str | None:
    """Why ``path`` must be kept: it was written by a newer phi3v-bench (``None`` when it is not)."""
    import json

    from bench.results import SCHEMA_VERSION

    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        return (
            f"{path} was written by a newer phi3v-bench (schema_version {version} > {SCHEMA_VERSION}): kept, not "
            "re-measured; upgrade phi3v-bench, or pass --release/--out to measure into another folder"
        )
    return None


def _default_run_cell(cfg: BenchConfig) -> BenchResult:
    # Looked up at call time so that the real runner (and test patches of it) are always the current one.
    from bench import runner

    return runner.run_config(cfg)


def run_matrix(
    cells: Sequence[BenchConfig],
    *,
    environment: RunEnvironment | None = None,
    run_cell: RunCell | None = None,
    force: bool = False,
    progress: bool = True,
    console: Any = None,
) -> MatrixSummary:
    """Run a sweep, one cell after another, writing each result as it finishes.

    Args:
        cells: Validated cells (see :func:`build_cells`); each is written under its own ``out``/``release``.
        environment: The machine description used for the result folder (``<hardware>``) and for failure rows;
            captured once here when omitted.
        run_cell: ``cfg -> BenchResult`` for one cell; default :func:`bench.runner.run_config`. It may return a
            result with status ``oom``/``error`` or raise; an exception becomes an ``oom``/``error`` row.
        force: Re-run cells that already have a finished result.
        progress: Show a rich progress bar.
        console: A ``rich.console.Console`` to draw on (default: stderr).

    Returns:
        A :class:`MatrixSummary` with one outcome per cell.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from bench.results import capture_environment

    env = environment or capture_environment()
    run = run_cell or _default_run_cell
    summary = MatrixSummary()
    bar = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[tally]}"),
        console=console or Console(stderr=True),
        disable=not progress,
    )
    with bar:
        task = bar.add_task("sweep", total=len(cells), tally="")
        for cfg in cells:
            path = result_path(cfg.out, cfg.release, env.hardware, cfg)
            bar.update(task, description=cfg.cell_id())
            newer = _newer_version(path)  # never replaced, even with --force
            if newer is not None:
                summary.outcomes.append(CellOutcome(cfg, "skipped", path, newer))
            elif not force and _finished(path):
                summary.outcomes.append(CellOutcome(cfg, "skipped", path))
            else:
                outcome = _run_one(cfg, run, env, path)
                summary.outcomes.append(outcome)
                if not outcome.saved:
                    # A full disk or a read-only folder fails every later cell too: stop instead of measuring for
                    # nothing, and let the caller print what was measured.
                    summary.write_error = outcome.message
                    break
            counts = summary.counts()
            bar.update(task, advance=1, tally=" ".join(f"{k} {v}" for k, v in counts.items() if v))
        bar.update(task, description="sweep done")
    return summary


def _run_one(cfg: BenchConfig, run: RunCell, env: RunEnvironment, path: Path) -> CellOutcome:
    started = utc_now()
    try:
        result = run(cfg)
    except Exception as exc:  # noqa: BLE001 - one cell's failure is a result row; the sweep goes on
        status = classify_failure(exc)
        message = f"{type(exc).__name__}: {exc}".strip()
        result = BenchResult.failure(cfg, status, message.splitlines()[0][:500], env, started_at=started)
    if result.config != cfg:
        # The file name comes from cfg; a runner that changed the config would store it under a wrong name.
        result = BenchResult.failure(
            cfg, "error", f"run_cell returned a result for {result.config.cell_id()}", env, started_at=started
        )
    if not result.environment.gpus and not result.environment.python:
        result.environment = env  # failure rows built by the runner may carry no environment
    # Saved where the resume check looks (the sweep's hardware folder), whatever the runner's own environment says.
    newer = _newer_version(path)  # appeared while this cell ran
    if newer is not None:
        return CellOutcome(cfg, result.status, path, newer, result, saved=False)
    try:
        atomic_write_text(path, result.to_json())
    except OSError as exc:
        cause = describe_os_error(OSError(exc.errno, exc.strerror), path)
        message = f"cell {cfg.cell_id()} was measured but its result could not be written: {cause}"
        return CellOutcome(cfg, result.status, path, message, result, saved=False)
    return CellOutcome(cfg, result.status, path, result.message, result)
