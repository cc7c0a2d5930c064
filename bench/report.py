"""Human report of benchmark results (``phi3v-bench report``): markdown tables in the seed's layout plus PNG plots.

For every (release, hardware) group the report has

* a table laid out like the seed recipe's speed tables (method, nodes, GPUs, flash attention, effective batch, img/s,
  speed-up, peak memory), with the matching published row beside each of ours (``results/reference/speed.csv``);
* up to three plots: img/s by method x attention and peak tensor memory by method (CUDA's allocated bytes, or the
  live CPU tensors: what differs between methods, not the process's RSS), each bar with the spread of its repeats
  (min to max of the per-repeat values), and img/s over GPUs (scaling over nodes). A plot with fewer than two
  points says nothing and is left out; value axes start at zero.

Given several releases (``phi3v-bench report results/``), it adds, per configuration and hardware measured in two or
more releases, a releases x metrics table (img/s, MFU, peak memory) and one trend plot per hardware in the style of
asv, with the regressions that ``compare``'s rule finds between consecutive releases marked.

The published tables are reproduced at the end. Everything is rendered in memory first and written only when all of
it succeeded, each file atomically, so a failed report leaves no half-written files behind.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.config import IDENTITY_FIELDS, BenchConfig
from bench.layout import layout_label
from bench.reference import load_reference_accuracy, load_reference_speed, reference_hardware_for
from bench.report_plots import (
    ATTN_ORDER,
    bar_plot,
    bar_rows,
    release_order,
    scaling_plot,
    scaling_points,
    show,
    tensor_source,
    trend_plot,
    varying,
)
from bench.results import BenchResult
from bench.stats import STATISTIC
from phi3v_core.cli.vocabulary import plural
from phi3v_core.errors import DataError
from phi3v_core.io import atomic_write_bytes, atomic_write_text
from phi3v_core.methods import METHOD_NAMES, METHODS
from phi3v_core.mfu import CONVENTIONS, COUNTED

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ReleaseTrend", "Report", "build_report", "release_order", "release_trends", "seed_match", "write_report"]

GIB = 1 << 30
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
        _METHOD_ORDER.get(cfg.method, 99), ATTN_ORDER.get(cfg.attn, 99), cfg.nodes, cfg.gpus,
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
        return None, f"no published row for {cfg.method}, {plural(cfg.nodes, 'node')}, batch {cfg.global_batch}, {cfg.attn}"
    return hit.iloc[0].to_dict(), None


_NAN_CELL = re.compile(r"~?(nan|none)(x|%)?", re.IGNORECASE)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table; a cell that would read ``nan`` or ``None`` (an empty CSV field, a missing value) is ``–``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("–" if _NAN_CELL.fullmatch(str(c).strip()) else str(c) for c in row) + " |"
              for row in rows]
    return lines


def _setup_line(group: _Group, extra: Sequence[str]) -> str:
    first = group.results[0].config
    constant = [f for f in IDENTITY_FIELDS if f not in _LAYOUT_FIELDS and f not in extra]
    parts = [f"{f.replace('_', ' ')} {show(getattr(first, f))}" for f in constant]
    protocols = {(r.config.steps, r.config.warmup, r.config.repeats) for r in group.results}
    if len(protocols) == 1:
        steps, warmup, repeats = protocols.pop()
        parts.append(f"{steps} timed steps × {repeats} repeats after {warmup} warmup steps (excluded)")
    else:
        parts.append("steps/repeats vary by row")
    return "Setup: " + ", ".join(parts) + "."


def _group_markdown(group: _Group, ref: pd.DataFrame | None, ref_hw: str, images: Sequence[str]) -> list[str]:
    extra = varying(group.results, [f for f in IDENTITY_FIELDS if f not in _LAYOUT_FIELDS])
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
              "Effective batch", "Layout", "img/s", "img/s/GPU", "Speed-up", f"Peak GiB ({peak_label})", "MFU [counted]"]
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
        row = [cfg.method, *(show(getattr(cfg, f)) for f in extra), str(cfg.nodes), str(cfg.world_size),
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
                 f"{r.img_per_s:.3f}", f"{r.speedup:.2f}x", f"~{r.peak_gpu_mem_gb:g}",
                 r.note if isinstance(r.note, str) else ""]
                for r in part.itertuples()]
        lines += _md_table(["Method", "# nodes", "GPUs", "flash attention", "Effective batch", "img/s", "Speed-up",
                            "Peak GB", "Note"], rows) + [""]
    lines += ["### Accuracy", ""]
    rows = [[r.benchmark, r.model, r.seed_method, r.precision,
             "–" if r.lora_rank is None else f"{r.lora_rank:g}", "–" if r.lora_alpha is None else f"{r.lora_alpha:g}",
             f"{r.learning_rate:g}", str(r.epochs), f"{r.metric} {r.value:g}"] for r in accuracy.itertuples()]
    lines += _md_table(["Benchmark", "Model", "Method", "Precision", "LoRA r", "LoRA α", "LR", "Epochs", "Score"], rows)
    return lines + [""]


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
            lines += _md_table(["Release", "img/s", "MFU [counted]", f"Peak GiB ({peak_label})", "vs previous"], rows)
            lines.append("")
        lines += [f"![{plots[hardware]}]({plots[hardware]})", ""]
    return lines


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
             f"{len(items)} results. img/s counts images over all GPUs per second: the {STATISTIC} (warmup "
             "excluded), the number `phi3v-bench run` and `compare` show; memory is the peak of the busiest rank "
             f"(GiB = 2^30 bytes); MFU [counted]: {CONVENTIONS[COUNTED]}.", ""]
    images: dict[str, bytes] = {}
    for group in _groups(items):
        ref_hw = reference_hardware_for(group.gpu_name)
        # Published points go on the plots only where a row of the same kind exists (the table's rule).
        same_kind = any(seed_match(speed, ref_hw, r)[0] is not None for r in group.results)
        ref_img, ref_mem, ref_scaling = _reference_overlays(speed if same_kind else None, ref_hw, group.gpu_name)
        names = []
        bars = [r for r in bar_rows(group) if r.status == "ok"]
        if len(bars) + len(ref_img) > 1:  # one bar is not a comparison
            names.append(f"throughput-{group.slug}.png")
            images[names[-1]] = bar_plot(group, "img_per_s", "img/s (global; bars: min-max of repeats)",
                                          "img/s by method × attention", ref_img)
        tensor = tensor_source(group.results)
        if tensor is not None and len(bars) > 1:
            names.append(f"memory-{group.slug}.png")
            images[names[-1]] = bar_plot(group, tensor[0], f"peak GiB, {tensor[2]} (busiest rank)",
                                          "Peak tensor memory by method", ref_mem, tensor[1])
        if scaling_points(group) > 1 or ref_scaling:
            names.append(f"scaling-{group.slug}.png")
            images[names[-1]] = scaling_plot(group, ref_scaling)
        lines += _group_markdown(group, speed, ref_hw, names)
    trends = release_trends(items)
    if trends:
        plots = {}
        for hardware in dict.fromkeys(t.hardware for t in trends):
            name = f"trend-{re.sub(r'[^A-Za-z0-9._-]+', '_', hardware)}.png"
            images[name] = trend_plot(hardware, [t for t in trends if t.hardware == hardware])
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
