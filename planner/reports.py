"""What ``phi3v-plan`` prints besides a plan: the GPU table, the calibration report and the CPU validation.

Split from :mod:`planner.cli` (the parser and the plan's own tables) so each module has one purpose.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from phi3v_core.cli.common import strict_json
from phi3v_core.errors import ConfigError

__all__ = ["calibration_lines", "dump", "fmt", "make_console", "print_calibration", "print_gpus", "print_validation"]


def dump(value: Any) -> None:
    """Print strict JSON (no NaN/Infinity)."""
    print(strict_json(value, indent=2))


def make_console() -> Any:
    """A rich console without syntax highlighting (numbers stay plain)."""
    from rich.console import Console

    return Console(highlight=False)


def fmt(value: float | None, spec: str = ".1f") -> str:
    """``value`` formatted with ``spec``, or ``-`` when unknown."""
    return "-" if value is None else format(value, spec)


def print_gpus(as_json: bool) -> None:
    """``phi3v-plan --list-gpus``: the GPU table, as a table or JSON."""
    from planner.hardware import gpu_table

    rows = [g.to_dict() for g in gpu_table()]
    if as_json:
        dump(rows)
        return
    from rich.table import Table

    # The GPU column is what --gpu takes: never cut (no_wrap); the numbers are short and the title wraps instead.
    table = Table(title="GPU table (planner/data/gpus.json; dense TFLOP/s, no sparsity)")
    table.add_column("GPU (--gpu)", no_wrap=True, min_width=max(len(g["key"]) for g in rows))
    table.add_column("arch", overflow="fold")
    for col in ("CC", "GiB", "GB/s", "TF fp16/bf16", "FA2", "NVLink GB/s"):
        table.add_column(col, justify="right", overflow="fold")
    for g in rows:
        table.add_row(
            g["key"],
            g["architecture"],
            g["compute_capability"],
            f"{g['memory_gib']:g}",
            f"{g['bandwidth_gbs']:g}",
            f"{fmt(g['tflops_fp16'], 'g')}/{fmt(g['tflops_bf16'], 'g')}",
            "yes" if g["flash_attention_2"] else "no",
            fmt(g["nvlink_gbs"], "g"),
        )
    make_console().print(table)


def print_calibration(request: Any, as_json: bool) -> None:
    """``phi3v-plan --calibration``: predicted vs published rows, the fitted constants and the held-out error."""
    from planner.calibration import calibration_report, calibration_summary, fit_speed_constants, load_calibration
    from planner.shapes import load_shape

    calibration = load_calibration(request.reference_dir)
    shape = load_shape("phi-3-vision")
    rows = calibration_report(calibration, shape)
    _constants, fitted = fit_speed_constants(calibration, shape)
    summary = calibration_summary(rows, fitted)
    if as_json:
        dump({"source": calibration.rows_source, "summary": summary, "rows": rows})
        return
    from rich.table import Table

    table = Table(title=f"Predicted vs published ({calibration.rows_source}); role = speed role")
    for col in ("row", "role", "published img/s", "predicted", "err", "published GB", "predicted", "err", "note"):
        table.add_column(col, justify="left" if col in ("row", "role", "note") else "right", overflow="fold")
    for r in rows:
        note = r["reason"] if r["role"] != "held_out" else ""
        if r["memory_note"]:
            note = f"{note}; memory: {r['memory_note']}" if note else f"memory: {r['memory_note']}"
        table.add_row(
            r["row"],
            r["role"],
            f"{r['published_img_per_s']:g}",
            f"{r['predicted_img_per_s']:.2f}",
            f"{r['speed_error_pct']:+.0f}%",
            f"{r['published_gb']:g}",
            f"{r['predicted_gb']:.1f}",
            f"{r['memory_error_pct']:+.0f}%",
            note,
        )
    console = make_console()
    console.print(table)
    for item in fitted:
        console.print(f"fitted: {item['constant']} = {item['value']:.4g} on {item['row']}")
    for line in calibration_lines(summary):
        console.print(line)
    for miss in summary["memory_misses"]:
        console.print(
            f"[yellow]memory not within 10 %[/]: {miss['row']} ({miss['memory_error_pct']:+.0f} %): {miss['why']}"
        )


def calibration_lines(summary: dict[str, Any]) -> list[str]:
    """The held-out speed and memory lines of ``--calibration`` (also rendered into the README)."""
    return [
        f"held-out speed error over {summary['held_out_rows']} rows: median "
        f"{summary['held_out_speed_error_median_pct']:.1f} %, max {summary['held_out_speed_error_max_pct']:.1f} %",
        f"held-out memory error over {summary['held_out_memory_rows']} rows (flash rows leave-one-out, the others "
        f"never fitted): median {summary['held_out_memory_error_median_pct']:.1f} %, max "
        f"{summary['held_out_memory_error_max_pct']:.1f} %; the {summary['never_fitted_memory_rows']} never fitted "
        f"alone: median {summary['never_fitted_memory_error_median_pct']:.1f} %; "
        f"{summary['saturated_memory_rows_consistent']} of {summary['saturated_memory_rows']} rows published at the "
        "card's size agree with a full card",
        f"excluded after they disagreed: {', '.join(summary['excluded_rows'])}",
        *_floor_lines(summary),
    ]


def _floor_lines(summary: dict[str, Any]) -> list[str]:
    """Why the never-fitted memory median stops where it does (the same settings ran in less on a smaller card)."""
    floor = summary.get("memory_floor") or {}
    if not floor.get("lines"):
        return []
    pair = floor["pair_floor_pct"]
    return [
        f"memory floor: {'; '.join(floor['lines'])}. So the never-fitted median cannot fall below "
        f"{floor['median_floor_pct']:.1f} % (goal 10 %) for a prediction of what the step needs"
        + (f", and a peak predicted from the settings alone misses one of the twins by >= {pair:.0f} %" if pair else "")
        + ". The excess is memory the run kept on the larger card (the published column does not say what it "
        "measured); closing it needs how much the allocator keeps on a card with room, which the table does not pin down"
    ]


def print_validation(as_json: bool, repeats: int, save: str | None, argv: Sequence[str] | None) -> None:
    """``phi3v-plan --validate``: time the speed model against real CPU steps; optionally save the raw result."""
    from planner.validate import save_validation, validate_cpu

    if save:
        from phi3v_core.fs import writable_problem

        problem = writable_problem(Path(save).resolve().parent, "--save")
        if problem:
            raise ConfigError(problem)  # before minutes of measuring
    command = " ".join(["phi3v-plan", *(sys.argv[1:] if argv is None else argv)])
    result = validate_cpu(repeats=repeats)
    if save:
        save_validation(result, save, command)
    if as_json:
        dump(result)
        return
    from rich.table import Table

    table = Table(title="Speed model on this CPU: predicted vs measured phi3v-bench step (CPU seconds, 1 thread)")
    for col in ("config", "tokens", "measured s", "predicted s", "err", "err min..max", "wall s"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in result["rows"]:
        table.add_row(
            r["case"],
            str(r["seq_len_predicted"]),
            f"{r['measured_s']:.3f}",
            f"{r['predicted_s']:.3f}",
            f"{r['error_pct']:+.0f}%",
            f"{r['error_pct_min']:+.0f}..{r['error_pct_max']:+.0f}%",
            f"{r['measured_wall_s']:.3f}",
        )
    console = make_console()
    console.print(table)
    console.print(f"rates: {result['rows'][0]['rates']}" if result["rows"] else "")
    console.print(
        f"median |error| {result['median_abs_error_pct']:.1f} %, max {result['max_abs_error_pct']:.1f} % (medians of "
        f"{result['repeats']} repeat(s); the widest spread of one case {result['max_error_spread_pct']:.1f} points); "
        f"{result['note']}"
    )
    from planner.validate import packing_lines

    for line in packing_lines(result.get("packing") or []):
        console.print(line)
    if save:
        console.print(f"raw result written to {save}")
