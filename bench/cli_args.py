"""``phi3v-bench``'s argument parser: every subcommand's flags (the shared ones from :mod:`phi3v_core.cli.vocabulary`).

Kept apart from :mod:`bench.cli` (which runs the subcommands) so that module stays readable. Torch-free.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.config import FLOPS_MODES, SEQ_PROFILES, TINY_DEFAULTS, BenchConfig, default_release
from bench.layout import LAYOUTS
from bench.lever_args import add_lever_arguments
from bench.packing_args import add_packing_arguments
from bench.preflight import LIMITS
from phi3v_core.cli.common import bounded_float, bounded_int, command_parser
from phi3v_core.cli.vocabulary import add_shared
from phi3v_core.constants import ATTN_NAMES, OFFLOAD_NAMES, OPTIM_NAMES, PRECISION_NAMES
from phi3v_core.methods import METHOD_NAMES

__all__ = ["build_parser"]

def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchConfig(release="-")  # defaults shown in --help; release has its own default below
    add_shared(p, "method", default=d.method, metavar="{" + ",".join(METHOD_NAMES) + "}",
                   help="fine-tuning method (default: %(default)s)")
    add_shared(p, "attn", default=None, metavar="{" + ",".join(ATTN_NAMES) + "}",
                   help="attention kernel (default: flash_attention_2 on a GPU with compute capability >= 8.0 when "
                        "flash-attn imports, else sdpa)")
    add_shared(p, "precision", default=None, metavar="{" + ",".join(PRECISION_NAMES) + "}",
                   help="bf16/fp16 mixed precision or fp32 (default: bf16 on GPUs with compute capability >= 8.0, "
                        "fp16 on older GPUs, fp32 on CPU)")
    add_shared(p, "model", dest="model", default=None, help="tiny, phi-3.5-vision, phi-3-vision or a checkpoint folder "
                   "(default: phi-3.5-vision with random weights on a GPU, tiny on CPU)")
    add_shared(p, "num_crops", type=int, default=None,
                   help=f"HD crops per image, 1..16 (default: {d.num_crops}; tiny model: {TINY_DEFAULTS['num_crops']})")
    p.add_argument("--seq-profile", default=None, metavar="{" + ",".join(SEQ_PROFILES) + "}",
                   help=f"synthetic sample shape (default: {d.seq_profile})")
    add_shared(p, "global_batch", type=int, default=None,
                   help=f"global effective batch per optimizer step over all GPUs (default: {d.global_batch}; "
                        f"tiny: {TINY_DEFAULTS['global_batch']})")
    add_shared(p, "micro_batch", type=int, default=None,
                   help=f"samples per GPU per forward (default: the layout's; tiny: {TINY_DEFAULTS['micro_batch']})")
    add_shared(p, "gpus", type=int, default=d.gpus, help="GPUs per node (default: %(default)s)")
    add_shared(p, "nodes", type=int, default=d.nodes, help="nodes (default: %(default)s)")
    add_shared(p, "max_steps", dest="steps", type=int, default=None,
                   help=f"timed optimizer steps per repeat (default: {d.steps}; tiny: {TINY_DEFAULTS['steps']})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed steps before them (default: {d.warmup}; tiny: {TINY_DEFAULTS['warmup']})")
    add_shared(p, "repeats", type=int, default=None,
                   help=f"fresh processes; compare needs >= 3 (default: {d.repeats}; tiny: {TINY_DEFAULTS['repeats']})")
    add_shared(p, "seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="micro-batch, checkpointing, optimizer and offload: plan (phi3v-plan's for this card and "
                        "method; the default on a GPU) or recipe (the seed's: checkpointing on, micro-batch 1, AdamW; "
                        "the default on CPU); the flags below override single fields")
    add_lever_arguments(p)  # --gradient_checkpointing per tower, --freeze_llm, tower rates, --kernels, --compile
    add_shared(p, "optim", choices=OPTIM_NAMES, default=None, help="optimizer (default: the layout's)")
    add_shared(p, "offload", choices=OFFLOAD_NAMES, default=None, help="DeepSpeed offload (default: the layout's)")
    add_shared(p, "learning_rate", type=bounded_float(0, 1, low_open=True), default=None,
                   help="peak learning rate (default: the recipe's for the profile's task and the method); decides "
                        "how many weights a step changes, which the run reports")
    p.add_argument("--flops", choices=FLOPS_MODES, default=d.flops,
                   help="how MFU's FLOPs are counted: analytic (from the shapes) or trace (fake-tensor replay, "
                        "minutes for the full-size model; a check of the analytic count) (default: %(default)s)")
    add_packing_arguments(p)
    _add_output_arguments(p)


def _add_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--release", default=None, help=f"release folder name (default: {default_release()})")
    add_shared(p, "output_dir", dest="out", default="results", help="results root folder (default: %(default)s)")


def build_parser(doc: str) -> argparse.ArgumentParser:
    """Return the ``phi3v-bench`` argument parser (``doc``: :mod:`bench.cli`'s docstring, the help text)."""
    parser = command_parser("phi3v-bench", doc.split("\n\n")[0], doc.split("\n\n", 1)[1])
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
        "run", help="measure one configuration",
        description="Measure one configuration and write results/<release>/<hardware>/<cell>.json.",
        epilog="examples:\n  phi3v-bench run --method lora --model tiny --steps 10\n"
               "  phi3v-bench run --method full --attn flash_attention_2 --model phi-3.5-vision --gpus 8 --batch-size 64",
    )
    _add_run_arguments(run)
    add_shared(run, "overwrite", action="store_true",
               help="replace a stored result measured on other hardware or at another commit")
    add_shared(run, "force", action="store_true", help="run even where the planner predicts it does not fit this "
               "machine's memory (and, as before, replace a stored result)")
    add_shared(run, "json", action="store_true", help="print the result as one JSON line")
    # Multi-node on a real cluster (one phi3v-bench per node; under srun these come from SLURM's variables).
    run.add_argument("--node_rank", "--node-rank", type=bounded_int(0, LIMITS["nodes"] - 1), default=None, help="this node's index 0..nodes-1 (node 0 writes the result)")
    run.add_argument("--master_addr", "--master-addr", default=None, help="host name or address of node 0, reachable from every node")
    run.add_argument("--master_port", "--master-port", type=bounded_int(1, 65535), default=None, help="rendezvous port on node 0 (default: 29500)")
    run.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                     help="kill a repeat that runs longer and record status timeout (default: 3600)")


def _add_matrix_command(sub: Any) -> None:
    """``matrix``: sweep many configurations."""
    matrix = sub.add_parser(
        "matrix", help="sweep many configurations (resumable)",
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
    add_shared(matrix, "overwrite", action="store_true", help="re-run cells that already have a finished result")
    add_shared(matrix, "force", action="store_true", help="run cells the planner predicts do not fit this machine's "
               "memory (left out otherwise; as before, also re-run finished cells)")
    matrix.add_argument("--dry-run", action="store_true", help="list the cells and where they would be written")
    matrix.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_shared(matrix, "json", action="store_true", help="print the sweep summary as one JSON line")


def _add_compare_command(sub: Any) -> None:
    """``compare``: two result sets, exit 2 on a regression."""
    compare = sub.add_parser(
        "compare", help="compare two result sets (exit 2 on regression)",
        description="Match results of A (baseline) and B (candidate) by configuration and report img/s and memory changes; "
                    "drift (library versions, what a step is) is flagged first. img/s = median over repeats of (images "
                    "per step ÷ the repeat's median step time), the number run shows. A change is called when both "
                    "sides have >= --min-repeats repeats, |Δ| > max(--threshold, noise) and Welch's t-test p < --alpha; "
                    "each verdict says why, with a 95%% CI, and an unproven one how many repeats would decide it. "
                    "Allocated memory must match within max(1%%, 1 MiB); reserved/NVML within max(5%%, 256 MiB).",
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
    add_shared(fmt, "json", action="store_true", help="print the comparison as one JSON line")


def _add_report_command(sub: Any) -> None:
    """``report``: markdown tables and PNG plots."""
    report = sub.add_parser(
        "report", help="markdown tables + PNG plots",
        description="Write report.md (tables in the seed's layout, beside its published rows) and PNG plots "
                    "(img/s by method x attention, memory by method, scaling over nodes).",
        epilog="example:\n  phi3v-bench report results/v0.2.0 --out report/",
    )
    report.add_argument("paths", nargs="+", help="result .json files or folders")
    add_shared(report, "output_dir", dest="out", default="report", help="output folder (default: %(default)s)")
    report.add_argument("--reference", default=None, help="folder with the seed tables as CSV (default: the packaged copy of results/reference)")
    report.add_argument("--no-reference", action="store_true", help="leave the seed's published rows out")
    add_shared(report, "json", action="store_true", help="print the written paths as one JSON line")


def _add_selfcheck_command(sub: Any) -> None:
    """``selfcheck``: every method trains, memory and MFU as predicted."""
    selfcheck = sub.add_parser(
        "selfcheck", help="got a GPU? run this first: every method trains, memory and MFU as predicted",
        description="Train every method x attention kernel (sdpa, and flash_attention_2 when installed) for a few "
                    "steps on one fixed batch — on CUDA phi-3.5-vision in bf16 (fp16 below compute capability 8.0), "
                    "depth-reduced where phi3v-plan says the full model does not fit one card, plus 2-process checks "
                    "with two or more GPUs; on CPU the tiny model — and check that the loss is finite and falls, that "
                    "peak memory matches phi3v-plan's prediction, and report MFU. Prints the expected duration first.",
        epilog="exit codes: 0 every check passed, 2 a check failed, 1 user error\n"
               "example:\n  phi3v-bench selfcheck --json > selfcheck.json",
    )
    add_shared(selfcheck, "max_steps", dest="steps", type=int, default=3, help="checked steps after one warmup step (default: 3)")
    add_shared(selfcheck, "json", action="store_true", help="print one JSON object with a checks list")
