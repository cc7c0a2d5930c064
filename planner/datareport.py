"""What ``phi3v-plan`` prints about data: the ``--data`` section, the num_crops table, and ``--crops-table`` (the
recipe's tasks from their image sizes, for a user without data)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from phi3v_core.cli.vocabulary import plural
from planner.crops import CropsTable, add_costs, crops_table, task_samples
from planner.reports import dump, fmt, make_console
from planner.speed import format_duration

__all__ = ["crops_report", "print_crops_table", "print_data", "print_packing", "workload_text"]


def workload_text(p: Any) -> str:
    """The ``Workload:`` line: the user's data with ``--data``, else the task's profile."""
    w = p.workload
    req = p.request
    params = f"{p.shape.name} ({p.shape.param_counts().total / 1e9:.2f} B parameters)"
    if p.data:
        d = p.data
        st = d["seq_len"]
        return (
            f"your data {d['path']} (--task {d['task']} in the command): {d['samples']:,} samples, num_crops "
            f"{d['num_crops']}, tokens per sample mean {st['mean']:.0f}, max {st['max']:.0f}; hyper-parameters of the "
            f"recipe's {req.task} (--task); {params}"
        )
    crops = w.vision_crops // max(w.images, 1)
    return (
        f"{req.task}, {plural(w.images, 'image')} x {plural(crops, 'crop')}, {w.seq_len} tokens per sample; {params}"
        + (f"; {req.dataset_size:,} samples per epoch" if req.dataset_size else "")
    )


def print_crops_table(console: Any, table: dict[str, Any], title: str) -> None:
    """One num_crops table (``CropsTable.to_dict()``), its recommendation and the rule."""
    from rich.table import Table

    out = Table(title=title)
    costs = table["cost_basis"] is not None
    cols = ["num_crops", "tokens p50", "tokens p95", "upscaled", "downscaled"]
    cols += ["peak GiB", "fits", "epoch"] if costs else []
    for col in cols:
        out.add_column(col, justify="left" if col == "fits" else "right")
    for row in table["rows"]:
        mark = " *" if row["num_crops"] == table["recommended"] else ""
        cells = [
            f"{row['num_crops']}{mark}",
            f"{row['tokens_per_sample']['p50']:,.0f}",
            f"{row['tokens_per_sample']['p95']:,.0f}",
            f"{row['upscaled_share']:.0%}",
            f"{row['downscaled_share']:.0%}",
        ]
        if costs:
            cells += [
                fmt(row["predicted_reserved_gib"]),
                "yes" if row["fits"] else ("no: over the context" if row["over_context"] else "no"),
                format_duration(row["epoch_s"]),
            ]
        out.add_row(*cells)
    console.print(out)
    console.print(f"  * {table['reason']}")
    console.print(f"  images: {table['source']}")
    if costs:
        console.print(f"  memory (a micro-batch of the largest sample) and time per epoch: {table['cost_basis']}")
    for note in table["notes"]:
        console.print(f"  {note}")


def print_data(console: Any, p: Any) -> None:
    """The ``--data`` section: lengths, the num_crops table, the schedule and the samples that fit nowhere."""
    d = p.data
    st = d["seq_len"]
    console.print(
        f"[bold]Data[/]: {d['samples']:,} samples in {d['path']} at num_crops {d['num_crops']}: tokens mean "
        f"{st['mean']:.0f}, p50 {st['p50']:.0f}, p95 {st['p95']:.0f}, max {st['max']:.0f} (text {d['text_tokens']}); "
        f"memory planned for a micro-batch of the largest sample ({d['largest_sample']['seq_len']} tokens, "
        f"{d['largest_sample']['vision_crops']} crops), speed for the mean"
    )
    print_crops_table(console, d["num_crops_table"], "num_crops for your images (* = recommended)")
    for note in d["notes"]:
        console.print(f"  {note}")
    if d["batch_note"]:
        style = "yellow" if d["batch_note"].startswith("warning") else "bold"
        console.print(f"[{style}]batch[/]: {d['batch_note']}")
    if d["schedule"]:
        console.print(f"[bold]schedule[/]: {d['schedule']}")
    if d.get("packing"):
        print_packing(console, d["packing"])
    misfit = d["does_not_fit"]
    if misfit["count"]:
        console.print(
            f"[red]{plural(misfit['count'], 'sample')} fit no micro-batch[/] under {misfit['method']} (micro-batch 1 of the "
            "layout the methods table judged); first ones, with the largest num_crops at which they would fit:"
        )
        for item in misfit["samples"]:
            at = item["fits_at_num_crops"]
            where = f"num_crops {at}" if at is not None else "no num_crops (a larger GPU or more GPUs)"
            console.print(f"  {item['sample']}: {item['seq_len']} tokens → {where}")


def print_packing(console: Any, packing: dict[str, Any]) -> None:
    """Padding of the user's data without and with ``--packing``, and the predicted speed-up, per micro-batch."""
    from rich.table import Table

    longest = packing["longest"]
    out = Table(title=f"Packing your data ({packing['attention']}; * = the recommended micro-batch)")
    cols = ["micro-batch", "padding", "packed", "rows", "speed-up"]
    cols += [f"--pack_tokens {longest}", "rows ", "speed-up "] if longest else []
    for col in cols:
        out.add_column(col, justify="right")

    def cells(row: dict[str, Any]) -> list[str]:
        speed = "-" if row["speed_up"] is None else f"{row['speed_up']:.2f}x" + ("" if row["pays"] else " (no)")
        return [f"{row['padding_fraction_packed']:.0%}", f"{row['rows_per_micro_batch']:.1f}", speed]

    for row in packing["rows"]:
        mark = " *" if row["micro_batch"] == packing["micro_batch"] else ""
        extra = cells(row["at_longest"]) if longest else []
        out.add_row(f"{row['micro_batch']}{mark}", f"{row['padding_fraction_padded']:.0%}", *cells(row), *extra)
    console.print(out)
    chosen = next((r for r in packing["rows"] if r["micro_batch"] == packing["micro_batch"]), None)
    console.print(f"  {chosen['reason'] if chosen else 'the recommended layout runs micro-batch 1: nothing to pack'}")
    console.print(
        "  padding: share of computed tokens that are padding, padded and packed ("
        + ("one flattened row per micro-batch" if packing["attention"] == "flash_attention_2" else "rows of up to each "
           "micro-batch's longest sample, the default budget")
        + "); rows: packed rows per micro-batch; speed-up: predicted real tokens/s packed ÷ padded, (no) under 1.02x"
        + (f"; --pack_tokens {longest}: rows of up to the longest sample, attention over the whole row" if longest else "")
    )


def _task_table(request: Any, task: str, shape: Any, costs: bool) -> CropsTable:
    from phi3v_core.image_sizes import TASK_IMAGES

    samples = task_samples(task)
    table = crops_table(samples, shape, TASK_IMAGES[task].source)
    if not costs:
        return table
    from planner.layouts import dataset_size
    from planner.recommend import plan

    result = plan(replace(request, task=task, num_crops=table.recommended))
    best = result.best
    if best is None or best.setup is None:
        table.notes.append(f"nothing fits on {result.hardware.gpu.key}: no memory or time per epoch")
        return table
    from planner.calibration import load_calibration

    add_costs(
        table, samples, shape, best.setup, result.hardware, load_calibration(request.reference_dir),
        dataset_size(replace(request, task=task)),
        f"{best.method}, micro-batch {best.micro_batch} x {best.grad_accum} on {result.hardware.gpu.key} (the plan at "
        f"num_crops {table.recommended}), {dataset_size(replace(request, task=task)):,} samples per epoch",
    )  # fmt: skip
    return table


def crops_report(
    request: Any, as_json: bool, tasks: tuple[str, ...] = ("docvqa", "nlvr2", "hateful_memes", "ucf101")
) -> None:
    """``phi3v-plan --crops-table``: the num_crops table of each recipe task from its image sizes; memory and time
    per epoch on ``--gpu`` when one is named."""
    from planner.shapes import load_shape

    shape = load_shape(request.model)
    tables = {task: _task_table(request, task, shape, costs=bool(request.gpu)) for task in tasks}
    if as_json:
        dump({task: table.to_dict() for task, table in tables.items()})
        return
    console = make_console()
    for task, table in tables.items():
        print_crops_table(console, table.to_dict(), f"{task}: num_crops (* = recommended by the rule)")
    if not request.gpu:
        console.print("memory and time per epoch: pass --gpu NAME (e.g. --gpu A100-80GB)")
