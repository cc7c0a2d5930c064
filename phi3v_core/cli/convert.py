"""phi3v-convert: build and check data folders in the recipe's jsonl format.

Subcommands:
    ucf101     Convert a local UCF-101 (subset) folder (<src>/{train,val,test}/<Class>/*.avi) into jsonl + frames.
    synthetic  Write a task's offline synthetic twin as a jsonl folder.
    check      Strictly validate a jsonl folder (every problem as file:line) and summarise it.

Examples:
    phi3v-convert ucf101 --src ~/data/UCF101_subset --out_dir ./ucf101
    phi3v-convert ucf101 --src ~/data/UCF101_subset --out_dir ./ucf101 --overwrite --json
    phi3v-convert synthetic --task docvqa --n 64 --out_dir ./docvqa_twin
    phi3v-convert check ./ucf101 --task ucf101
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from phi3v_core.cli.common import bounded_int, command_parser, handle_errors, keep_working_without_stdout, strict_json
from phi3v_core.cli.vocabulary import DEFAULT_SEED, add_shared
from phi3v_core.data.images import DEFAULT_MAX_PIXELS
from phi3v_core.data.jsonl import check_output_dir
from phi3v_core.data.seqlen import record_image_tokens
from phi3v_core.data.synthetic import SYNTHETIC_TASKS, expected_mean_sequence_length
from phi3v_core.data.tasks import TASKS, TaskData, load_task
from phi3v_core.data.ucf101 import convert_ucf101, plan_ucf101
from phi3v_core.errors import ConfigError
from phi3v_core.fs import overlap_problem, pending
from phi3v_core.progress import stage
from phi3v_core.transaction import recover

_EPILOG = """examples:
  phi3v-convert ucf101 --src ~/data/UCF101_subset --out_dir ./ucf101
  phi3v-convert synthetic --task docvqa --n 64 --out_dir ./docvqa_twin
  phi3v-convert check ./ucf101 --task ucf101 --json
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for --help tests)."""
    parser = command_parser("phi3v-convert", "Build and check data folders in the recipe's jsonl format.", _EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{ucf101,synthetic,check}")

    ucf = sub.add_parser(
        "ucf101",
        help="convert <src>/{train,val,test}/<Class>/*.avi into ucf101_<split>.jsonl + images/",
        description="Convert a local UCF-101 (subset) folder into the recipe's jsonl format: 8 evenly spaced frames per "
        "video, ids <split>-<i:010d>, the recipe's classification prompt.",
        epilog="example:\n  phi3v-convert ucf101 --src ~/data/UCF101_subset --out_dir ./ucf101",
    )
    ucf.add_argument("--src", required=True, type=Path, help="folder holding train/, val/, test/ with <Class>/*.avi")
    add_shared(ucf, "output_dir", dest="out_dir", required=True, type=Path, help="output folder (must be new or empty)")
    ucf.add_argument("--num_frames", type=bounded_int(1, 64), default=8, help="frames per video (default: 8, as the recipe)")
    add_shared(ucf, "overwrite", action="store_true", help="replace a non-empty --out_dir")
    add_shared(ucf, "json", action="store_true", help="print a JSON summary (last stdout line) instead of a table")

    syn = sub.add_parser(
        "synthetic",
        help="write a task's synthetic twin as a jsonl folder",
        description="Generate a deterministic synthetic twin of a recipe task and write it as <task>_train.jsonl, "
        "<task>_val.jsonl and images/.",
        epilog="example:\n  phi3v-convert synthetic --task nlvr2 --n 32 --n_eval 8 --out_dir ./nlvr2_twin",
    )
    add_shared(syn, "task", required=True, choices=sorted(SYNTHETIC_TASKS), help="task to imitate")
    syn.add_argument("--n", type=bounded_int(1, 100_000), required=True, help="training records")
    syn.add_argument("--n_eval", type=bounded_int(1, 100_000), default=None, help="eval records (default: --n)")
    add_shared(syn, "seed", type=bounded_int(0, 2**32 - 1), default=DEFAULT_SEED, help=f"seed (default: {DEFAULT_SEED}, as phi3v-finetune --synthetic)")
    add_shared(syn, "output_dir", dest="out_dir", required=True, type=Path, help="output folder (must be new or empty)")
    syn.add_argument("--image_format", choices=("png", "jpg"), default="png", help="image encoding (default: png)")
    add_shared(syn, "overwrite", action="store_true", help="replace a non-empty --out_dir")
    add_shared(syn, "json", action="store_true", help="print a JSON summary (last stdout line) instead of a table")

    chk = sub.add_parser(
        "check",
        help="validate a jsonl folder and summarise it",
        description="Strictly validate a data folder (*_train.jsonl, *_val.jsonl, images/): JSON, keys, types, image "
        "tags, path safety, and every image decoded once. All problems are reported with file:line.",
        epilog="example:\n  phi3v-convert check ./ucf101 --task ucf101",
    )
    chk.add_argument("data_dir", type=Path, help="folder with *_train.jsonl / *_val.jsonl and images/")
    add_shared(chk, "task", default="jsonl", choices=sorted(TASKS), help="task whose rules apply (default: jsonl)")
    chk.add_argument("--split", default="all", choices=("train", "eval", "all"), help="what to check (default: all)")
    chk.add_argument("--max_pixels", type=bounded_int(1, 10**9), default=DEFAULT_MAX_PIXELS, help="per-image pixel cap")
    add_shared(
        chk,
        "max_length",
        type=bounded_int(16, 10**7),
        default=131072,
        help="longest training record in tokens, as phi3v-finetune --max_length (default: the context, 131072)",
    )
    add_shared(chk, "skip_bad", action="store_true", help="count records with bad images instead of failing")
    add_shared(chk, "json", action="store_true", help="print a JSON summary (last stdout line) instead of a table")
    return parser


def _task_summary(task: TaskData) -> dict[str, object]:
    splits = {}
    for label, records in (("train", task.train), ("eval", task.eval)):
        if not records:
            continue
        tokens = [record_image_tokens(r, task.num_crops) for r in records]
        splits[label] = {
            "records": len(records),
            "turns": sum(len(r.conversations) for r in records),
            "images": sum(len(r.images) for r in records),
            "mean_image_tokens": round(sum(tokens) / len(tokens), 1),
            "skipped": task.skipped.get(label, 0),
        }
    return {
        "task": task.name,
        "origin": task.origin,
        "metric": task.metric,
        "num_crops": task.num_crops,
        "splits": splits,
    }


def _print_table(title: str, rows: Sequence[Sequence[object]], headers: Sequence[str]) -> None:
    table = Table(title=title)
    for header in headers:
        table.add_column(header, justify="right" if header != headers[0] else "left")
    for row in rows:
        table.add_row(*(str(v) for v in row))
    Console().print(table)


def _run_ucf101(args: argparse.Namespace) -> int:
    # Output folder and source layout are checked before the progress bar starts or anything is written.
    overlap = overlap_problem(args.src, args.out_dir, "--src", "--out_dir")
    if overlap:
        raise ConfigError(overlap)
    recover(args.out_dir)  # a replacement interrupted by a kill is finished or rolled back first (said on stderr)
    check_output_dir(args.out_dir, overwrite=args.overwrite)
    _, jobs = plan_ucf101(args.src)
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]converting[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=args.json or not console.is_terminal,  # a bar only helps a person watching a terminal
    )
    with progress:
        bar = progress.add_task("videos", total=len(jobs))
        summary = convert_ucf101(
            args.src,
            args.out_dir,
            num_frames=args.num_frames,
            overwrite=args.overwrite,
            on_video=lambda job: progress.advance(bar),
        )
    if args.json:
        print(summary.to_json())
        return 0
    rows = [(split, n, n * summary.frames_per_video) for split, n in summary.videos.items()]
    print(f"wrote {summary.out_dir}: UCF-101, {len(summary.classes)} classes, {summary.seconds:.1f} s")
    _print_table("videos", rows, ("split", "videos", "frames"))
    if summary.recounted:
        print(
            f"{len(summary.recounted)} video(s) had a missing or wrong frame count in the container; decoded counts used"
        )
    return 0


def _run_synthetic(args: argparse.Namespace) -> int:
    recover(args.out_dir)
    check_output_dir(args.out_dir, overwrite=args.overwrite)
    task = load_task(args.task, synthetic=args.n, synthetic_eval=args.n_eval, seed=args.seed)
    task.write(args.out_dir, overwrite=args.overwrite, image_format=args.image_format)
    summary = _task_summary(task)
    summary["out_dir"] = str(args.out_dir)
    summary["expected_mean_sequence_length"] = round(expected_mean_sequence_length(args.task, task.num_crops), 1)
    if args.json:
        print(strict_json(summary))
        return 0
    rows = [(label, s["records"], s["images"], s["mean_image_tokens"]) for label, s in summary["splits"].items()]  # type: ignore[union-attr]
    print(f"wrote {args.out_dir}: synthetic {args.task} (seed {args.seed})")
    _print_table("records", rows, ("split", "records", "images", f"image tokens/record @{task.num_crops} crops"))
    return 0


def _run_check(args: argparse.Namespace) -> int:
    pending(args.data_dir, "data_dir")  # a check only reads: an interrupted replacement is reported, not repaired
    task = load_task(args.task, args.split, data_dir=args.data_dir, max_pixels=args.max_pixels, skip_bad=args.skip_bad)
    if task.train:
        # The length check training runs (phi3v-finetune --max_length, default the model context), with the
        # offline tokenizer (the official special tokens and vocabulary size).
        # Its tokenizer comes with torch and transformers (seconds to import): said on a terminal, not a silent wait
        # (off a terminal stderr keeps to the one-line error a script reads).
        with stage(f"{args.data_dir}: length check (loading the tokenizer)", enabled=sys.stderr.isatty()):
            from phi3v_core.processing import Phi3VProcessor
            from phi3v_core.training.run import check_sequence_lengths

            check_sequence_lengths(task, Phi3VProcessor.tiny(num_crops=task.num_crops), args.max_length)
    summary = _task_summary(task)
    if args.json:
        print(strict_json(summary))
        return 0
    rows = [
        (label, s["records"], s["turns"], s["images"], s["skipped"], s["mean_image_tokens"])
        for label, s in summary["splits"].items()  # type: ignore[union-attr]
    ]
    headers = ("split", "records", "turns", "images", "skipped", f"image tokens/record @{task.num_crops} crops")
    print(f"{args.data_dir}: valid ({task.name}, metric {task.metric}, origin {task.origin})")
    _print_table("records", rows, headers)
    return 0


@handle_errors
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``phi3v-convert``.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        Exit code 0; user errors exit with 1 and one line on stderr (via ``handle_errors``).
    """
    args = build_parser().parse_args(argv)
    if args.command != "check":
        keep_working_without_stdout()  # the product is the data folder
    runners = {"ucf101": _run_ucf101, "synthetic": _run_synthetic, "check": _run_check}
    return runners[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
