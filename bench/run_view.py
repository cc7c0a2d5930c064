"""What ``phi3v-bench run`` prints for one result: one metric per line, each named with its statistic or convention.

Split from :mod:`bench.cli`. Every img/s here is the number ``compare`` compares (:data:`bench.stats.STATISTIC`);
every MFU names its FLOP convention (:mod:`phi3v_core.mfu`); energy says "not available" where NVML's counter is
missing rather than leaving a dash.
"""

from __future__ import annotations

from typing import Any

from bench.config import BenchConfig
from phi3v_core.mfu import COUNTED, FROZEN_BASE, SIX_N, mfu_label

__all__ = ["metric_rows", "print_summary", "print_sweep"]

GIB = 1 << 30


def _num(v: float | None, spec: str) -> str:
    return format(v, spec) if v is not None else "–"


def _gib(v: int | None) -> str:
    return _num(v / GIB if v is not None else None, ".2f")


def metric_rows(result: Any) -> list[tuple[str, str]]:
    """``(metric, value)`` rows of a result's summary, in the order ``run`` prints them."""
    s = result.summary
    n = s.repeats
    rows = [
        (f"img/s (median of {n} repeat{'s' if n != 1 else ''})", _num(s.img_per_s, ".3f")),
        ("img/s/GPU", _num(s.img_per_s_per_gpu, ".3f")),
        ("tokens/s", _num(s.tokens_per_s, ".0f")),
        ("step s (behind img/s)", _num(s.step_time_median_s, ".4f")),
        ("p90 s (all steps)", _num(s.step_time_p90_s, ".4f")),
        ("stdev s (all steps)", _num(s.step_time_stdev_s, ".4f")),
        (mfu_label(COUNTED), _num(s.mfu, ".1%")),
        (mfu_label(SIX_N), _num(s.mfu_6n, ".1%")),
        (mfu_label(FROZEN_BASE), _num(s.mfu_frozen_base, ".1%")),
        ("HFU [counted, with recompute]", _num(s.hardware_mfu, ".1%")),
    ]
    first = next((r for r in result.metrics.repeats if r.weight_change), None)
    if first is not None:
        lr = f", lr {first.learning_rate:g}" if first.learning_rate else ""
        rows.append((f"weights changed ({first.weight_change['steps']} steps{lr})", _num(s.changed_weights_fraction, ".1%")))
    else:
        rows.append(("weights changed", _num(s.changed_weights_fraction, ".1%")))
    if s.peak_gpu_allocated_bytes is not None:
        rows += [("peak allocated GiB", _gib(s.peak_gpu_allocated_bytes)),
                 ("peak reserved GiB", _gib(s.peak_gpu_reserved_bytes)),
                 ("peak NVML GiB (sampled)", _gib(s.peak_nvml_process_bytes))]
    else:
        rows += [("peak RSS GiB", _gib(s.peak_cpu_rss_bytes)), ("peak tensor GiB", _gib(s.peak_cpu_tensor_peak_bytes))]
    if s.energy_j_per_sample is not None:
        rows.append(("energy J/sample (all GPUs)", _num(s.energy_j_per_sample, ".2f")))
        epoch = f"Wh per epoch ({s.epoch_samples} samples)" if s.epoch_samples else "Wh per epoch"
        rows.append((epoch, _num(s.energy_wh_per_epoch, ".1f")))
    elif result.status == "ok":
        rows.append(("energy (NVML counter)", "not available"))
    return rows


def print_summary(console: Any, cfg: BenchConfig, result: Any) -> None:
    """The measured numbers of one result, one metric per line (wide enough for any terminal)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"{cfg.cell_id()} [{result.status}]"))
    table.add_column("metric", overflow="fold")
    table.add_column("value", justify="right", no_wrap=True)
    for name, value in metric_rows(result):
        table.add_row(escape(name), value)
    console.print(table)
    if result.summary.mfu is not None:
        from phi3v_core.mfu import CONVENTIONS

        for name, text in CONVENTIONS.items():
            console.print(escape(f"{mfu_label(name)}: {text}"), highlight=False)
    if result.summary.energy_note:
        console.print(f"energy {result.summary.energy_note}", highlight=False)


def print_sweep(console: Any, summary: Any, total: int) -> None:
    """The cells of a ``matrix`` sweep: cell names are folded, never cut (cells differ at the end of the name)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"sweep: {total} cells")
    table.add_column("cell", overflow="fold", ratio=3)
    table.add_column("status", no_wrap=True)
    table.add_column("img/s (median)", justify="right", no_wrap=True)
    table.add_column("peak GiB", justify="right", no_wrap=True)
    table.add_column("message", overflow="fold", ratio=2)
    for o in summary.outcomes:
        s = o.result.summary if o.result else None
        peak = (s.peak_gpu_reserved_bytes or s.peak_cpu_rss_bytes) if s else None
        message = o.message if o.saved else f"NOT SAVED; {o.message}".rstrip("; ")
        table.add_row(o.config.cell_id(), o.status, f"{s.img_per_s:.3f}" if s and s.img_per_s else "",
                      f"{peak / GIB:.2f}" if peak else "", escape(message[:200]))
    console.print(table)
    console.print(", ".join(f"{k} {v}" for k, v in summary.counts().items() if v))
