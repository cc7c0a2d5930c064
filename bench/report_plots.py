"""The plots of ``phi3v-bench report`` (split from :mod:`bench.report`, which writes the markdown around them).

* img/s by method x attention and peak tensor memory by method, each bar with the min-max of its repeats;
* img/s over GPUs (scaling over nodes);
* img/s across releases (asv's benchmark-over-commits view), regressions marked.

Value axes start at zero; :mod:`bench.report` leaves out a plot with fewer than two points. Rendered with
matplotlib's object-oriented API (Agg), never pyplot's global state.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from bench.config import IDENTITY_FIELDS, BenchConfig
from bench.results import BenchResult
from phi3v_core.constants import ATTN_NAMES
from phi3v_core.methods import METHOD_NAMES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "ATTN_ORDER", "PlotGroup", "PlotTrend", "bar_plot", "bar_rows", "release_order", "scaling_plot", "scaling_points", "series_label", "show", "tensor_source",
    "trend_plot", "varying",
]

GIB = 1 << 30
ATTN_ORDER = {a: i for i, a in enumerate(ATTN_NAMES)}


class PlotGroup(Protocol):
    """What a plot needs of one (release, hardware) group of :mod:`bench.report`."""

    results: list[BenchResult]

    @property
    def title(self) -> str: ...


class PlotTrend(Protocol):
    """What the trend plot needs of :class:`bench.report.PlotTrend`."""

    config: BenchConfig
    releases: list[str]
    results: list[BenchResult]
    verdicts: list[str]


def varying(results: Sequence[BenchResult], fields: Sequence[str]) -> list[str]:
    return [f for f in fields if len({getattr(r.config, f) for r in results}) > 1]


def series_label(cfg: BenchConfig, fields: Sequence[str]) -> str:
    return " ".join(show(getattr(cfg, f)) for f in fields) or cfg.attn


#: What the memory plot shows: the tensors a method keeps, which is what differs between methods.
_TENSOR_SOURCES = (
    ("peak_gpu_allocated_bytes", "gpu_allocated_bytes", "allocated tensors"),
    ("peak_cpu_tensor_peak_bytes", "cpu_tensor_peak_bytes", "live CPU tensors"),
)


def tensor_source(results: Sequence[BenchResult]) -> tuple[str, str, str] | None:
    ok = [r for r in results if r.status == "ok"]
    for attr, field_name, label in _TENSOR_SOURCES:
        if any(getattr(r.summary, attr) is not None for r in ok):
            return attr, field_name, label
    return None


def _spread(r: BenchResult, value: str, field_name: str | None) -> tuple[float, float] | None:
    """(min, max) of ``value`` over the repeats of ``r`` (img/s per repeat, or a memory field's per-repeat peak)."""
    if value == "img_per_s":
        per_repeat = r.metrics.repeat_throughputs()
    elif field_name is not None:
        per_repeat = [max(v) / GIB for rep in r.metrics.repeats
                      if (v := [getattr(m, field_name) for m in rep.memory if getattr(m, field_name) is not None])]
    else:
        return None
    return (min(per_repeat), max(per_repeat)) if len(per_repeat) > 1 else None

def show(value: Any) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)

# ---------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------
def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _new_figure(title: str) -> tuple[Figure, Any]:
    # The object-oriented API renders with Agg and never touches pyplot's global backend state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return fig, ax


def bar_rows(group: PlotGroup) -> list[BenchResult]:
    """The results a bar plot shows: those on the fewest nodes."""
    min_nodes = min(r.config.nodes for r in group.results)
    return [r for r in group.results if r.config.nodes == min_nodes]


def bar_plot(group: PlotGroup, value: str, ylabel: str, title: str, ref_points: dict[tuple[str, str], float],
              field_name: str | None = None) -> bytes:
    rows = bar_rows(group)
    min_nodes = rows[0].config.nodes
    label_fields = varying(rows, [f for f in IDENTITY_FIELDS if f not in ("method", "nodes", "gpus")]) or ["attn"]
    methods = [m for m in METHOD_NAMES if any(r.config.method == m for r in rows)]
    series = list(dict.fromkeys(series_label(r.config, label_fields) for r in rows))
    fig, ax = _new_figure(f"{title} — {group.title} ({min_nodes} node{'s' if min_nodes > 1 else ''})")
    width = 0.8 / max(len(series), 1)
    for si, label in enumerate(series):
        for mi, method in enumerate(methods):
            r = next((r for r in rows if r.config.method == method and series_label(r.config, label_fields) == label),
                     None)
            if r is None:
                continue
            x = mi - 0.4 + width * (si + 0.5)
            y = _plot_value(r, value)
            if y is None:
                ax.text(x, 0, r.status.upper(), ha="center", va="bottom", fontsize=7, rotation=90, color="tab:red")
                continue
            spread = _spread(r, value, field_name)
            yerr = [[max(y - spread[0], 0)], [max(spread[1] - y, 0)]] if spread else None
            ax.bar(x, y, width * 0.9, color=f"C{si}", label=label, yerr=yerr, capsize=3, ecolor="black")
            seed = ref_points.get((method, r.config.attn))
            if seed is not None:
                ax.plot([x], [seed], marker="_", markersize=14, color="black")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per series, not per bar
    if any(ref_points.get((m, a)) is not None for m in methods for a in ATTN_ORDER):
        from matplotlib.lines import Line2D

        unique["seed (published)"] = Line2D([], [], marker="_", markersize=14, color="black", linestyle="")
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_xlim(-0.6, len(methods) - 0.4)  # keep OOM labels of missing bars inside the axes
    ax.set_ylim(bottom=0)
    ax.set_ylabel(ylabel)
    return _png(fig)


def _plot_value(r: BenchResult, value: str) -> float | None:
    """Return summary field ``value`` of an ok result, bytes in GiB; ``None`` for failures."""
    if r.status != "ok":
        return None
    raw = getattr(r.summary, value)
    return raw / GIB if raw is not None and value.endswith("_bytes") else raw


def scaling_points(group: PlotGroup) -> int:
    """Points of the longest scaling series: world sizes measured for one configuration."""
    ok = [r for r in group.results if r.status == "ok" and r.summary.img_per_s]
    label_fields = varying(ok, [f for f in IDENTITY_FIELDS if f not in ("nodes", "gpus")]) or ["method"]
    series: dict[str, set[int]] = {}
    for r in ok:
        series.setdefault(series_label(r.config, label_fields), set()).add(r.config.world_size)
    return max((len(v) for v in series.values()), default=0)


def scaling_plot(group: PlotGroup, ref_scaling: dict[str, list[tuple[int, float]]]) -> bytes:
    ok = [r for r in group.results if r.status == "ok" and r.summary.img_per_s]
    label_fields = varying(ok, [f for f in IDENTITY_FIELDS if f not in ("nodes", "gpus")]) or ["method"]
    fig, ax = _new_figure(f"Scaling over nodes — {group.title}")
    series: dict[str, list[tuple[int, float]]] = {}
    for r in ok:
        series.setdefault(series_label(r.config, label_fields), []).append((r.config.world_size, r.summary.img_per_s))
    for i, (label, points) in enumerate(sorted(series.items())):
        points.sort()
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", color=f"C{i}", label=label)
        if len(points) > 1:  # ideal linear scaling from the smallest measured point
            ax.plot(xs, [ys[0] * x / xs[0] for x in xs], linestyle=":", color=f"C{i}", alpha=0.6)
    for label, points in ref_scaling.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="s", linestyle="--", color="gray", label=f"seed {label}")
    if not any(len(p) > 1 for p in series.values()):
        ax.text(0.5, 0.5, "no multi-node results in this group", transform=ax.transAxes, ha="center", color="gray")
    ax.set_xlabel("GPUs (nodes × GPUs per node)")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("img/s (global)")
    if series or ref_scaling:
        ax.legend(fontsize=8)
    return _png(fig)

def release_order(release: str) -> tuple:
    """Sort key for release labels: ``v0.10.0`` after ``v0.9.1`` (PEP 440 when it parses), others by name after."""
    from packaging.version import InvalidVersion, Version

    try:
        return (0, Version(release.lstrip("vV")), release)
    except InvalidVersion:
        return (1, release, release)

def trend_plot(hardware: str, trends: Sequence[PlotTrend]) -> bytes:
    """img/s per release, one line per configuration, regressions marked (asv's benchmark-over-commits view)."""
    releases = sorted({rel for t in trends for rel in t.releases}, key=release_order)
    x_of = {rel: i for i, rel in enumerate(releases)}
    fig, ax = _new_figure(f"img/s across releases — {hardware}")
    marked = False
    for i, t in enumerate(trends):
        points = [(x_of[rel], r.summary.img_per_s, v) for rel, r, v in zip(t.releases, t.results, t.verdicts)
                  if r.status == "ok" and r.summary.img_per_s]
        if not points:
            continue
        xs, ys, verdicts = zip(*points)
        ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=t.config.cell_id())
        for x, y, verdict in zip(xs, ys, verdicts):
            if verdict == "regressed":
                ax.plot([x], [y], marker="v", markersize=11, color="tab:red", linestyle="")
                marked = True
    if marked:
        from matplotlib.lines import Line2D

        ax.add_artist(ax.legend(fontsize=7, loc="upper left"))
        ax.legend([Line2D([], [], marker="v", color="tab:red", linestyle="")], ["regression (compare)"],
                  fontsize=7, loc="lower right")
    else:
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(releases)), releases)
    ax.set_xlabel("release")
    ax.set_ylim(bottom=0)  # a trend read from a cut axis exaggerates every change
    ax.set_ylabel("img/s (global)")
    return _png(fig)
