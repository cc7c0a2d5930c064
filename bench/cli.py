"""phi3v-bench: measure, sweep, compare and report Phi-3.5-vision fine-tuning throughput and memory.

Examples:
    phi3v-bench run --method lora --attn sdpa --model tiny --steps 10 --repeats 3
    phi3v-bench matrix --preset quick
    phi3v-bench matrix --preset seed-a100 --release v0.2.0
    phi3v-bench matrix --grid method=lora,qlora attn=sdpa,eager --set model=tiny steps=5 repeats=3
    phi3v-bench compare results/v0.1.0/1xH100-80GB-HBM3 results/v0.2.0/1xH100-80GB-HBM3 --markdown
    phi3v-bench report results/v0.2.0 --out report/

Exit codes: 0 success; 1 user error (one line on stderr, PHI3V_DEBUG=1 shows the traceback);
2 ``compare`` found a regression.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.config import ATTENTIONS, METHODS, PRECISIONS, SEQ_PROFILES, BenchConfig, default_release
from phi3v_core.cli.common import CliParser, handle_errors
from phi3v_core.errors import ConfigError

__all__ = ["build_parser", "config_from_args", "main"]

GIB = 1 << 30


#: The tiny model on a 2-core CPU: the DocVQA profile scaled down (1 crop instead of 16: 379 tokens) and a short protocol, so
#: that `phi3v-bench run --method lora` finishes in well under a minute. Explicit flags always win.
TINY_DEFAULTS: dict[str, Any] = {"num_crops": 1, "batch_size": 2, "micro_batch": 2, "steps": 3, "warmup": 1, "repeats": 3}


def _default_precision() -> str:
    """bf16 where the GPU computes it natively (compute capability >= 8.0), otherwise fp32."""
    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] >= 8:
        return "bf16"
    return "fp32"


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchConfig(release="-")  # defaults shown in --help; release has its own default below
    p.add_argument("--method", default=d.method, metavar="{" + ",".join(METHODS) + "}",
                   help="fine-tuning method (default: %(default)s)")
    p.add_argument("--attn", default=d.attn, metavar="{" + ",".join(ATTENTIONS) + "}",
                   help="attention kernel (default: %(default)s)")
    p.add_argument("--precision", default=None, metavar="{" + ",".join(PRECISIONS) + "}",
                   help="bf16/fp16 mixed precision or fp32 (default: bf16 on GPUs with compute capability >= 8.0, "
                        "else fp32)")
    p.add_argument("--model", default=d.model, help="tiny, phi-3.5-vision, phi-3-vision or a checkpoint folder "
                   "(default: %(default)s)")
    p.add_argument("--num-crops", type=int, default=None,
                   help=f"HD crops per image, 1..16 (default: {d.num_crops}; tiny model: {TINY_DEFAULTS['num_crops']})")
    p.add_argument("--seq-profile", default=d.seq_profile, metavar="{" + ",".join(SEQ_PROFILES) + "}",
                   help="synthetic sample shape (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"global effective batch per optimizer step (default: {d.batch_size}; tiny: {TINY_DEFAULTS['batch_size']})")
    p.add_argument("--micro-batch", type=int, default=None,
                   help=f"samples per GPU per forward (default: {d.micro_batch}; tiny: {TINY_DEFAULTS['micro_batch']})")
    p.add_argument("--gpus", type=int, default=d.gpus, help="GPUs per node (default: %(default)s)")
    p.add_argument("--nodes", type=int, default=d.nodes, help="nodes (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"timed optimizer steps per repeat (default: {d.steps}; tiny: {TINY_DEFAULTS['steps']})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed steps before them (default: {d.warmup}; tiny: {TINY_DEFAULTS['warmup']})")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"fresh processes; compare needs >= 3 (default: {d.repeats}; tiny: {TINY_DEFAULTS['repeats']})")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=d.gradient_checkpointing,
                   help="recompute activations in backward (default: on, as the recipe)")
    _add_output_arguments(p)


def _add_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--release", default=None, help=f"release folder name (default: {default_release()})")
    p.add_argument("--out", default="results", help="results root folder (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """Return the ``phi3v-bench`` argument parser."""
    parser = CliParser(prog="phi3v-bench", description=__doc__.split("\n\n")[0],
                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,matrix,compare,report}")

    run = sub.add_parser(
        "run", help="measure one configuration", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure one configuration and write results/<release>/<hardware>/<cell>.json.",
        epilog="examples:\n  phi3v-bench run --method lora --model tiny --steps 10\n"
               "  phi3v-bench run --method full --attn flash_attention_2 --model phi-3.5-vision --gpus 8 --batch-size 64",
    )
    _add_run_arguments(run)
    run.add_argument("--json", action="store_true", help="print the result as one JSON line")

    matrix = sub.add_parser(
        "matrix", help="sweep many configurations (resumable)", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a preset and/or grid of configurations. OOM or crashing cells become result rows and the sweep "
                    "goes on; re-running skips cells that already have an ok/oom result (error cells are retried).",
        epilog="presets: seed-a100 (the seed's 10 A100 rows), seed-v100 (its 5 V100 rows), quick (tiny model, 8 cells)\n"
               "examples:\n  phi3v-bench matrix --preset quick\n"
               "  phi3v-bench matrix --preset seed-a100 --set steps=20 repeats=3\n"
               "  phi3v-bench matrix --grid method=lora,qlora attn=sdpa,eager --set model=tiny --dry-run",
    )
    matrix.add_argument("--preset", help="seed-a100, seed-v100 or quick")
    matrix.add_argument("--grid", nargs="+", action="extend", default=[], metavar="FIELD=V1,V2",
                        help="sweep a config field over values (cartesian product; replaces the preset's value)")
    matrix.add_argument("--set", nargs="+", action="extend", default=[], metavar="FIELD=VALUE", dest="assignments",
                        help="fix a config field for every cell (e.g. steps=5 model=tiny)")
    _add_output_arguments(matrix)
    matrix.add_argument("--force", action="store_true", help="re-run cells that already have a finished result")
    matrix.add_argument("--dry-run", action="store_true", help="list the cells and where they would be written")
    matrix.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    matrix.add_argument("--json", action="store_true", help="print the sweep summary as one JSON line")

    compare = sub.add_parser(
        "compare", help="compare two result sets (exit 2 on regression)", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Match results of A (baseline) and B (candidate) by configuration and report img/s and memory changes. "
                    "A throughput change is called when both sides have >= --min-repeats repeats, |Δ| > max(--threshold, "
                    "noise) and Mann-Whitney p < --alpha. Allocated memory must match within max(1%%, 1 MiB); reserved/NVML "
                    "within max(5%%, 256 MiB).",
        epilog="exit codes: 0 no regression, 2 regression, 1 user error\n"
               "example:\n  phi3v-bench compare results/v0.1.0/1xH100 results/v0.2.0/1xH100 --markdown",
    )
    compare.add_argument("a", help="baseline: a result .json or a folder of them")
    compare.add_argument("b", help="candidate: a result .json or a folder of them")
    compare.add_argument("--threshold", type=float, default=5.0, help="smallest img/s change in %% to call (default: 5)")
    compare.add_argument("--alpha", type=float, default=0.05, help="Mann-Whitney significance level (default: 0.05)")
    compare.add_argument("--min-repeats", type=int, default=3, help="repeats per side needed to call a change (default: 3)")
    fmt = compare.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="print a markdown table")
    fmt.add_argument("--json", action="store_true", help="print the comparison as one JSON line")

    report = sub.add_parser(
        "report", help="markdown tables + PNG plots", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write report.md (tables in the seed's layout, beside its published rows) and PNG plots "
                    "(img/s by method x attention, memory by method, scaling over nodes).",
        epilog="example:\n  phi3v-bench report results/v0.2.0 --out report/",
    )
    report.add_argument("paths", nargs="+", help="result .json files or folders")
    report.add_argument("--out", default="report", help="output folder (default: %(default)s)")
    report.add_argument("--reference", default=None, help="folder with the seed tables (default: results/reference)")
    report.add_argument("--no-reference", action="store_true", help="leave the seed's published rows out")
    report.add_argument("--json", action="store_true", help="print the written paths as one JSON line")
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Map parsed ``run`` flags onto a :class:`BenchConfig` (the one place flags become a config)."""
    names = {f.name for f in dataclasses.fields(BenchConfig)}
    values = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if values.get("model", "tiny") == "tiny":
        for name, value in TINY_DEFAULTS.items():
            values.setdefault(name, value)
    if "precision" not in values:
        values["precision"] = _default_precision()
    return BenchConfig(**values)


def _console() -> Any:
    from rich.console import Console

    return Console()


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, allow_nan=False))


def _cmd_run(args: argparse.Namespace) -> int:
    from bench import runner
    from bench.results import capture_environment, save_result

    cfg = config_from_args(args).validate()
    if args.json:
        result = runner.run_config(cfg)
        path = save_result(result)
        _print_json({"path": str(path), **result.to_dict()})
        return 0 if result.status == "ok" else 1

    from rich.panel import Panel
    from rich.table import Table

    console = _console()
    env = capture_environment()
    hardware = ", ".join(f"{g.name} (cc {g.compute_capability})" for g in env.gpus) or f"CPU: {env.cpu} ({env.cpu_count} threads)"
    card = (
        f"[bold]{cfg.method}[/] · attn {cfg.attn} · {cfg.precision} · model {cfg.model} · {cfg.num_crops} crops · "
        f"profile {cfg.seq_profile}\n"
        f"batch {cfg.batch_size} = {cfg.micro_batch} micro × {cfg.world_size} ranks ({cfg.nodes} node(s) × {cfg.gpus}) × "
        f"{cfg.grad_accum} accumulation · {cfg.warmup} warmup + {cfg.steps} timed steps × {cfg.repeats} repeats\n"
        f"{hardware} · torch {env.packages.get('torch')} · transformers {env.packages.get('transformers')} · "
        f"git {(env.git_sha or '?')[:10]}{'+dirty' if env.git_dirty else ''}"
    )
    console.print(Panel(card, title=f"phi3v-bench run · {cfg.cell_id()}", expand=False))
    with console.status(f"measuring {cfg.repeats} repeat(s) in fresh processes…"):
        result = runner.run_config(cfg)
    path = save_result(result)

    s = result.summary
    table = Table(title=f"{cfg.cell_id()} [{result.status}]")
    columns = ["img/s", "img/s/GPU", "tokens/s", "step median s", "p90 s", "stdev s", "MFU"]
    gpu = s.peak_gpu_allocated_bytes is not None
    columns += ["alloc GiB", "reserved GiB", "NVML GiB"] if gpu else ["RSS GiB", "tensor peak GiB"]
    for col in columns:
        table.add_column(col, justify="right")

    def num(v: float | None, spec: str) -> str:
        return format(v, spec) if v is not None else "–"

    def gib(v: int | None) -> str:
        return num(v / GIB if v is not None else None, ".2f")

    row = [
        num(s.img_per_s, ".3f"), num(s.img_per_s_per_gpu, ".3f"), num(s.tokens_per_s, ".0f"),
        num(s.step_time_median_s, ".4f"), num(s.step_time_p90_s, ".4f"), num(s.step_time_stdev_s, ".4f"),
        num(s.mfu, ".1%"),
    ]
    row += (
        [gib(s.peak_gpu_allocated_bytes), gib(s.peak_gpu_reserved_bytes), gib(s.peak_nvml_process_bytes)]
        if gpu
        else [gib(s.peak_cpu_rss_bytes), gib(s.peak_cpu_tensor_peak_bytes)]
    )
    table.add_row(*row)
    console.print(table)
    if result.message:
        console.print(f"[red]{result.status}[/]: {result.message}")
    console.print(f"wrote {path}")
    return 0 if result.status == "ok" else 1


def _cmd_matrix(args: argparse.Namespace) -> int:
    from bench.matrix import build_cells, parse_assignments, parse_grid, run_matrix
    from bench.results import capture_environment, result_path

    if not args.preset and not args.grid:
        raise ConfigError("pass --preset (seed-a100, seed-v100, quick) and/or --grid FIELD=V1,V2")
    problems: list[str] = []
    overrides: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    for parse, target, items in ((parse_assignments, overrides, args.assignments), (parse_grid, grid, args.grid)):
        try:
            target.update(parse(items))
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("; ".join(problems))
    overrides["out"] = args.out
    if args.release is not None:
        overrides["release"] = args.release
    cells = build_cells(args.preset, grid, overrides)
    env = capture_environment()

    if args.dry_run:
        listing = [{"cell": c.cell_id(), "path": str(result_path(c.out, c.release, env.hardware, c))} for c in cells]
        if args.json:
            _print_json({"cells": listing})
        else:
            for item in listing:
                print(f"{item['cell']}  ->  {item['path']}")
            print(f"{len(cells)} cells (dry run; nothing was run)")
        return 0

    summary = run_matrix(cells, environment=env, progress=not args.no_progress and not args.json)
    if args.json:
        _print_json(summary.to_dict())
        return 0
    from rich.table import Table

    table = Table(title=f"sweep: {len(cells)} cells")
    for col in ("cell", "status", "img/s", "peak GiB", "message"):
        table.add_column(col)
    for o in summary.outcomes:
        s = o.result.summary if o.result else None
        peak = (s.peak_gpu_reserved_bytes or s.peak_cpu_rss_bytes) if s else None
        table.add_row(o.config.cell_id(), o.status, f"{s.img_per_s:.3f}" if s and s.img_per_s else "",
                      f"{peak / GIB:.2f}" if peak else "", o.message[:80])
    console = _console()
    console.print(table)
    console.print(", ".join(f"{k} {v}" for k, v in summary.counts().items() if v))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from bench.compare import CompareOptions, compare_paths

    problems = []
    if args.threshold < 0:
        problems.append(f"--threshold must be >= 0, got {args.threshold}")
    if not 0 < args.alpha < 1:
        problems.append(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.min_repeats < 1:
        problems.append(f"--min-repeats must be >= 1, got {args.min_repeats}")
    if problems:
        raise ConfigError("; ".join(problems))
    report = compare_paths([args.a], [args.b], CompareOptions(args.threshold, args.alpha, args.min_repeats))
    if args.json:
        print(report.to_json())
    elif args.markdown:
        sys.stdout.write(report.to_markdown())
    else:
        from rich.table import Table

        header, rows = report.rows()
        table = Table(title=f"compare {args.a} → {args.b}")
        for col in header:
            table.add_column(col)
        styles = {"regressed": "red", "improved": "green", "inconclusive": "yellow"}
        for row in rows:
            table.add_row(*row, style=styles.get(row[-1]))
        console = _console()
        console.print(table)
        console.print(report.headline())
    return report.exit_code


def _cmd_report(args: argparse.Namespace) -> int:
    from bench.report import build_report, write_report
    from bench.results import read_results

    results = read_results(args.paths)
    rendered = build_report(results, reference_dir=args.reference, with_reference=not args.no_reference)
    paths = write_report(rendered, Path(args.out))
    if args.json:
        _print_json({"markdown": str(paths[0]), "images": [str(p) for p in paths[1:]], "results": len(results)})
    else:
        _console().print(f"wrote {paths[0]} and {len(paths) - 1} plots from {len(results)} results", highlight=False)
    return 0


_COMMANDS = {"run": _cmd_run, "matrix": _cmd_matrix, "compare": _cmd_compare, "report": _cmd_report}


@handle_errors
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``phi3v-bench`` console script.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The process exit code (see the module docstring).
    """
    args = build_parser().parse_args(argv)
    return _COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
