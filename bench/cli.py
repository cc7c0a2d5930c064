"""phi3v-bench: measure, sweep, compare and report Phi-3.5-vision fine-tuning throughput and memory.

Examples:
    phi3v-bench run --method lora --attn sdpa --model tiny --steps 10 --repeats 3
    phi3v-bench matrix --preset quick
    phi3v-bench matrix --preset seed-a100 --release v0.2.0
    phi3v-bench matrix --grid method=lora,qlora attn=sdpa,eager --set model=tiny steps=5 repeats=3
    phi3v-bench compare results/v0.1.0/1xH100-80GB-HBM3 results/v0.2.0/1xH100-80GB-HBM3 --markdown
    phi3v-bench report results/ --out report/
    phi3v-bench selfcheck --json

Safety: ``run`` and ``matrix`` check every flag, the model folder and that ``--out`` is writable before measuring;
they hold ``<out>/.phi3v.lock`` while they measure (a second sweep into the same ``--out`` is refused, naming the
holder); when the result cannot be written, the measured numbers are still printed.

Exit codes: 0 success; 1 user error (one line on stderr, PHI3V_DEBUG=1 shows the traceback);
2 ``compare`` found a regression or a ``selfcheck`` check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.config import (
    FLOPS_MODES,
    SEQ_PROFILES,
    TINY_DEFAULTS,
    BenchConfig,
    DeviceDescription,
    choose_defaults,
    default_release,
)
from bench.layout import LAYOUT_FIELDS, LAYOUTS, resolve_layout
from bench.lever_args import add_lever_arguments
from bench.preflight import (
    LIMITS,
    limit_problems,
    one_writer,
    preflight_problems,
    refuse_unusable_gpu,
    unsaved_result_error,
)
from phi3v_core.cli.common import (
    CliParser,
    bounded_float,
    bounded_int,
    handle_errors,
    keep_working_without_stdout,
    strict_json,
)
from phi3v_core.constants import ATTN_NAMES, OFFLOAD_NAMES, OPTIM_NAMES, PRECISION_NAMES
from phi3v_core.errors import ConfigError, raise_all
from phi3v_core.fs import StorageError, writable_problem
from phi3v_core.methods import METHOD_NAMES

__all__ = ["LIMITS", "build_parser", "config_from_args", "main", "preflight_problems"]

GIB = 1 << 30

#: The longest a repeat may be allowed to run (``--timeout``): a week.
MAX_TIMEOUT_S = 7 * 24 * 3600.0

def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchConfig(release="-")  # defaults shown in --help; release has its own default below
    p.add_argument("--method", default=d.method, metavar="{" + ",".join(METHOD_NAMES) + "}",
                   help="fine-tuning method (default: %(default)s)")
    p.add_argument("--attn", "--attention", dest="attn", default=None, metavar="{" + ",".join(ATTN_NAMES) + "}",
                   help="attention kernel (default: flash_attention_2 on a GPU with compute capability >= 8.0 when "
                        "flash-attn imports, else sdpa)")
    p.add_argument("--precision", default=None, metavar="{" + ",".join(PRECISION_NAMES) + "}",
                   help="bf16/fp16 mixed precision or fp32 (default: bf16 on GPUs with compute capability >= 8.0, "
                        "fp16 on older GPUs, fp32 on CPU)")
    p.add_argument("--model", default=None, help="tiny, phi-3.5-vision, phi-3-vision or a checkpoint folder "
                   "(default: phi-3.5-vision with random weights on a GPU, tiny on CPU)")
    p.add_argument("--num-crops", type=int, default=None,
                   help=f"HD crops per image, 1..16 (default: {d.num_crops}; tiny model: {TINY_DEFAULTS['num_crops']})")
    p.add_argument("--seq-profile", default=None, metavar="{" + ",".join(SEQ_PROFILES) + "}",
                   help=f"synthetic sample shape (default: {d.seq_profile})")
    p.add_argument("--global-batch", "--batch-size", dest="global_batch", type=int, default=None,
                   help=f"global effective batch per optimizer step over all GPUs (default: {d.global_batch}; "
                        f"tiny: {TINY_DEFAULTS['global_batch']}); --batch-size is its old name")
    p.add_argument("--micro-batch", type=int, default=None,
                   help=f"samples per GPU per forward (default: the layout's; tiny: {TINY_DEFAULTS['micro_batch']})")
    p.add_argument("--gpus", type=int, default=d.gpus, help="GPUs per node (default: %(default)s)")
    p.add_argument("--nodes", type=int, default=d.nodes, help="nodes (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"timed optimizer steps per repeat (default: {d.steps}; tiny: {TINY_DEFAULTS['steps']})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed steps before them (default: {d.warmup}; tiny: {TINY_DEFAULTS['warmup']})")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"fresh processes; compare needs >= 3 (default: {d.repeats}; tiny: {TINY_DEFAULTS['repeats']})")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="micro-batch, checkpointing, optimizer and offload: plan (phi3v-plan's for this card and "
                        "method; the default on a GPU) or recipe (the seed's: checkpointing on, micro-batch 1, AdamW; "
                        "the default on CPU); the flags below override single fields")
    add_lever_arguments(p)  # --gradient_checkpointing per tower, --freeze_llm, tower rates, --kernels, --compile
    p.add_argument("--optim", choices=OPTIM_NAMES, default=None, help="optimizer (default: the layout's)")
    p.add_argument("--offload", choices=OFFLOAD_NAMES, default=None, help="DeepSpeed offload (default: the layout's)")
    p.add_argument("--learning-rate", type=bounded_float(0, 1, low_open=True), default=None,
                   help="peak learning rate (default: the recipe's for the profile's task and the method); decides "
                        "how many weights a step changes, which the run reports")
    p.add_argument("--flops", choices=FLOPS_MODES, default=d.flops,
                   help="how MFU's FLOPs are counted: analytic (from the shapes) or trace (fake-tensor replay, "
                        "minutes for the full-size model; a check of the analytic count) (default: %(default)s)")
    _add_output_arguments(p)


def _add_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--release", default=None, help=f"release folder name (default: {default_release()})")
    p.add_argument("--out", default="results", help="results root folder (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """Return the ``phi3v-bench`` argument parser."""
    parser = CliParser(prog="phi3v-bench", description=__doc__.split("\n\n")[0],
                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,matrix,compare,report,selfcheck}")

    _add_run_command(sub)
    _add_matrix_command(sub)
    _add_compare_command(sub)
    _add_report_command(sub)
    _add_selfcheck_command(sub)
    return parser


def _add_run_command(sub: Any) -> None:
    """``run``: measure one configuration."""
    run = sub.add_parser(
        "run", help="measure one configuration", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure one configuration and write results/<release>/<hardware>/<cell>.json.",
        epilog="examples:\n  phi3v-bench run --method lora --model tiny --steps 10\n"
               "  phi3v-bench run --method full --attn flash_attention_2 --model phi-3.5-vision --gpus 8 --batch-size 64",
    )
    _add_run_arguments(run)
    run.add_argument("--force", action="store_true",
                     help="replace a stored result measured on other hardware or at another commit")
    run.add_argument("--json", action="store_true", help="print the result as one JSON line")
    # Multi-node on a real cluster (one phi3v-bench per node; under srun these come from SLURM's variables).
    run.add_argument("--node-rank", type=bounded_int(0, LIMITS["nodes"] - 1), default=None, help="this node's index 0..nodes-1 (node 0 writes the result)")
    run.add_argument("--master-addr", default=None, help="host name or address of node 0, reachable from every node")
    run.add_argument("--master-port", type=bounded_int(1, 65535), default=None, help="rendezvous port on node 0 (default: 29500)")
    run.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                     help="kill a repeat that runs longer and record status timeout (default: 3600)")


def _add_matrix_command(sub: Any) -> None:
    """``matrix``: sweep many configurations."""
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


def _add_compare_command(sub: Any) -> None:
    """``compare``: two result sets, exit 2 on a regression."""
    compare = sub.add_parser(
        "compare", help="compare two result sets (exit 2 on regression)", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Match results of A (baseline) and B (candidate) by configuration and report img/s and memory changes. "
                    "Throughput is judged on per-repeat medians (one value per fresh process): a change is called when "
                    "both sides have >= --min-repeats repeats, |Δ| > max(--threshold, noise) and Welch's t-test "
                    "p < --alpha. Allocated memory must match within max(1%%, 1 MiB); reserved/NVML "
                    "within max(5%%, 256 MiB).",
        epilog="exit codes: 0 no regression, 2 regression, 1 user error\n"
               "example:\n  phi3v-bench compare results/v0.1.0/1xH100 results/v0.2.0/1xH100 --markdown",
    )
    compare.add_argument("a", help="baseline: a result .json or a folder of them")
    compare.add_argument("b", help="candidate: a result .json or a folder of them")
    compare.add_argument("--threshold", type=bounded_float(), default=5.0, help="smallest img/s change in %% to call (default: 5)")
    compare.add_argument("--alpha", type=bounded_float(), default=0.05, help="significance level of the test on per-repeat medians (default: 0.05)")
    compare.add_argument("--min-repeats", type=int, default=3, help="repeats per side needed to call a change (default: 3)")
    fmt = compare.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="print a markdown table")
    fmt.add_argument("--json", action="store_true", help="print the comparison as one JSON line")


def _add_report_command(sub: Any) -> None:
    """``report``: markdown tables and PNG plots."""
    report = sub.add_parser(
        "report", help="markdown tables + PNG plots", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write report.md (tables in the seed's layout, beside its published rows) and PNG plots "
                    "(img/s by method x attention, memory by method, scaling over nodes).",
        epilog="example:\n  phi3v-bench report results/v0.2.0 --out report/",
    )
    report.add_argument("paths", nargs="+", help="result .json files or folders")
    report.add_argument("--out", default="report", help="output folder (default: %(default)s)")
    report.add_argument("--reference", default=None, help="folder with the seed tables as CSV (default: the packaged copy of results/reference)")
    report.add_argument("--no-reference", action="store_true", help="leave the seed's published rows out")
    report.add_argument("--json", action="store_true", help="print the written paths as one JSON line")


def _add_selfcheck_command(sub: Any) -> None:
    """``selfcheck``: every method trains, memory and MFU as predicted."""
    selfcheck = sub.add_parser(
        "selfcheck", help="got a GPU? run this first: every method trains, memory and MFU as predicted",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train every method x attention kernel (sdpa, and flash_attention_2 when installed) for a few "
                    "steps on one fixed batch — on CUDA phi-3.5-vision in bf16 (fp16 below compute capability 8.0), "
                    "depth-reduced where phi3v-plan says the full model does not fit one card, plus 2-process checks "
                    "with two or more GPUs; on CPU the tiny model — and check that the loss is finite and falls, that "
                    "peak memory matches phi3v-plan's prediction, and report MFU. Prints the expected duration first.",
        epilog="exit codes: 0 every check passed, 2 a check failed, 1 user error\n"
               "example:\n  phi3v-bench selfcheck --json > selfcheck.json",
    )
    selfcheck.add_argument("--steps", type=int, default=3, help="checked steps after one warmup step (default: 3)")
    selfcheck.add_argument("--json", action="store_true", help="print one JSON object with a checks list")


def config_from_args(
    args: argparse.Namespace, device: DeviceDescription | None = None
) -> tuple[BenchConfig, list[str]]:
    """Map parsed ``run`` flags onto a :class:`BenchConfig` (the one place flags become a config).

    Flags the user did not pass take the machine's defaults (:func:`bench.config.choose_defaults`).

    Returns:
        The config and the reasons for each default chosen (shown on the config card).
    """
    names = {f.name for f in dataclasses.fields(BenchConfig)} - {"layout"}
    values = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    given = set(values)
    device = device or DeviceDescription.detect()
    defaults, reasons = choose_defaults(device, values.get("model"))
    for name, value in defaults.items():
        values.setdefault(name, value)
    # the layout fills the layout fields neither given nor set by the machine's defaults (the tiny protocol's)
    values, layout_reasons = resolve_layout(
        BenchConfig(**values).to_dict(), set(values), device.gpu_name is not None, getattr(args, "layout", None)
    )
    reasons += layout_reasons
    explicit = sorted(name for name in given if name in (*defaults, *LAYOUT_FIELDS) and name != "model")
    if explicit:
        reasons.append("given on the command line: " + ", ".join(f"{n} {values[n]}" for n in explicit))
    return BenchConfig(**values), reasons


def _console() -> Any:
    from rich.console import Console

    return Console()


def _print_json(obj: Any) -> None:
    # Strict JSON: a NaN in a measurement becomes null instead of making the line unparseable.
    print(strict_json(obj))


def _command_line(args: argparse.Namespace) -> str:
    return " ".join(["phi3v-bench", *(shlex.quote(a) for a in getattr(args, "argv", []) or [args.command])])[:300]


def _measure(cfg: BenchConfig, cluster: Any, timeout: float | None) -> Any:
    """Run ``cfg`` on this machine or as one node of a cluster."""
    from bench import runner

    options: dict[str, Any] = {}  # only what was given: run_config's defaults stay in one place
    if timeout is not None:
        options["timeout_s"] = timeout
    if cluster is not None:
        options["cluster"] = cluster
    return runner.run_config(cfg, **options)


def _cmd_run(args: argparse.Namespace) -> int:
    from bench import runner
    from bench.results import capture_environment
    from bench.store import replacement_problem, result_path

    refuse_unusable_gpu()  # before capture_environment, which imports torch (seconds)
    env = capture_environment()
    cfg, reasons = config_from_args(args, DeviceDescription.detect(env))
    problems = (cfg.problems() or cfg.training_problems()) + limit_problems([cfg])
    if args.timeout is not None and not (math.isfinite(args.timeout) and 0 < args.timeout <= MAX_TIMEOUT_S):
        problems.append(f"--timeout {args.timeout:g} must be > 0 seconds, finite and at most {MAX_TIMEOUT_S:g}")
    cluster = runner.ClusterLaunch.from_args(cfg.nodes, args.node_rank, args.master_addr, args.master_port)
    main_node = cluster is None or cluster.is_main
    if not problems:
        # Refuse before measuring, not after: a run can take hours.
        problems += preflight_problems([cfg], env.hardware, writes=main_node)
        problems += cluster.problems(cfg) if cluster is not None else []
    raise_all(problems)
    target = result_path(cfg.out, cfg.release, env.hardware, cfg)
    with one_writer(cfg.out, _command_line(args), enabled=main_node):
        problem = replacement_problem(target, env) if main_node else None
        if problem and not args.force:
            raise ConfigError(f"{problem}; pass --force to replace it, or --release/--out to keep both")
        return _run_and_save(args, cfg, env, reasons, cluster)


def _print_summary(console: Any, cfg: BenchConfig, result: Any) -> None:
    """The measured numbers of one result, one metric per line (wide enough for any terminal)."""
    from rich.table import Table

    s = result.summary
    gpu = s.peak_gpu_allocated_bytes is not None

    def num(v: float | None, spec: str) -> str:
        return format(v, spec) if v is not None else "–"

    def gib(v: int | None) -> str:
        return num(v / GIB if v is not None else None, ".2f")

    columns = ["img/s", "img/s/GPU", "tokens/s", "step median s", "p90 s", "stdev s", "MFU", "HFU (with recompute)"]
    row = [
        num(s.img_per_s, ".3f"), num(s.img_per_s_per_gpu, ".3f"), num(s.tokens_per_s, ".0f"),
        num(s.step_time_median_s, ".4f"), num(s.step_time_p90_s, ".4f"), num(s.step_time_stdev_s, ".4f"),
        num(s.mfu, ".1%"), num(s.hardware_mfu, ".1%"),
    ]
    first = next((r for r in result.metrics.repeats if r.weight_change), None)
    if first is not None:
        lr = f", lr {first.learning_rate:g}" if first.learning_rate else ""
        columns.append(f"weights changed ({first.weight_change['steps']} steps{lr})")
    else:
        columns.append("weights changed")
    row.append(num(s.changed_weights_fraction, ".1%"))
    if gpu:
        columns += ["peak allocated GiB", "peak reserved GiB", "peak NVML GiB (sampled)"]
        row += [gib(s.peak_gpu_allocated_bytes), gib(s.peak_gpu_reserved_bytes), gib(s.peak_nvml_process_bytes)]
    else:
        columns += ["peak RSS GiB", "peak tensor GiB"]
        row += [gib(s.peak_cpu_rss_bytes), gib(s.peak_cpu_tensor_peak_bytes)]
    # One metric per line: wide enough for any terminal.
    table = Table(title=f"{cfg.cell_id()} [{result.status}]")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in zip(columns, row):
        table.add_row(name, value)
    console.print(table)


def _run_and_save(args: argparse.Namespace, cfg: BenchConfig, env: Any, reasons: list[str], cluster: Any) -> int:
    """Measure, save and print; a failed save still prints every number (and keeps a copy where it can)."""
    from bench.store import save_result

    main_node = cluster is None or cluster.is_main

    def save(result: Any) -> tuple[Path | None, str | None]:
        try:
            return save_result(result, force=args.force), None
        except OSError as exc:
            return None, unsaved_result_error(result, exc)

    if args.json:
        result = _measure(cfg, cluster, args.timeout)
        if not main_node:
            _print_json({"path": None, **result.to_dict()})
            return 0 if result.status == "ok" else 1
        path, write_error = save(result)
        _print_json({"path": str(path) if path else None, "defaults": reasons, **result.to_dict(),
                     **({"write_error": write_error} if write_error else {})})
        if write_error:
            raise StorageError(write_error)
        return 0 if result.status == "ok" else 1

    from rich.panel import Panel

    console = _console()
    hardware = ", ".join(f"{g.name} (cc {g.compute_capability})" for g in env.gpus) or f"CPU: {env.cpu} ({env.cpu_count} threads)"
    card = (
        f"[bold]{cfg.method}[/] · attn {cfg.attn} · {cfg.precision} · model {cfg.model} · {cfg.num_crops} crops · "
        f"profile {cfg.seq_profile}\n"
        f"global batch {cfg.global_batch} = {cfg.micro_batch} micro × {cfg.world_size} ranks ({cfg.nodes} node(s) × {cfg.gpus}) × "
        f"{cfg.grad_accum} accumulation · {cfg.warmup} warmup + {cfg.steps} timed steps × {cfg.repeats} repeats\n"
        f"{hardware} · torch {env.packages.get('torch')} · transformers {env.packages.get('transformers')} · "
        f"git {(env.git_sha or '?')[:10]}{'+dirty' if env.git_dirty else ''}\n"
        + "\n".join(f"[dim]default[/] {reason}" for reason in reasons)
    )
    console.print(Panel(card, title=f"phi3v-bench run · {cfg.cell_id()}", expand=False))
    with console.status(f"measuring {cfg.repeats} repeat(s) in fresh processes…"):
        result = _measure(cfg, cluster, args.timeout)
    if not main_node:
        console.print(result.message or f"[red]{result.status}[/]")
        return 0 if result.status == "ok" else 1
    path, write_error = save(result)

    _print_summary(console, cfg, result)
    from bench.status import run_notes

    for note in run_notes(result):
        console.print(note)
    if result.message:
        console.print(f"[red]{result.status}[/]: {result.message}")
    if write_error:
        raise StorageError(write_error)
    console.print(f"wrote {path}")
    return 0 if result.status == "ok" else 1


def _cmd_matrix(args: argparse.Namespace) -> int:
    from bench.matrix import build_cells, parse_assignments, parse_grid, run_matrix
    from bench.results import capture_environment
    from bench.store import result_path

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
    # A field set two ways would silently lose one of them: say which.
    problems += [f"--set {k} conflicts with the --grid axis {k}; sweep it or fix it, not both" for k in overrides if k in grid]
    if args.release is not None and "release" in overrides:
        problems.append("--set release conflicts with --release; give the release once")
    if problems:
        raise ConfigError("; ".join(problems))
    overrides["out"] = args.out
    if args.release is not None:
        overrides["release"] = args.release
    cells = build_cells(args.preset, grid, overrides)
    if not args.dry_run:
        refuse_unusable_gpu()
    env = capture_environment()
    raise_all(preflight_problems(cells, env.hardware))

    if args.dry_run:
        listing = [{"cell": c.cell_id(), "path": str(result_path(c.out, c.release, env.hardware, c))} for c in cells]
        if args.json:
            _print_json({"cells": listing})
        else:
            for item in listing:
                print(f"{item['cell']}  ->  {item['path']}")
            print(f"{len(cells)} cells (dry run; nothing was run)")
        return 0

    with one_writer(args.out, _command_line(args)):
        summary = run_matrix(cells, environment=env, progress=not args.no_progress and not args.json)
    if args.json:
        _print_json(summary.to_dict())
    else:
        _print_sweep(summary, len(cells))
    if summary.write_error:
        raise StorageError(summary.write_error)
    return 0


def _print_sweep(summary: Any, total: int) -> None:
    from rich.table import Table

    table = Table(title=f"sweep: {total} cells")
    for col in ("cell", "status", "img/s", "peak GiB", "message"):
        table.add_column(col)
    for o in summary.outcomes:
        s = o.result.summary if o.result else None
        peak = (s.peak_gpu_reserved_bytes or s.peak_cpu_rss_bytes) if s else None
        message = o.message if o.saved else f"NOT SAVED; {o.message}".rstrip("; ")
        table.add_row(o.config.cell_id(), o.status, f"{s.img_per_s:.3f}" if s and s.img_per_s else "",
                      f"{peak / GIB:.2f}" if peak else "", message[:80])
    console = _console()
    console.print(table)
    console.print(", ".join(f"{k} {v}" for k, v in summary.counts().items() if v))


def _cmd_compare(args: argparse.Namespace) -> int:
    from bench.compare import CompareOptions, compare_paths

    problems = []
    if args.threshold < 0:
        problems.append(f"--threshold must be >= 0, got {args.threshold}")
    if not 0 < args.alpha < 1:
        problems.append(f"--alpha must be in (0, 1), got {args.alpha}")
    if not 1 <= args.min_repeats <= LIMITS["repeats"]:
        problems.append(f"--min-repeats must be in 1..{LIMITS['repeats']}, got {args.min_repeats}")
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
    from bench.store import read_results

    problem = writable_problem(Path(args.out), "--out")
    if problem:
        raise ConfigError(problem)  # before reading and plotting every result
    results = read_results(args.paths)
    rendered = build_report(results, reference_dir=args.reference, with_reference=not args.no_reference)
    paths = write_report(rendered, Path(args.out))
    if args.json:
        _print_json({"markdown": str(paths[0]), "images": [str(p) for p in paths[1:]], "results": len(results)})
    else:
        _console().print(f"wrote {paths[0]} and {len(paths) - 1} plots from {len(results)} results", highlight=False)
    return 0


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    if args.steps < 2:
        raise ConfigError(f"--steps must be >= 2 so that a loss trend exists, got {args.steps}")
    if args.steps > 1000:
        raise ConfigError(f"--steps must be <= 1000 (a check needs a few steps, not a training run), got {args.steps}")
    refuse_unusable_gpu()  # before importing the training stack
    from bench.selfcheck import run_selfcheck

    if args.json:
        # The Trainer prints its logs; keep stdout for the one JSON object.
        with contextlib.redirect_stdout(sys.stderr):
            report = run_selfcheck(steps=args.steps, command=" ".join(["phi3v-bench", *sys.argv[1:]]))
        _print_json(report.to_dict())
        return 0 if report.ok else 2

    from rich.table import Table

    console = _console()
    console.print(f"selfcheck: {args.steps} steps after one warmup step per method, one fixed batch")
    with contextlib.redirect_stdout(sys.stderr):  # the expected duration and one line per check go to stderr
        report = run_selfcheck(steps=args.steps, command=" ".join(["phi3v-bench", *sys.argv[1:]]))
    table = Table(title=f"selfcheck · {report.device} · model {report.model} · {report.precision}")
    for col in ("method", "attn", "form", "status", "loss first→last", "peak GiB", "plan GiB", "error", "MFU"):
        table.add_column(col, no_wrap=col == "loss first→last")
    for c in report.checks:
        losses = [v for v in c.losses if v is not None]
        form = f"reduced ({c.decoder_layers} layers)" if c.form == "reduced" else c.form
        table.add_row(
            c.method, c.attn, form + (f" × {c.world_size}" if c.world_size > 1 else ""), c.status,
            f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "–",
            f"{c.measured_peak_bytes / GIB:.3f}" if c.measured_peak_bytes else "–",
            f"{c.predicted_peak_bytes / GIB:.3f}" if c.predicted_peak_bytes else "–",
            f"{c.memory_error_pct:+.1f}%" if c.memory_error_pct is not None else "–",
            f"{c.mfu:.1%}" if c.mfu is not None else "–",
            style=None if c.status == "ok" else "red",
        )
    console.print(table)
    for c in report.checks:
        for problem in [*c.problems, *([c.message] if c.message else [])]:
            console.print(f"[{'yellow' if c.status in ('ok', 'skipped') else 'red'}]{c.label}[/]: {problem}")
    console.print("peak: measured (CUDA max_memory_allocated, CPU live tensor bytes); plan: phi3v-plan's prediction")
    console.print(f"{'all checks passed' if report.ok else 'FAILED'} in {report.seconds:.0f} s")
    return 0 if report.ok else 2


_COMMANDS = {"run": _cmd_run, "matrix": _cmd_matrix, "compare": _cmd_compare, "report": _cmd_report,
             "selfcheck": _cmd_selfcheck}


@handle_errors
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``phi3v-bench`` console script.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The process exit code (see the module docstring).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the lock file names the command that holds it
    if args.command in ("run", "matrix"):
        keep_working_without_stdout()  # the product is the result files
    return _COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
