"""``phi3v-plan``: what fits on this (or a stated) machine, what to run, and how fast it will go.

Keeps its imports light (no torch/transformers unless ``--trace``) so that it answers in well under three seconds.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from phi3v_core.cli.common import bounded_float, bounded_int, command_parser, handle_errors
from phi3v_core.cli.vocabulary import THROUGHPUT_UNIT, add_shared, plural
from phi3v_core.constants import MODEL_PRESET_NAMES
from phi3v_core.errors import ConfigError, raise_all
from phi3v_core.methods import METHOD_NAMES, METHODS
from phi3v_core.retention import RETENTION_FLOOR
from planner.datareport import crops_report
from planner.memory_types import GIB
from planner.reports import dump, fmt, make_console, print_calibration, print_gpus, print_validation

__all__ = ["build_parser", "main"]

_EPILOG = """examples:
  phi3v-plan                                   # detect GPUs with NVML and plan DocVQA fine-tuning on them
  phi3v-plan --gpu A100-80GB --gpus 8 --nodes 2 --dataset-size 39463
  phi3v-plan --gpu V100-32GB --gpus 8 --task hateful_memes --json
  phi3v-plan --gpu H100-80GB --cloud azure --nodes 4          # SKU, VM count and vCPU quota
  phi3v-plan --cloud azure                                    # compare the Azure ND SKUs
  phi3v-plan --gpu T4 --num_crops 4 --method lora --method qlora
  phi3v-plan --gpu A100-80GB --gpus 8 --trace --method full  # measure activations on the full model (CPU, cached)
  phi3v-plan --list-gpus
  phi3v-plan --calibration                                    # predicted vs the recipe's published table
  phi3v-plan --crops_table --gpu A100-80GB                     # what each num_crops costs DocVQA, NLVR2, memes
  phi3v-plan --validate                                       # the speed model against this CPU (~2 min)

notes:
  Memory is per GPU in GiB (what nvidia-smi shows: tensors + allocator cache + CUDA context). "needs" is the least the
  step runs in; "peak" is the predicted reserved peak; a plan fits only below 95 % of the card. Speed is a
  first-principles prediction (FLOPs, bytes, communication) with a few constants fitted on named rows of the
  recipe's published 8xA100/8xV100 table (see --calibration); other architectures are labelled estimates.
"""


def _image_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1008x1680") from None
    return width, height


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the docs)."""
    parser = command_parser(
        "phi3v-plan", "Plan Phi-3.5-vision fine-tuning: which methods fit, the recommended setup, speed and the command.",
        _EPILOG,
    )
    _add_hardware_args(parser)
    _add_workload_args(parser)
    _add_output_args(parser)
    return parser


def _add_hardware_args(parser: argparse.ArgumentParser) -> None:
    hw = parser.add_argument_group("hardware")
    hw.add_argument(
        "--gpu", help="plan for this GPU instead of the detected one: a --list-gpus name or nvidia-smi's (NVIDIA GeForce RTX 4090)"
    )
    hw.add_argument(
        "--gpu_memory_gib", "--gpu-memory-gib", type=bounded_float(0, 1e5, low_open=True), metavar="GIB",
        help="a card not in the table: its memory (with --tflops and --bandwidth for a speed estimate)",
    )
    hw.add_argument("--tflops", dest="gpu_tflops", metavar="TFLOPS", type=bounded_float(0, 1e6, low_open=True), help="that card's dense bf16/fp16 tensor TFLOP/s")
    hw.add_argument("--bandwidth", dest="gpu_bandwidth_gbs", type=bounded_float(0, 1e6, low_open=True), metavar="GB/S", help="that card's memory bandwidth in GB/s")
    add_shared(hw, "gpus", dest="count", type=int, help="GPUs per node (default: detected, 8 on Azure, else 1)")
    add_shared(hw, "nodes", type=int, default=1, help="nodes (default: 1)")
    hw.add_argument(
        "--cloud", choices=["azure"], help="add the Azure SKU, VM count and vCPU quota (costs: --price-per-gpu-hour)"
    )
    hw.add_argument(
        "--price-per-gpu-hour", type=bounded_float(0, 1e6, low_open=True), metavar="USD",
        help="your price of one GPU-hour: adds the cost per run (no price table is shipped)",
    )
    hw.add_argument("--deadline", dest="deadline_hours", type=bounded_float(0, 1e6, low_open=True), metavar="HOURS", help="the fewest nodes that finish all epochs in time")
    hw.add_argument("--host_ram_gib", "--host-ram-gib", type=bounded_float(0, 1e6, low_open=True), default=None, metavar="GIB", help="host RAM per node (checks an offloaded optimizer fits; default: this machine's for a detected GPU)")
    hw.add_argument("--cpus_per_node", "--cpus-per-node", type=bounded_int(1, 100_000), default=None, metavar="N", help="CPU cores per node for the data loader (default: this machine's for a detected GPU, the Azure SKU's)")
    hw.add_argument("--processor_rate", "--processor-rate", type=bounded_float(0, 1e6, low_open=True), default=None, metavar="SAMPLES_PER_S", help="processor samples/s on one core of the target CPU (default: planner/data/processor_rate.json; phi3v-bench results store this machine's)")
    hw.add_argument("--inter-node-gbit", type=bounded_float(0, 1e6, low_open=True), help="network per node in Gbit/s (default: the SKU's, else 200)")


def _add_workload_args(parser: argparse.ArgumentParser) -> None:
    work = parser.add_argument_group("workload")
    add_shared(work, "task", default="docvqa", help="docvqa, hateful_memes, nlvr2 or ucf101 (default: docvqa)")
    add_shared(work, "num_crops", type=int, help="HD crops per image, 1-16 (default: the task's)")
    work.add_argument("--image-size", type=_image_size, metavar="WxH", help="typical image size (default: the task's)")
    work.add_argument("--images", type=int, dest="images_per_sample", help="images per sample (default: the task's)")
    work.add_argument("--text-tokens", type=bounded_int(0, 1_000_000), help="text tokens per sample (default: the task's)")
    work.add_argument("--seq-len", type=int, help="override the tokens per sample")
    work.add_argument("--dataset-size", type=int, help="samples per epoch (for time per epoch)")
    add_shared(
        work,
        "data_dir",
        metavar="DIR",
        help="a jsonl data folder: token lengths from its records and image headers; memory for its longest sample",
    )
    add_shared(work, "skip_bad", action="store_true", help="with --data: leave out records with unreadable images")
    add_shared(
        work, "global_batch", type=int, help="global batch per optimizer step (default: 64)"
    )
    work.add_argument("--max-micro-batch", type=int, default=16, help="largest micro-batch to consider (default: 16)")
    add_shared(
        work, "model", dest="model", default="phi-3.5-vision",
        help="model preset (shapes only; the command then reads $PHI3V_MODEL) or the checkpoint folder the command "
        "trains (default: phi-3.5-vision)",
    )
    add_shared(
        work, "method", action="append", dest="methods", choices=METHOD_NAMES, help="only these methods (repeatable)"
    )


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    out = parser.add_argument_group("output")
    out.add_argument(
        "--trace", dest="use_trace", action="store_true", help="measure activations with MemTracker on the full model (CPU, slow, cached)"
    )
    add_shared(out, "json", action="store_true", help="print JSON instead of tables")
    out.add_argument("--list-gpus", action="store_true", help="print the GPU table and exit")
    out.add_argument("--calibration", action="store_true", help="print predicted vs the recipe's published table and exit")
    out.add_argument("--levers", action="store_true", help="print what each kernel/compile/per-tower axis is predicted to change, with the published figures, and exit")
    out.add_argument(
        "--crops_table",
        "--crops-table",
        action="store_true",
        help="print, per recipe task, what each num_crops costs its images (tokens, upscaled share; memory and time "
        "with --gpu) and the num_crops to use, and exit",
    )
    out.add_argument(
        "--validate",
        action="store_true",
        help="measure this CPU, predict phi3v-bench step times with the speed model, run them, compare (~2 min a repeat)",
    )
    add_shared(out, "repeats", type=bounded_int(1, 100), help="--validate: runs of every case (default: 3)")
    out.add_argument("--save", metavar="FILE", help="--validate: also write the raw result with machine, commit and date")
    out.add_argument(
        "--reference", dest="reference_dir", help="folder with the published speed.csv (default: the packaged copy of results/reference)"
    )


def _request(args: argparse.Namespace) -> Any:
    """The :class:`~planner.recommend.PlanRequest` of the flags: each flag's ``dest`` is the field's name."""
    from planner.recommend import PlanRequest

    given = vars(args)
    values = {f.name: given[f.name] for f in fields(PlanRequest) if f.name in given}
    values["methods"] = tuple(args.methods or METHOD_NAMES)
    values["model_path"] = None if args.model in MODEL_PRESET_NAMES else args.model
    return PlanRequest(**values)


_SHORT = {name: method.letter for name, method in METHODS.items()}


def _print_plan(p: Any) -> None:
    console = make_console()
    _print_header(console, p)
    _print_methods(console, p)
    _print_layouts(console, p)
    best = p.best
    if best is None:
        from rich.panel import Panel

        console.print(Panel("\n".join(p.why), title="No method fits", border_style="red"))
    else:
        _print_recommendation(console, p, best)
    _print_extras(console, p)
    for note in p.notes:
        console.print(f"[yellow]note[/]: {note}")


def _img_per_s(samples_per_s: float | None, p: Any) -> float | None:
    """The planner's samples/s in the unit every command shows (img/s: the recipe's and phi3v-bench's)."""
    return None if samples_per_s is None else samples_per_s * max(p.workload.images, 1)


def _link(hw: Any) -> str:
    """How the node's GPUs talk: an SXM card is never called PCIe (one GPU has no GPU-to-GPU traffic)."""
    if hw.nvlink:
        return "NVLink"
    if hw.gpu.nvlink_gbs:
        return "SXM" if hw.gpus_per_node == 1 else "SXM, NVLink inactive"
    return "PCIe"


def _print_header(console: Any, p: Any) -> None:
    hw = p.hardware
    gpu = hw.gpu
    first = p.methods[0]
    console.print(
        f"[bold]Hardware[/]: {hw.gpus_per_node}x {gpu.key} x {plural(hw.nodes, 'node')}, {gpu.memory_gib:g} GiB each, "
        f"{gpu.architecture} (CC {gpu.compute_capability[0]}.{gpu.compute_capability[1]}), {_link(hw)}; {hw.source}"
    )
    console.print(f"[bold]Precision / attention[/]: {first.precision} / {first.attn}")
    from planner.datareport import workload_text

    console.print(f"[bold]Workload[/]: {workload_text(p)}")


def _layout_label(m: Any) -> str:
    parts = [f"{m.micro_batch} x {m.grad_accum}", "gc" if m.gradient_checkpointing else "no gc"]
    if m.optim != "adamw":
        parts.append(m.optim)
    if m.offload != "none":
        parts.append(f"offload {m.offload}")
    return ", ".join(parts + ["packed"] * any(lay.packing and lay.chosen for lay in m.layouts))


def _print_methods(console: Any, p: Any) -> None:
    from rich.table import Table

    from planner.speed import format_duration

    table = Table(
        title="Methods (memory per GPU; fits = predicted reserved peak below "
        f"{100 * (1 - p.headroom_fraction):.0f} % of the card; speed is a prediction)"
    )
    left = ("method", "recipe", "fits", "layout")
    for col in (*left, "peak GiB", "margin GiB", THROUGHPUT_UNIT, "epoch", "run", "cost $"):
        table.add_column(col, justify="left" if col in left else "right")
    for m in p.methods:
        mark = "[green]yes[/]" if m.fits else ("[red]no[/]" if m.supported else "[red]unsupported[/]")
        name = f"[bold]{m.method}[/] *" if m.method == p.recommended else m.method
        table.add_row(
            name,
            METHODS[m.method].recipe_label,  # the recipe's name for it, or "not in the recipe"
            mark,
            _layout_label(m),
            fmt(m.peak_gib),
            fmt(m.margin_gib),
            fmt(_img_per_s(m.speed.samples_per_s if m.speed else None, p), ".2f"),
            format_duration(m.speed.epoch_s) if m.speed else "-",
            format_duration(m.run_s),
            fmt(m.cost_usd, ",.0f"),
        )
    console.print(table)
    for m in p.methods:
        if m.reasons:
            console.print(f"  [bold]{m.method}[/]: {m.reasons[0]}")


def _print_layouts(console: Any, p: Any) -> None:
    """Per method and (checkpointing, optimizer, offload): the fastest fitting micro-batch (all are in --json)."""
    from rich.table import Table

    table = Table(title="Layouts considered (per option the fastest that fits, else micro-batch 1; * = chosen)")
    right = ("peak GiB", THROUGHPUT_UNIT, "micro x accum", "retention")
    for col in ("method", "checkpointing", "optimizer", "offload", "micro x accum", "peak GiB", "fits", THROUGHPUT_UNIT, "retention"):
        table.add_column(col, justify="right" if col in right else "left")
    for m in p.methods:
        groups: dict[tuple[bool, str, str], list[Any]] = {}
        for layout in m.layouts:
            key = (layout.gradient_checkpointing, layout.optim, layout.offload, layout.packing is not None)
            groups.setdefault(key, []).append(layout)
        for (checkpointing, optim, offload, _packed), layouts in groups.items():
            fitting = [lay for lay in layouts if lay.fits]
            shown = max(fitting, key=lambda lay: lay.samples_per_s or 0.0) if fitting else layouts[0]
            shown = next((lay for lay in layouts if lay.chosen), shown)
            table.add_row(
                f"{m.method}{' *' if shown.chosen else ''}",
                "on" if checkpointing else "off",
                optim,
                offload + (f" ({shown.host_bytes / GIB:.0f} GiB host)" if offload != "none" else ""),
                f"{shown.micro_batch} x {shown.grad_accum}" + (" packed" if shown.packing else ""),
                f"{shown.reserved_bytes / GIB:.1f}",
                "yes" if shown.fits else "no",
                fmt(_img_per_s(shown.samples_per_s, p), ".2f"),
                f"{shown.update_retention:.0%}" + ("" if shown.update_retention >= RETENTION_FLOOR else " (lost)"),
            )
    console.print(table)
    console.print(
        "retention: share of trained weights one step at the recipe's learning rate changes once stored "
        "(under 50 %: never recommended)"
    )


def _retention_text(best: Any) -> str:
    """``, update retention N %`` of the chosen layout (empty when there is none)."""
    chosen = next((lay for lay in best.layouts if lay.chosen), None)
    return f", update retention {chosen.update_retention:.0%}" if chosen else ""


def _print_recommendation(console: Any, p: Any, best: Any) -> None:
    from rich.panel import Panel
    from rich.table import Table

    hw = p.hardware
    lines = [
        f"[bold]{best.method}[/], {best.precision}, {best.attn}, micro-batch {best.micro_batch} x "
        f"{best.grad_accum} accumulation x {plural(hw.world_size, 'GPU')} = global batch {best.global_batch}, "
        f"gradient checkpointing {'on' if best.gradient_checkpointing else 'off'}, optimizer {best.optim}"
        + (f", offload {best.offload}" if best.offload != "none" else "")
        + _retention_text(best)
    ]
    lines += [f"- {line}" for line in p.why + best.reasons[1:]]
    hp = best.hyperparameters
    hps = (
        f"lr {hp['learning_rate']:g}, {plural(float(hp['epochs']), 'epoch')}, weight decay {hp['weight_decay']}, warmup "
        f"{hp['warmup_steps']} steps, AdamW betas ({hp['adam_beta1']}, {hp['adam_beta2']}) eps {hp['adam_epsilon']:g}, "
        f"clip {hp['max_grad_norm']}"
    )
    if "lora_rank" in hp:
        hps += f", LoRA r={hp['lora_rank']} alpha={hp['lora_alpha']}"
    lines.append(f"- hyper-parameters: {hps} ({hp['source']})")
    if best.speed:
        mfu = f"MFU {best.speed.mfu:.0%} \\[counted], " if best.speed.mfu is not None else ""
        lines.append(f"- speed (predicted): {mfu}{best.speed.basis}")
    if best.data_loading:
        lines.append(f"- {best.data_loading.line()}")
        if best.data_loading.warning:
            lines.append(f"- [yellow]warning[/]: {best.data_loading.warning}")
    lines += ["", f"[bold]{best.command}[/]"]
    console.print(Panel("\n".join(lines), title="Recommendation", border_style="green"))
    mem = Table(title=f"Memory per GPU, {best.method} (GiB; peak at {best.memory.phase})")
    mem.add_column("part")
    mem.add_column("GiB", justify="right")
    mem.add_column("note")
    for item in best.memory.items:
        mem.add_row(item.name, f"{item.gib:.2f}", item.note)
    mem.add_row("[bold]tensors (allocated)[/]", f"{best.memory.allocated / GIB:.2f}", "max_memory_allocated")
    mem.add_row("allocator cache + unmodelled", f"{best.memory.cache / GIB:.2f}", "fitted on the recipe's A100 table")
    mem.add_row("CUDA context + NCCL", f"{best.memory.context / GIB:.2f}", "")
    mem.add_row("[bold]expected peak[/]", f"{best.peak_gib:.2f}", f"of {hw.gpu.memory_gib:g} GiB (nvidia-smi)")
    console.print(mem)


def _print_extras(console: Any, p: Any) -> None:
    from rich.panel import Panel

    from planner.speed import format_duration

    if p.azure:
        a = p.azure
        console.print(
            Panel(
                f"{a['family']} ({a['vm_size']}) x {plural(a['vms'], 'VM')} = {plural(a['gpus'], 'GPU')}\n{a['interconnect']}\n{a['quota_note']}",
                title="Azure",
            )
        )
    if p.data:
        from planner.datareport import print_data

        print_data(console, p)
    if p.deadline:
        d = p.deadline
        if d.get("nodes"):
            cost = f", ${d['cost_usd']:,.0f}" if d.get("cost_usd") else ""
            console.print(
                f"[bold]Deadline {d['hours']:g} h[/]: {plural(d['nodes'], 'node')} ({plural(d['gpus'], 'GPU')}), {d['method']}, predicted "
                f"{format_duration(d['run_s'])}{cost}"
            )
        else:
            console.print(f"[red]Deadline {d['hours']:g} h[/]: {d['reason']}")


def _print_survey(plans: list[Any], title: str, azure: bool) -> None:
    from rich.table import Table

    from planner.speed import format_duration

    table = Table(title=title, caption="fits: " + ", ".join(f"{letter} {name}" for name, letter in _SHORT.items()))
    cols = ["GPU", "GiB", "dtype/attn", "fits", "best", "micro x acc", "peak GiB", THROUGHPUT_UNIT, "epoch", "cost $"]
    if azure:
        cols = ["VM size", "VMs", "vCPUs", *cols]
    for col in cols:
        # names must stay readable on narrow terminals: fold them rather than cut them with an ellipsis
        table.add_column(
            col,
            justify="right" if col in ("GiB", "VMs", "vCPUs", "peak GiB", THROUGHPUT_UNIT, "epoch", "cost $") else "left",
            overflow="fold",
        )
    for p in plans:
        best = p.best
        first = p.methods[0]
        attn = "FA2" if first.attn == "flash_attention_2" else first.attn
        row = [
            p.hardware.gpu.key,
            f"{p.hardware.gpu.memory_gib:g}",
            f"{first.precision}/{attn}",
            "".join(_SHORT[m.method] for m in p.methods if m.fits) or "-",
            best.method if best else "none",
            f"{best.micro_batch} x {best.grad_accum}" if best else "-",
            fmt(best.peak_gib) if best else "-",
            fmt(_img_per_s(best.speed.samples_per_s if best and best.speed else None, p), ".2f"),
            format_duration(best.speed.epoch_s) if best and best.speed else "-",
            fmt(best.cost_usd if best else None, ",.0f"),
        ]
        if azure:
            a = p.azure or {}
            row = [
                a.get("vm_size", "-").replace("Standard_", ""),
                str(a.get("vms", "-")),
                str(a.get("vcpu_quota") or "?"),
                *row,
            ]
        table.add_row(*row)
    make_console().print(table)


def _pick_sku(plans: list[Any]) -> Any | None:
    """Cheapest run (at --price-per-gpu-hour) among the SKUs where a plan fits; the fastest where no price is known."""
    priced = [p for p in plans if p.best and p.best.cost_usd]
    if priced:
        return min(priced, key=lambda p: p.best.cost_usd)
    good = [p for p in plans if p.best and p.best.speed]
    return max(good, key=lambda p: p.best.speed.samples_per_s) if good else None


def _with_close_gpus(message: str, name: str | None) -> str:
    """Replace the full GPU list of an "unknown GPU" message by the names closest to what was typed."""
    if not name or "unknown GPU" not in message:
        return message
    from planner.hardware import gpu_table

    def norm(text: str) -> str:
        return re.sub(r"[^a-z0-9]", "", text.lower())

    names = {norm(alias): spec.key for spec in gpu_table() for alias in (spec.key, *spec.aliases)}
    close = list(dict.fromkeys(names[n] for n in difflib.get_close_matches(norm(name), list(names), n=6, cutoff=0.7)))
    hint = f"did you mean {', '.join(close[:3])}?" if close else "no close match"
    return re.sub(r"; known: [^()]*\(see phi3v-plan --list-gpus\)", f"; {hint} (phi3v-plan --list-gpus lists all)", message)


def _flags_that_do_nothing(args: argparse.Namespace) -> list[str]:
    """Flags this invocation would drop without a word (and a --save that would fail after minutes of measuring)."""
    problems = []
    exits = [flag for flag, given in (("--list-gpus", args.list_gpus), ("--levers", args.levers),
                                      ("--calibration", args.calibration), ("--validate", args.validate),
                                      ("--crops_table", args.crops_table)) if given]  # fmt: skip
    if len(exits) > 1:
        problems.append(f"{' and '.join(exits)} are separate reports (the first prints and exits); pass one of them")
    for flag, given in (("--save", args.save is not None), ("--repeats", args.repeats is not None)):
        if given and not args.validate:
            problems.append(f"{flag} belongs to --validate and does nothing without it; add --validate or drop {flag}")
    if args.crops_table and args.data_dir:
        problems.append("--crops_table shows the recipe's tasks; drop --data (a plan with --data shows your data's table)")
    if args.validate and args.save is not None and Path(args.save).expanduser().is_dir():
        problems.append(f"--save {args.save} is a folder; name the result file to write (e.g. {args.save}/validation.json)")
    return problems


def _print_levers(as_json: bool) -> None:
    """``--levers``: what each kernel/compile/per-tower axis is predicted to change, with the published figures."""
    from planner.levers import levers_table, render_levers

    dump(levers_table()) if as_json else print(render_levers())


@handle_errors
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``phi3v-plan``."""
    args = build_parser().parse_args(argv)
    raise_all(_flags_that_do_nothing(args))
    if args.list_gpus or args.levers:
        print_gpus(args.json) if args.list_gpus else _print_levers(args.json)
        return 0
    request = _request(args)
    try:
        request = request.validate()  # resolves --gpu once; plan() and the reports take the card from here
    except ConfigError as exc:
        raise ConfigError(_with_close_gpus(str(exc), args.gpu)) from None
    if args.calibration or args.crops_table:
        (print_calibration if args.calibration else crops_report)(request, args.json)
        return 0
    if args.validate:
        print_validation(args.json, args.repeats or 3, args.save, argv)
        return 0

    from planner.hardware import detect
    from planner.recommend import plan, survey

    if request.states_gpu:
        result = plan(request)
        dump(result.to_dict()) if args.json else _print_plan(result)
        return 0
    detection = detect()
    if detection.ok:
        result = plan(request, detection=detection)
        if args.json:
            out = result.to_dict()
            out["detection"] = detection.to_dict()
            dump(out)
        else:
            _print_plan(result)
        return 0
    # Nothing detected and nothing named: say so plainly, then show the common choices.
    if request.use_trace:
        raise ConfigError(f"{detection.error}; --trace needs a target: pass --gpu NAME")
    azure = request.cloud == "azure"
    plans = survey(replace(request, count=request.count or 8) if azure else request)
    reason = f"No GPU detected: {detection.error}."
    if args.json:
        pick = _pick_sku(plans) if azure else None
        dump(
            {
                "detection": detection.to_dict(),
                "message": reason,
                "plans": [p.to_dict() for p in plans],
                "recommended_sku": pick.azure["vm_size"] if pick and pick.azure else None,
            }
        )
        return 0
    console = make_console()
    if azure:
        console.print(
            f"[yellow]{reason}[/] Comparing the Azure ND SKUs ({plural(request.nodes, 'VM')} each); pass --gpu for one."
        )
        _print_survey(plans, f"Azure ND SKUs, {request.task} (8 GPUs per VM)", azure=True)
        pick = _pick_sku(plans)
        if pick:
            cost = (
                f"${pick.best.cost_usd:,.0f} per run at ${request.price_per_gpu_hour:g} per GPU-hour "
                "(--price-per-gpu-hour)"
                if pick.best.cost_usd
                else "no cost: pass --price-per-gpu-hour"
            )
            label = "Cheapest" if pick.best.cost_usd else "Fastest"
            console.print(
                f"{label} SKU for a run that fits: [bold]{pick.azure['vm_size']}[/] ({pick.best.method}, {cost}; "
                f"{pick.azure['quota_note']})."
            )
            console.print(f"[bold]{pick.best.command}[/]")
    else:
        count = request.count or 1
        console.print(
            f"[yellow]{reason}[/] Showing {plural(count, 'GPU')} per node of common models; pass --gpu NAME to plan for one."
        )
        _print_survey(plans, f"What fits, {request.task}, {plural(count, 'GPU')} x {plural(request.nodes, 'node')}", azure=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
