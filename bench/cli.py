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

from bench import cli_args
from bench.advice import after_run_advice
from bench.config import BenchConfig, DeviceDescription
from bench.fit import fit_problems, fitting_cells
from bench.layout import machine_config
from bench.preflight import (
    LIMITS,
    limit_problems,
    one_writer,
    preflight_problems,
    refuse_unusable_gpu,
    unsaved_result_error,
)
from bench.run_view import print_summary as _print_summary
from phi3v_core.cli.common import handle_errors, keep_working_without_stdout, strict_json
from phi3v_core.cli.vocabulary import plural
from phi3v_core.errors import ConfigError, raise_all
from phi3v_core.fs import StorageError, writable_problem

__all__ = ["LIMITS", "build_parser", "config_from_args", "main", "preflight_problems"]

GIB = 1 << 30

#: The longest a repeat may be allowed to run (``--timeout``): a week.
MAX_TIMEOUT_S = 7 * 24 * 3600.0


def build_parser() -> argparse.ArgumentParser:
    """Return the ``phi3v-bench`` argument parser (defined in :mod:`bench.cli_args`)."""
    return cli_args.build_parser(__doc__)


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
    return machine_config(values, device or DeviceDescription.detect(), getattr(args, "layout", None))


def _console() -> Any:
    from rich.console import Console

    return Console()


def _print_json(obj: Any) -> None:
    # Strict JSON: a NaN in a measurement becomes null instead of making the line unparseable.
    print(strict_json(obj))


def _command_line(args: argparse.Namespace) -> str:
    return " ".join(["phi3v-bench", *(shlex.quote(a) for a in getattr(args, "argv", []) or [args.command])])[:300]


def _cmd_run(args: argparse.Namespace) -> int:
    from bench import runner
    from bench.results import capture_environment
    from bench.store import replacement_problem, result_path

    # flag values first, from NVML alone: capture_environment imports torch (seconds) and a typo must answer at once
    early, _ = config_from_args(args, DeviceDescription.from_nvml())
    raise_all(early.problems() + limit_problems([early]))
    refuse_unusable_gpu()
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
        problems += [] if args.force or problems else fit_problems([cfg], bool(env.gpus))  # before any model
    raise_all(problems)
    target = result_path(cfg.out, cfg.release, env.hardware, cfg)
    with one_writer(cfg.out, _command_line(args), enabled=main_node):
        problem = replacement_problem(target, env) if main_node else None
        if problem and not (args.overwrite or args.force):
            raise ConfigError(f"{problem}; pass --force to replace it, or --release/--out to keep both")
        return _run_and_save(args, cfg, env, reasons, cluster)


def _run_and_save(args: argparse.Namespace, cfg: BenchConfig, env: Any, reasons: list[str], cluster: Any) -> int:
    """Measure, save and print; a failed save still prints every number (and keeps a copy where it can)."""
    from bench.runner import measure_with_progress
    from bench.store import save_result

    main_node = cluster is None or cluster.is_main

    def save(result: Any) -> tuple[Path | None, str | None]:
        try:
            return save_result(result, force=args.overwrite or args.force), None
        except OSError as exc:
            return None, unsaved_result_error(result, exc)

    if args.json:
        result = measure_with_progress(cfg, cluster, args.timeout)
        if not main_node:
            _print_json({"path": None, **result.to_dict()})
            return 0 if result.status == "ok" else 1
        path, write_error = save(result)
        sys.stderr.write("".join(f"{line}\n" for line in after_run_advice(cfg, result, env)))  # stdout: JSON
        _print_json({"path": str(path) if path else None, "defaults": reasons, **result.to_dict(),
                     **({"write_error": write_error} if write_error else {})})
        if write_error:
            raise StorageError(write_error)
        return 0 if result.status == "ok" else 1

    from rich.panel import Panel

    console = _console()
    hardware = ", ".join(f"{g.name} (cc {g.compute_capability})" for g in env.gpus) or f"CPU: {env.cpu} ({env.cpu_count} threads)"
    card = (
        f"[bold]{cfg.method}[/] · attn {cfg.attn} · {cfg.precision} · model {cfg.model} · {plural(cfg.num_crops, 'crop')} · "
        f"profile {cfg.seq_profile}\n"
        f"global batch {cfg.global_batch} = {cfg.micro_batch} micro × {cfg.world_size} ranks ({plural(cfg.nodes, 'node')} × {cfg.gpus}) × "
        f"{cfg.grad_accum} accumulation · {cfg.warmup} warmup + {cfg.steps} timed steps × {plural(cfg.repeats, 'repeat')}\n"
        f"{hardware} · torch {env.packages.get('torch')} · transformers {env.packages.get('transformers')} · "
        f"git {(env.git_sha or '?')[:10]}{'+dirty' if env.git_dirty else ''}\n"
        + "\n".join(f"[dim]default[/] {reason}" for reason in reasons)
    )
    console.print(Panel(card, title=f"phi3v-bench run · {cfg.cell_id()}", expand=False))
    result = measure_with_progress(cfg, cluster, args.timeout, live=True)
    if not main_node:
        console.print(result.message or f"[red]{result.status}[/]")
        return 0 if result.status == "ok" else 1
    path, write_error = save(result)
    if result.message:  # the reason first, before any table
        console.print(f"[red]{result.status}[/]: {result.message}")
    if result.metrics.repeats:  # a run that measured nothing gets no table of dashes
        _print_summary(console, cfg, result)
    from bench.status import run_notes

    for note in [*run_notes(result), *after_run_advice(cfg, result, env)]:
        console.print(note)
    if write_error:
        raise StorageError(write_error)
    console.print(f"wrote {path}")
    return 0 if result.status == "ok" else 1


def _cmd_matrix(args: argparse.Namespace) -> int:
    from bench.matrix import build_cells, expected_seconds, parse_assignments, parse_grid, run_matrix
    from bench.results import capture_environment
    from bench.store import result_path
    from planner.speed import format_duration

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
    device = DeviceDescription.from_nvml()  # the defaults `run` takes here, for every field no cell sets
    cells = build_cells(args.preset, grid, overrides, device=device)
    if not args.dry_run:
        refuse_unusable_gpu()
    env = capture_environment()
    raise_all(preflight_problems(cells, env.hardware))
    if not args.force:  # a cell predicted not to fit is left out, said before the sweep, not found by the OOM killer
        cells, skipped = fitting_cells(cells, bool(env.gpus))
        sys.stderr.write("".join(f"{line}\n" for line in skipped))

    if args.dry_run:
        listing = [{"cell": c.cell_id(), "path": str(result_path(c.out, c.release, env.hardware, c))} for c in cells]
        seconds = expected_seconds(cells, device, env.gpus[0].total_memory_bytes if env.gpus else None)
        if args.json:
            _print_json({"cells": listing, "expected_seconds": round(seconds) if seconds is not None else None})
        else:
            for item in listing:
                print(f"{item['cell']}  ->  {item['path']}")
            when = f"~{format_duration(seconds)}" if seconds is not None else "not predicted (full-size model on a CPU)"
            print(f"{len(cells)} cells (dry run; nothing was run); expected time {when}")
        return 0

    with one_writer(args.out, _command_line(args)):
        summary = run_matrix(cells, force=args.overwrite or args.force, environment=env,
                             progress=not args.no_progress and not args.json)
    if args.json:
        _print_json(summary.to_dict())
    else:
        _print_sweep(summary, len(cells))
    if summary.write_error:
        raise StorageError(summary.write_error)
    return 0


def _print_sweep(summary: Any, total: int) -> None:
    from bench.run_view import print_sweep

    print_sweep(_console(), summary, total)


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
        report.print_rich(_console(), f"compare {args.a} → {args.b}")
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
        _console().print(f"wrote {paths[0]} and {plural(len(paths) - 1, 'plot')} from {plural(len(results), 'result')}", highlight=False)
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
    for col in ("method", "attn", "form", "status", "loss first→last", "peak GiB", "plan GiB", "error", "MFU [counted]"):
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
