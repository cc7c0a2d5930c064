"""Human report of benchmark results (``phi3v-bench report``): markdown tables in the seed's layout plus PNG plots.

For every (release, hardware) group the report has

* a table laid out like the seed recipe's speed tables (method, nodes, GPUs, flash attention, effective batch, img/s,
  speed-up, peak memory), with the matching published row beside each of ours (``results/reference/speed.csv``);
* three plots: img/s by method x attention, peak memory by method, and img/s over GPUs (scaling over nodes).

Given several releases (``phi3v-bench report results/``), it adds, per configuration and hardware measured in two or
more releases, a releases x metrics table (img/s, MFU, peak memory) and one trend plot per hardware in the style of
asv, with the regressions that ``compare``'s rule finds between consecutive releases marked.

The published tables are reproduced at the end. Everything is rendered in memory first and written only when all of
it succeeded, each file atomically, so a failed report leaves no half-written files behind.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.config import IDENTITY_FIELDS, BenchConfig
from bench.layout import layout_label
from bench.reference import load_reference_accuracy, load_reference_speed, reference_hardware_for
from bench.results import BenchResult
from phi3v_core.constants import ATTN_NAMES
from phi3v_core.errors import DataError
from phi3v_core.io import atomic_write_bytes, atomic_write_text
from phi3v_core.methods import METHOD_NAMES, METHODS

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["ReleaseTrend", "Report", "build_report", "release_order", "release_trends", "seed_match", "write_report"]

GIB = 1 << 30
_ATTN_ORDER = {a: i for i, a in enumerate(ATTN_NAMES)}
_METHOD_ORDER = {m: i for i, m in enumerate(METHOD_NAMES)}
#: What the "Attention kernel" column shows (the seed's "flash attention ✔" is our flash_attention_2).
_ATTN_LABEL = {"eager": "eager", "sdpa": "sdpa", "flash_attention_2": "flash-attn 2"}
#: Models with the seed's architecture and size (a checkpoint folder is taken to be a real Phi-3(.5)-vision).
_FULL_SIZE_PRESETS = ("phi-3.5-vision", "phi-3-vision")
# Columns the seed layout already shows; every other identity field that varies within a group gets its own column.
_LAYOUT_FIELDS = ("method", "nodes", "gpus", "attn", "global_batch")
# Memory shown as "peak": what nvidia-smi would show first (the seed's likely measure), then narrower views.
_PEAK_SOURCES = (
    ("peak_nvml_process_bytes", "NVML process"),
    ("peak_gpu_reserved_bytes", "reserved"),
    ("peak_gpu_allocated_bytes", "allocated"),
    ("peak_cpu_rss_bytes", "CPU RSS"),
)


@dataclass
class Report:
    """A rendered report: markdown text plus PNG images by file name."""

    markdown: str
    images: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _Group:
    release: str
    hardware: str
    results: list[BenchResult]

    @property
    def title(self) -> str:
        return f"{self.release} · {self.hardware}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.release}-{self.hardware}")

    @property
    def gpu_name(self) -> str | None:
        return next((r.environment.gpu_name for r in self.results if r.environment.gpu_name), None)


def _sort_key(cfg: BenchConfig) -> tuple:
    return (
        _METHOD_ORDER.get(cfg.method, 99), _ATTN_ORDER.get(cfg.attn, 99), cfg.nodes, cfg.gpus,
        cfg.precision, cfg.model, cfg.num_crops, cfg.seq_profile, cfg.global_batch, cfg.micro_batch,
    )


def _groups(results: Sequence[BenchResult]) -> list[_Group]:
    grouped: dict[tuple[str, str], list[BenchResult]] = {}
    for r in results:
        grouped.setdefault((r.config.release, r.environment.hardware), []).append(r)
    return [
        _Group(release, hardware, sorted(rs, key=lambda r: _sort_key(r.config)))
        for (release, hardware), rs in sorted(grouped.items())
    ]


def _varying(results: Sequence[BenchResult], fields: Sequence[str]) -> list[str]:
    return [f for f in fields if len({getattr(r.config, f) for r in results}) > 1]


def _series_label(cfg: BenchConfig, fields: Sequence[str]) -> str:
    return " ".join(_show(getattr(cfg, f)) for f in fields) or cfg.attn


def _peak_source(results: Sequence[BenchResult]) -> tuple[str, str] | None:
    ok = [r for r in results if r.status == "ok"]
    for attr, label in _PEAK_SOURCES:
        if any(getattr(r.summary, attr) is not None for r in ok):
            return attr, label
    return None


def _gib(value: int | None) -> str:
    return f"{value / GIB:.1f}" if value is not None else "–"


def seed_match(
    ref: pd.DataFrame | None, ref_hw: str, result: BenchResult
) -> tuple[dict[str, Any] | None, str | None]:
    """The published row measured on the same kind of run as ``result``, or why there is none.

    Same kind means: the full-size model, the seed's GPU (model and memory) with the same GPUs per node, the same
    sequence profile and crops, the same method, nodes, effective batch and flash-attention setting (the seed has
    flash-attn 2 on and eager off; sdpa has no published counterpart).

    Returns:
        ``(row, None)`` on a match, else ``(None, reason)``; ``(None, None)`` when there is no reference at all.
    """
    if ref is None:
        return None, None
    cfg, env = result.config, result.environment
    rows = ref[ref.hardware == ref_hw]
    if rows.empty:
        return None, None
    spec = METHODS.get(cfg.method)
    if spec is not None and spec.recipe_name is None:
        return None, f"{cfg.method} is {spec.recipe_label}"
    seed = rows.iloc[0]
    gpu = (env.gpu_name or "").upper()
    family, memory = str(seed.gpu).upper().split("-", 1)  # "A100-80GB" -> "A100", "80GB"
    if cfg.model not in _FULL_SIZE_PRESETS and ("/" not in cfg.model and not Path(cfg.model).is_dir()):
        return None, f"model {cfg.model} is not the full-size model the seed measured"
    if not env.gpus:
        return None, "measured on a CPU"
    if family not in gpu or memory not in gpu.replace(" ", ""):
        return None, f"{env.gpu_name} is not the seed's {seed.gpu}"
    if cfg.gpus != int(seed.gpus_per_node) or len(env.gpus) < cfg.gpus:
        return None, f"{cfg.gpus} GPUs per node, the seed used {int(seed.gpus_per_node)}"
    if cfg.seq_profile != seed.dataset or cfg.num_crops != int(seed.num_crops):
        return None, f"profile {cfg.seq_profile} at {cfg.num_crops} crops, the seed measured {seed.dataset} at {int(seed.num_crops)}"
    if cfg.attn not in ("eager", "flash_attention_2"):
        return None, f"attention {cfg.attn}: the seed published flash-attn 2 on and eager off only"
    hit = rows[
        (rows.method == cfg.method)
        & (rows.nodes == cfg.nodes)
        & (rows.effective_batch == cfg.global_batch)
        & (rows.flash_attention == (cfg.attn == "flash_attention_2"))
    ]
    if hit.empty:
        return None, f"no published row for {cfg.method}, {cfg.nodes} node(s), batch {cfg.global_batch}, {cfg.attn}"
    return hit.iloc[0].to_dict(), None


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _show(value: Any) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def _setup_line(group: _Group, extra: Sequence[str]) -> str:
    first = group.results[0].config
    constant = [f for f in IDENTITY_FIELDS if f not in _LAYOUT_FIELDS and f not in extra]
    parts = [f"{f.replace('_', ' ')} {_show(getattr(first, f))}" for f in constant]
    protocols = {(r.config.steps, r.config.warmup, r.config.repeats) for r in group.results}
    if len(protocols) == 1:
        steps, warmup, repeats = protocols.pop()
        parts.append(f"{steps} timed steps × {repeats} repeats after {warmup} warmup steps (excluded)")
    else:
        parts.append("steps/repeats vary by row")
    return "Setup: " + ", ".join(parts) + "."


def _group_markdown(group: _Group, ref: pd.DataFrame | None, ref_hw: str, images: Sequence[str]) -> list[str]:
    extra = _varying(group.results, [f for f in IDENTITY_FIELDS if f not in _LAYOUT_FIELDS])
    peak_attr, peak_label = _peak_source(group.results) or _PEAK_SOURCES[1]
    ok = [r for r in group.results if r.status == "ok" and r.summary.img_per_s]
    min_nodes = min(r.config.nodes for r in group.results)
    base = next(
        (r for r in ok if r.config.method == "full" and r.config.attn == "eager" and r.config.nodes == min_nodes), None
    )
    base_note = "full, fewest nodes, eager (the seed's 1x row)"
    if base is None and ok:
        base = min(ok, key=lambda r: r.summary.img_per_s)
        base_note = f"the slowest row here ({base.config.cell_id()}), as the seed's 1x row (full, eager) is absent"

    header = ["Method", *(f.replace("_", " ") for f in extra), "# nodes", "GPUs", "Attention kernel",
              "Effective batch", "Layout", "img/s", "img/s/GPU", "Speed-up", f"Peak GiB ({peak_label})", "MFU"]
    if ref is not None:
        header += [f"Seed img/s ({ref_hw}, published)", "Seed peak GB (published)"]
    rows, notes = [], []
    no_seed: dict[str, list[str]] = {}
    for r in group.results:
        cfg, s = r.config, r.summary
        if r.status == "ok":
            speed = f"{s.img_per_s / base.summary.img_per_s:.2f}x" if (base and s.img_per_s) else "–"
            cells = [f"{s.img_per_s:.3f}" if s.img_per_s else "–",
                     f"{s.img_per_s_per_gpu:.3f}" if s.img_per_s_per_gpu else "–",
                     speed, _gib(getattr(s, peak_attr)), f"{s.mfu:.0%}" if s.mfu is not None else "–"]
        else:
            cells = ["OOM" if r.status == "oom" else "error", "–", "–", "–", "–"]
            notes.append(f"- `{cfg.cell_id()}`: {r.status}: {r.message}")
        row = [cfg.method, *(_show(getattr(cfg, f)) for f in extra), str(cfg.nodes), str(cfg.world_size),
               _ATTN_LABEL.get(cfg.attn, cfg.attn), str(cfg.global_batch), layout_label(cfg), *cells]
        if ref is not None:
            seed, reason = seed_match(ref, ref_hw, r)
            row += [f"{seed['img_per_s']:.3f}", f"~{seed['peak_gpu_mem_gb']:g}"] if seed else ["–", "–"]
            if reason:
                no_seed.setdefault(reason, []).append(cfg.method)
        rows.append(row)

    lines = [f"## {group.title}", "", _setup_line(group, extra), ""]
    lines += _md_table(header, rows)
    lines += ["", f"Speed-up is relative to {base_note}. img/s is global over all GPUs; peak memory is the maximum "
                  "over ranks."]
    if ref is not None:
        lines.append(f"Seed columns: the published {ref_hw} row of the same kind of run (full-size model, same GPU "
                     "model and count, DocVQA profile at 16 crops, same method, nodes, batch and flash-attention "
                     "setting), measured by the recipe's authors on Phi-3-vision v1; provenance in "
                     "results/reference/README.md.")
        for reason, methods in no_seed.items():
            lines.append(f"A dash in the seed columns ({', '.join(dict.fromkeys(methods))}): {reason}.")
    if notes:
        lines += ["", "Failed cells:", *notes]
    lines += [""] + [f"![{name}]({name})" for name in images] + [""]
    return lines


def _reference_markdown(speed: pd.DataFrame, accuracy: pd.DataFrame) -> list[str]:
    lines = ["## Seed reference tables", "",
             "Published with Microsoft's Phi-3(.5)-vision fine-tuning recipe; provenance in results/reference/README.md.", ""]
    for hardware, part in speed.groupby("hardware", sort=False):
        lines += [f"### Speed, {hardware} (Phi-3-vision v1, DocVQA, num_crops 16, avg 2443.23 tokens)", ""]
        rows = [[r.seed_method, str(r.nodes), str(r.gpus), "✔" if r.flash_attention else "", str(r.effective_batch),
                 f"{r.img_per_s:.3f}", f"{r.speedup:.2f}x", f"~{r.peak_gpu_mem_gb:g}", r.note or ""]
                for r in part.itertuples()]
        lines += _md_table(["Method", "# nodes", "GPUs", "flash attention", "Effective batch", "img/s", "Speed-up",
                            "Peak GB", "Note"], rows) + [""]
    lines += ["### Accuracy", ""]
    rows = [[r.benchmark, r.model, r.seed_method, r.precision,
             "–" if r.lora_rank is None else f"{r.lora_rank:g}", "–" if r.lora_alpha is None else f"{r.lora_alpha:g}",
             f"{r.learning_rate:g}", str(r.epochs), f"{r.metric} {r.value:g}"] for r in accuracy.itertuples()]
    lines += _md_table(["Benchmark", "Model", "Method", "Precision", "LoRA r", "LoRA α", "LR", "Epochs", "Score"], rows)
    return lines + [""]


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


def _bar_plot(group: _Group, value: str, ylabel: str, title: str, ref_points: dict[tuple[str, str], float]) -> bytes:
    min_nodes = min(r.config.nodes for r in group.results)
    rows = [r for r in group.results if r.config.nodes == min_nodes]
    label_fields = _varying(rows, [f for f in IDENTITY_FIELDS if f not in ("method", "nodes", "gpus")]) or ["attn"]
    methods = [m for m in METHOD_NAMES if any(r.config.method == m for r in rows)]
    series = list(dict.fromkeys(_series_label(r.config, label_fields) for r in rows))
    fig, ax = _new_figure(f"{title} — {group.title} ({min_nodes} node{'s' if min_nodes > 1 else ''})")
    width = 0.8 / max(len(series), 1)
    for si, label in enumerate(series):
        for mi, method in enumerate(methods):
            r = next((r for r in rows if r.config.method == method and _series_label(r.config, label_fields) == label),
                     None)
            if r is None:
                continue
            x = mi - 0.4 + width * (si + 0.5)
            y = _plot_value(r, value)
            if y is None:
                ax.text(x, 0, r.status.upper(), ha="center", va="bottom", fontsize=7, rotation=90, color="tab:red")
                continue
            ax.bar(x, y, width * 0.9, color=f"C{si}", label=label)
            seed = ref_points.get((method, r.config.attn))
            if seed is not None:
                ax.plot([x], [seed], marker="_", markersize=14, color="black")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per series, not per bar
    if any(ref_points.get((m, a)) is not None for m in methods for a in _ATTN_ORDER):
        from matplotlib.lines import Line2D

        unique["seed (published)"] = Line2D([], [], marker="_", markersize=14, color="black", linestyle="")
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_xlim(-0.6, len(methods) - 0.4)  # keep OOM labels of missing bars inside the axes
    ax.set_ylabel(ylabel)
    return _png(fig)


def _plot_value(r: BenchResult, value: str) -> float | None:
    """Return summary field ``value`` of an ok result, bytes in GiB; ``None`` for failures."""
    if r.status != "ok":
        return None
    raw = getattr(r.summary, value)
    return raw / GIB if raw is not None and value.endswith("_bytes") else raw


def _scaling_plot(group: _Group, ref_scaling: dict[str, list[tuple[int, float]]]) -> bytes:
    ok = [r for r in group.results if r.status == "ok" and r.summary.img_per_s]
    label_fields = _varying(ok, [f for f in IDENTITY_FIELDS if f not in ("nodes", "gpus")]) or ["method"]
    fig, ax = _new_figure(f"Scaling over nodes — {group.title}")
    series: dict[str, list[tuple[int, float]]] = {}
    for r in ok:
        series.setdefault(_series_label(r.config, label_fields), []).append((r.config.world_size, r.summary.img_per_s))
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
    ax.set_ylabel("img/s (global)")
    if series or ref_scaling:
        ax.legend(fontsize=8)
    return _png(fig)


def _reference_overlays(
    speed: pd.DataFrame | None, ref_hw: str, gpu_name: str | None
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float], dict[str, list[tuple[int, float]]]]:
    """Return the seed's single-node img/s and peak GB per (method, attn), and its multi-node series, for plotting.

    Published values go on a plot only when the group ran on the seed's own GPU family (A100 or V100); next to a
    tiny CPU run they would only flatten the axes. The seed's "GB" unit is unstated, so its memory is drawn as is.
    """
    family = ref_hw.split("x", 1)[1].split("-", 1)[0]  # "8xA100-80GB" -> "A100"
    if speed is None or not gpu_name or family not in gpu_name.upper():
        return {}, {}, {}
    rows = list(speed[speed.hardware == ref_hw].itertuples())
    img = {(r.method, r.attn): r.img_per_s for r in rows if r.nodes == 1}
    mem = {(r.method, r.attn): r.peak_gpu_mem_gb for r in rows if r.nodes == 1}
    scaling: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        scaling.setdefault(f"{r.method} {r.attn}", []).append((r.gpus, r.img_per_s))
    return img, mem, {k: v for k, v in scaling.items() if len(v) > 1}


# ---------------------------------------------------------------------------------------------------------------
# across releases
# ---------------------------------------------------------------------------------------------------------------
def release_order(release: str) -> tuple:
    """Sort key for release labels: ``v0.10.0`` after ``v0.9.1`` (PEP 440 when it parses), others by name after."""
    from packaging.version import InvalidVersion, Version

    try:
        return (0, Version(release.lstrip("vV")), release)
    except InvalidVersion:
        return (1, release, release)


@dataclass
class ReleaseTrend:
    """One configuration on one hardware across releases (oldest first).

    Attributes:
        hardware: Hardware folder name.
        config: The configuration of the newest release (identity shared by all).
        releases: Release labels, oldest first.
        results: One result per release.
        verdicts: ``compare``'s verdict of each release against the previous one (``""`` for the first).
    """

    hardware: str
    config: BenchConfig
    releases: list[str]
    results: list[BenchResult]
    verdicts: list[str]


def release_trends(results: Sequence[BenchResult]) -> list[ReleaseTrend]:
    """Group results by hardware and configuration identity; keep those measured in two or more releases.

    Consecutive releases are judged with ``compare``'s rule (:func:`bench.compare.compare_results`), so a release
    marked ``regressed`` here is one that ``phi3v-bench compare`` would fail.
    """
    from bench.compare import compare_results

    grouped: dict[tuple, dict[str, BenchResult]] = {}
    for r in results:
        key = (r.environment.hardware, tuple(r.config.identity().items()))
        grouped.setdefault(key, {})[r.config.release] = r
    trends = []
    for (hardware, _identity), by_release in grouped.items():
        if len(by_release) < 2:
            continue
        releases = sorted(by_release, key=release_order)
        ordered = [by_release[rel] for rel in releases]
        verdicts = [""] + [
            compare_results([prev], [cur]).matches[0].verdict for prev, cur in zip(ordered, ordered[1:])
        ]
        trends.append(ReleaseTrend(hardware, ordered[-1].config, releases, ordered, verdicts))
    trends.sort(key=lambda t: (t.hardware, _sort_key(t.config)))
    return trends


def _trend_markdown(trends: Sequence[ReleaseTrend], plots: dict[str, str]) -> list[str]:
    lines = ["## Across releases", "",
             "Each configuration measured in two or more releases on the same hardware. A release is marked "
             "regressed when `phi3v-bench compare` finds a regression against the previous release (img/s on "
             "per-repeat medians, memory within tolerance, or a new failure).", ""]
    for hardware in dict.fromkeys(t.hardware for t in trends):
        lines += [f"### {hardware}", ""]
        for t in (t for t in trends if t.hardware == hardware):
            peak_attr, peak_label = _peak_source(t.results) or _PEAK_SOURCES[1]
            lines += [f"`{t.config.cell_id()}`", ""]
            rows = []
            for release, r, verdict in zip(t.releases, t.results, t.verdicts):
                s = r.summary
                ok = r.status == "ok"
                rows.append([
                    release,
                    f"{s.img_per_s:.3f}" if ok and s.img_per_s else r.status.upper(),
                    f"{s.mfu:.1%}" if ok and s.mfu is not None else "–",
                    _gib(getattr(s, peak_attr)) if ok else "–",
                    {"regressed": "▼ regressed", "improved": "▲ improved"}.get(verdict, verdict or "–"),
                ])
            lines += _md_table(["Release", "img/s", "MFU", f"Peak GiB ({peak_label})", "vs previous"], rows)
            lines.append("")
        lines += [f"![{plots[hardware]}]({plots[hardware]})", ""]
    return lines


def _trend_plot(hardware: str, trends: Sequence[ReleaseTrend]) -> bytes:
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
    ax.set_ylabel("img/s (global)")
    return _png(fig)


# ---------------------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------------------
def build_report(
    results: Sequence[BenchResult] | Sequence[tuple[Path, BenchResult]],
    *,
    reference_dir: str | Path | None = None,
    with_reference: bool = True,
) -> Report:
    """Render the markdown and plots for ``results`` in memory.

    Args:
        results: Results, bare or as ``(path, result)`` pairs.
        reference_dir: Folder with the seed tables as CSV (default: the packaged copy, ``phi3v_core.reference``).
        with_reference: Put the seed's published rows beside ours and reproduce its tables.

    Returns:
        A :class:`Report`; nothing is written.

    Raises:
        DataError: No results, or the reference tables are missing/malformed.
    """
    items = [r[1] if isinstance(r, tuple) else r for r in results]
    if not items:
        raise DataError("no results to report; pass result .json files or a results folder")
    speed = load_reference_speed(reference_dir) if with_reference else None
    accuracy = load_reference_accuracy(reference_dir) if with_reference else None

    lines = ["# phi3v-bench report", "",
             f"{len(items)} results. img/s counts images over all GPUs per second of median step time (warmup "
             "excluded); memory is the peak of the busiest rank (GiB = 2^30 bytes).", ""]
    images: dict[str, bytes] = {}
    for group in _groups(items):
        ref_hw = reference_hardware_for(group.gpu_name)
        # Published points go on the plots only where a row of the same kind exists (the table's rule).
        same_kind = any(seed_match(speed, ref_hw, r)[0] is not None for r in group.results)
        ref_img, ref_mem, ref_scaling = _reference_overlays(speed if same_kind else None, ref_hw, group.gpu_name)
        names = [f"throughput-{group.slug}.png", f"memory-{group.slug}.png", f"scaling-{group.slug}.png"]
        images[names[0]] = _bar_plot(group, "img_per_s", "img/s (global)", "img/s by method × attention", ref_img)
        peak_attr, peak_label = _peak_source(group.results) or _PEAK_SOURCES[1]
        images[names[1]] = _bar_plot(group, peak_attr, f"peak GiB, {peak_label} (busiest rank)",
                                     "Peak memory by method", ref_mem)
        images[names[2]] = _scaling_plot(group, ref_scaling)
        lines += _group_markdown(group, speed, ref_hw, names)
    trends = release_trends(items)
    if trends:
        plots = {}
        for hardware in dict.fromkeys(t.hardware for t in trends):
            name = f"trend-{re.sub(r'[^A-Za-z0-9._-]+', '_', hardware)}.png"
            images[name] = _trend_plot(hardware, [t for t in trends if t.hardware == hardware])
            plots[hardware] = name
        lines += _trend_markdown(trends, plots)
    if speed is not None and accuracy is not None:
        lines += _reference_markdown(speed, accuracy)
    return Report("\n".join(lines).rstrip() + "\n", images)


def write_report(report: Report, out_dir: str | Path, markdown_name: str = "report.md") -> list[Path]:
    """Write a rendered report into ``out_dir`` (created if needed), each file atomically.

    Returns:
        The written paths, markdown first.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; pass another --out")
    paths = [atomic_write_text(out / markdown_name, report.markdown)]
    paths += [atomic_write_bytes(out / name, data) for name, data in report.images.items()]
    return paths
