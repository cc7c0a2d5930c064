"""Compare two sets of benchmark results configuration by configuration (``phi3v-bench compare A B``).

Results are matched on the config identity (:data:`bench.config.IDENTITY_FIELDS`) and the hardware (GPU model and
count, or CPU model, from the result's environment); protocol fields such as steps or seed do not split a match.
Nothing matched is a user error (exit 1) that says why; matched results measured on machines that differ otherwise
(driver, CUDA, CPU, host platform) are compared with a note saying so; matched results whose numbers mean different
things (library versions, what a step is: :mod:`bench.drift`) are flagged before any verdict. Per match it reports
img/s - the one number every command shows for a result, :data:`bench.stats.STATISTIC` - and peak memory changes
judged by :mod:`bench.stats`, with the reason for each verdict (and, for an unproven change, the repeats that would
decide it).
A candidate that fails (oom/error) where the baseline succeeded is a regression; the reverse is a fix.

Exit code contract (used by CI): 0 = no regression, 2 = at least one regression, 1 = user error (bad path, ambiguous
inputs), as for every phi3v-bench command.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.config import IDENTITY_FIELDS
from bench.drift import drift, unmatched_notes
from bench.layout import layout_label
from bench.results import MEMORY_FIELDS, BenchResult
from bench.stats import RULE_TEXT, STATISTIC, MemoryComparison, SampleComparison, compare_memory, compare_repeats
from bench.store import read_results
from phi3v_core.cli.vocabulary import plural
from phi3v_core.errors import DataError
from phi3v_core.io import json_safe

__all__ = ["EXIT_REGRESSION", "CompareOptions", "CompareReport", "ConfigComparison", "compare_results", "compare_paths"]

#: Process exit code when ``compare`` finds a regression (user errors exit 1).
EXIT_REGRESSION = 2


@dataclass(frozen=True)
class CompareOptions:
    """Thresholds of the comparison rule (see :mod:`bench.stats`)."""

    threshold_pct: float = 5.0
    alpha: float = 0.05
    min_repeats: int = 3


@dataclass
class ConfigComparison:
    """One matched configuration.

    Attributes:
        identity: The config identity both sides share.
        status: ``"<a status>→<b status>"`` when either side failed, else ``"ok"``.
        verdict: Overall: ``regressed`` if any part regressed, else ``improved`` if any improved, ``inconclusive``
            if throughput was, else ``same``; ``failed`` when both sides failed.
        throughput: The img/s comparison (``None`` unless both sides are ok).
        memory: Comparisons of every memory field both sides measured.
        layout: The measured layout and where it came from (:func:`bench.layout.layout_label`; B's source too when
            it differs).
        drift: What differs between A and B that changes what a number means (:func:`bench.drift.drift`).
        cell: A's :meth:`~bench.config.BenchConfig.cell_id`.
    """

    identity: dict[str, Any]
    status: str
    verdict: str
    throughput: SampleComparison | None = None
    memory: list[MemoryComparison] = field(default_factory=list)
    layout: str = ""
    drift: list[str] = field(default_factory=list)
    cell: str = ""

    @property
    def reason(self) -> str:
        """Why the verdict is what it is, in one sentence."""
        if self.throughput is None:
            return {"regressed": "the candidate failed where the baseline ran",
                    "improved": "the candidate ran where the baseline failed"}.get(self.verdict, "both sides failed")
        memory = [f"{c.field} {c.delta_pct:+.1f}% ({c.verdict})" for c in self.memory if c.verdict != "same"]
        return "; ".join([f"img/s: {self.throughput.reason}", *([f"memory: {', '.join(memory)}"] if memory else [])])

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "identity": self.identity,
            "cell": self.cell,
            "layout": self.layout,
            "drift": self.drift,
            "reason": self.reason,
            "status": self.status,
            "verdict": self.verdict,
            "throughput": self.throughput.to_dict() if self.throughput else None,
            "memory": [m.to_dict() for m in self.memory],
        }


@dataclass
class CompareReport:
    """All matched configurations plus those present on one side only."""

    matches: list[ConfigComparison]
    only_a: list[dict[str, Any]]
    only_b: list[dict[str, Any]]
    options: CompareOptions
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> int:
        """Number of matched configurations that regressed."""
        return sum(1 for m in self.matches if m.verdict == "regressed")

    @property
    def exit_code(self) -> int:
        """0 without regressions, :data:`EXIT_REGRESSION` otherwise."""
        return EXIT_REGRESSION if self.regressions else 0

    def varying_fields(self) -> list[str]:
        """Identity fields whose value differs between matched configurations (the columns worth showing)."""
        rows = [m.identity for m in self.matches] + self.only_a + self.only_b
        return [f for f in IDENTITY_FIELDS if len({repr(r[f]) for r in rows}) > 1] or ["method"]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (non-finite numbers become null)."""
        return json_safe(
            {
                "regressions": self.regressions,
                "exit_code": self.exit_code,
                "options": vars(self.options),
                "statistic": f"img/s = {STATISTIC}",
                "rule": RULE_TEXT.format(
                    threshold=self.options.threshold_pct, alpha=self.options.alpha, repeats=self.options.min_repeats
                ),
                "matches": [m.to_dict() for m in self.matches],
                "only_a": self.only_a,
                "only_b": self.only_b,
                "notes": self.notes,
            }
        )

    def to_json(self) -> str:
        """Return the report as one line of JSON."""
        return json.dumps(self.to_dict(), allow_nan=False)

    # ---- rendering ------------------------------------------------------------------------------------------
    def rows(self) -> tuple[list[str], list[list[str]]]:
        """Return (header, rows) of the human table, shared by the rich and markdown renderers."""
        keys = self.varying_fields()
        header = [*keys, "layout", "img/s A", "img/s B", "Δ img/s", "95% CI", "noise", "p", "repeats", "alloc Δ",
                  "reserved Δ", "verdict"]
        rows: list[list[str]] = []
        for m in self.matches:
            t = m.throughput
            mem = {c.field: c for c in m.memory}
            rows.append(
                [
                    *(str(m.identity[k]) for k in keys),
                    m.layout,
                    f"{t.a:.3f}" if t else "–",
                    f"{t.b:.3f}" if t else "–",
                    f"{t.delta_pct:+.1f}%" if t else m.status,
                    _ci_cell(t),
                    f"{t.noise_pct:.1f}%" if t else "",
                    f"{t.p_value:.2g}" if t and t.p_value is not None else "",
                    f"{t.repeats[0]}/{t.repeats[1]}" if t else "",
                    _mem_cell(mem.get("gpu_allocated_bytes") or mem.get("cpu_tensor_peak_bytes")),
                    _mem_cell(mem.get("gpu_reserved_bytes") or mem.get("cpu_rss_bytes")),
                    m.verdict,
                ]
            )
        for side, identities in (("only in A", self.only_a), ("only in B", self.only_b)):
            for ident in identities:
                rows.append([*(str(ident[k]) for k in keys), layout_label(ident), *[""] * 9, side])
        return header, rows

    def print_rich(self, console: Any, title: str) -> None:
        """Print drift first, then a table narrow enough for 80 columns (verdicts never cut), then the reasons.

        The terminal table keeps what decides: the varying identity fields, img/s A → B, the change with its 95 %
        CI, repeats, the memory change and the verdict; the layout, noise and p are in ``--markdown``/``--json``
        and in the reason lines.
        """
        from rich.table import Table

        for line in self.drift_lines():
            console.print(line, style="yellow", highlight=False)
        keys = self.varying_fields()
        table = Table(title=title, title_justify="left")
        # More than two varying fields share one folded column ("lora/sdpa/4"), so the numbers keep their width.
        shown = [keys] if len(keys) > 2 else [[k] for k in keys]
        for group in shown:
            table.add_column("/".join(group), overflow="fold", ratio=1)
        table.add_column("img/s A → B", no_wrap=True)
        table.add_column("Δ [95% CI]")
        table.add_column("reps", no_wrap=True)
        table.add_column("mem Δ", no_wrap=True)
        table.add_column("verdict", no_wrap=True, min_width=12)

        def ident(identity: dict[str, Any]) -> list[str]:
            return ["/".join(str(identity[k]) for k in group) for group in shown]

        styles = {"regressed": "red", "improved": "green", "inconclusive": "yellow"}
        for m in self.matches:
            t = m.throughput
            mem = {c.field: c for c in m.memory}
            alloc = _mem_cell(mem.get("gpu_allocated_bytes") or mem.get("cpu_tensor_peak_bytes"))
            table.add_row(
                *ident(m.identity),
                f"{t.a:.3f} → {t.b:.3f}" if t else "–",
                (f"{t.delta_pct:+.1f}% {_ci_cell(t)}".strip()) if t else m.status,
                f"{t.repeats[0]}/{t.repeats[1]}" if t else "",
                alloc,
                m.verdict,
                style=styles.get(m.verdict),
            )
        for side, identities in (("only in A", self.only_a), ("only in B", self.only_b)):
            for identity in identities:
                table.add_row(*ident(identity), "", "", "", "", side)
        console.print(table)
        console.print(f"img/s = {STATISTIC}", highlight=False)
        for m in self.matches:
            console.print(f"{m.cell}: {m.verdict}: {m.reason}", highlight=False)
        console.print(self.headline(), highlight=False)

    def to_markdown(self) -> str:
        """Return a markdown table plus a one-line verdict."""
        header, rows = self.rows()
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += ["", *self.explanations(), "", self.headline()]
        return "\n".join(lines) + "\n"

    def drift_lines(self) -> list[str]:
        """One line per matched configuration whose A and B differ in what a number means (shown first)."""
        return [f"DRIFT {m.cell}: {'; '.join(m.drift)} (a change may come from this, not from the code)"
                for m in self.matches if m.drift]

    def explanations(self) -> list[str]:
        """Drift first, then one line per matched configuration: its verdict and why."""
        return [*self.drift_lines(), *(f"{m.cell}: {m.verdict}: {m.reason}" for m in self.matches)]

    def headline(self) -> str:
        """Return a one-line summary."""
        o = self.options
        rule = RULE_TEXT.format(threshold=o.threshold_pct, alpha=o.alpha, repeats=o.min_repeats)
        line = f"{len(self.matches)} matched, {self.regressions} regressed (rule: {rule})"
        return "; ".join([line, *self.notes])


def _mem_cell(c: MemoryComparison | None) -> str:
    if c is None:
        return ""
    mark = {"regressed": " ▲", "improved": " ▼"}.get(c.verdict, "")
    return f"{c.delta_pct:+.1f}%{mark}"


def _ci_cell(t: SampleComparison | None) -> str:
    if t is None or t.ci_pct is None:
        return ""
    return f"[{t.ci_pct[0]:+.1f}, {t.ci_pct[1]:+.1f}]%"


def _index(pairs: Iterable[tuple[Path, BenchResult]], side: str) -> dict[tuple, tuple[Path, BenchResult]]:
    index: dict[tuple, tuple[Path, BenchResult]] = {}
    for path, result in pairs:
        key = (*result.config.identity().items(), ("hardware", result.environment.hardware))
        if key in index:
            raise DataError(
                f"side {side} has two results for {result.config.cell_id()}: {index[key][0]} and {path}; "
                "pass one release/hardware folder per side"
            )
        index[key] = (path, result)
    return index


def compare_results(
    a: Sequence[tuple[Path, BenchResult]] | Sequence[BenchResult],
    b: Sequence[tuple[Path, BenchResult]] | Sequence[BenchResult],
    options: CompareOptions | None = None,
) -> CompareReport:
    """Match baseline ``a`` and candidate ``b`` by config identity and compare each match.

    Args:
        a: Baseline results, bare or as ``(path, result)`` pairs.
        b: Candidate results, same forms.
        options: Thresholds (defaults: 5 %, alpha 0.05, 3 repeats).

    Raises:
        DataError: One side holds two results with the same identity (ambiguous).
    """
    options = options or CompareOptions()

    def pairs(items: Sequence[Any]) -> list[tuple[Path, BenchResult]]:
        return [item if isinstance(item, tuple) else (Path("<memory>"), item) for item in items]

    index_a, index_b = _index(pairs(a), "A"), _index(pairs(b), "B")
    matched = [k for k in index_a if k in index_b]
    if not matched:
        raise DataError(_nothing_matched(index_a, index_b))
    matches = [_compare_one(index_a[k][1], index_b[k][1], options) for k in matched]
    only_a = [dict(k) for k in index_a if k not in index_b]
    only_b = [dict(k) for k in index_b if k not in index_a]
    notes = _machine_notes([(index_a[k][1], index_b[k][1]) for k in matched]) + unmatched_notes(only_a, only_b)
    return CompareReport(matches, only_a, only_b, options, notes)


def _hardware_of(index: dict[tuple, tuple[Path, BenchResult]]) -> str:
    return ", ".join(sorted({dict(k)["hardware"] for k in index}))


def _nothing_matched(index_a: dict[tuple, Any], index_b: dict[tuple, Any]) -> str:
    """Why no configuration matched: different hardware, or different configurations."""
    configs_a = {k[:-1] for k in index_a}
    configs_b = {k[:-1] for k in index_b}
    if configs_a & configs_b:
        return (
            f"nothing matched: the same configurations were measured on different hardware (A: "
            f"{_hardware_of(index_a)}; B: {_hardware_of(index_b)}); compare results of one machine type"
        )
    return (
        f"nothing matched: none of the {plural(len(index_a), 'configuration')} of A appears in the {len(index_b)} of B "
        "(compare matches method, precision, batch, crops, GPUs and hardware); pass result folders of the same sweep"
    )


def _machine_notes(pairs: Sequence[tuple[BenchResult, BenchResult]]) -> list[str]:
    """One note per machine property that differs between matched results (same GPU model, other machine)."""
    differing: dict[str, tuple[Any, Any]] = {}
    for a, b in pairs:
        for name in ("driver_version", "cuda_version", "cpu", "platform"):
            va, vb = getattr(a.environment, name), getattr(b.environment, name)
            if va and vb and va != vb:
                differing.setdefault(name, (va, vb))
    if not differing:
        return []
    shown = ", ".join(f"{name.replace('_', ' ')} {va} vs {vb}" for name, (va, vb) in differing.items())
    return [f"A and B were measured on different machines ({shown}): differences may come from the machine"]


def _compare_one(a: BenchResult, b: BenchResult, options: CompareOptions) -> ConfigComparison:
    identity = a.config.identity()
    layout = layout_label(a.config) + (f" (B: {b.config.layout})" if b.config.layout != a.config.layout else "")
    extra = {"drift": drift(a, b), "cell": a.config.cell_id()}
    if a.status != "ok" or b.status != "ok":
        status = f"{a.status}→{b.status}"
        if a.status == "ok":
            verdict = "regressed"
        elif b.status == "ok":
            verdict = "improved"
        else:
            verdict = "failed"
        return ConfigComparison(identity, status, verdict, layout=layout, **extra)

    throughput = compare_repeats(
        a.metrics.repeat_throughputs(),
        b.metrics.repeat_throughputs(),
        higher_is_better=True,
        threshold_pct=options.threshold_pct,
        alpha=options.alpha,
        min_repeats=options.min_repeats,
    )
    memory = []
    for name in MEMORY_FIELDS:
        ma, mb = a.metrics.peak_memory(name), b.metrics.peak_memory(name)
        if ma is not None and mb is not None:
            memory.append(compare_memory(name, ma, mb))
    verdicts = [throughput.verdict, *(m.verdict for m in memory)]
    for candidate in ("regressed", "improved", "inconclusive"):
        if candidate in verdicts:
            verdict = candidate
            break
    else:
        verdict = "same"
    return ConfigComparison(identity, "ok", verdict, throughput, memory, layout, **extra)


def compare_paths(a: Sequence[str | Path], b: Sequence[str | Path], options: CompareOptions | None = None) -> CompareReport:
    """Load results under ``a`` and ``b`` (files or folders) and compare them.

    Raises:
        DataError: A side has no result files, or a file is invalid.
    """
    sides = []
    for name, paths in (("A", a), ("B", b)):
        loaded = read_results(paths)
        if not loaded:
            raise DataError(f"side {name} ({', '.join(map(str, paths))}) holds no result .json files")
        sides.append(loaded)
    return compare_results(sides[0], sides[1], options)
