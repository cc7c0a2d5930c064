"""The README's numbers, rendered from stored results and from the planner, so that none can go stale.

Each numbers block of ``README.md`` sits between ``<!-- render:NAME -->`` and ``<!-- /render -->`` and is produced
here: measured figures from a file under ``results/`` (every block names its file, the command that wrote it, the
commit, the date and the machine), computed figures (the planner's predictions, the GPU test count) by running the
code at render time. Everything outside the blocks stays hand-written.

``python -m bench.readme render`` rewrites the blocks in place; ``python -m bench.readme check`` exits 1 naming
the blocks that differ (``tests/bench/test_readme_render.py`` runs the same check).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phi3v_core.errors import DataError
from phi3v_core.io import atomic_write_text

__all__ = ["BLOCKS", "REPO_ROOT", "main", "render_blocks", "render_readme"]

REPO_ROOT = Path(__file__).resolve().parents[1]
VALIDATION = Path("results/validation")
_BLOCK = re.compile(r"(<!-- render:([a-z0-9-]+) -->\n)(.*?)(<!-- /render -->)", re.S)
MIB = 2**20


def _load(root: Path, relative: Path | str) -> dict[str, Any]:
    path = root / relative
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the stored result ({exc}); restore it from git") from None


def _state(sha: str | None, dirty: bool | None) -> str:
    if not sha:
        return "commit not recorded"
    state = {True: " with uncommitted changes (git_dirty)", False: "", None: " (clean or not: not recorded)"}[dirty]
    return f"commit {sha[:7]}{state}"


def _source(path: Path | str, command: str, sha: str | None, dirty: bool | None, date: str, machine: str) -> str:
    """The provenance line every measured block ends with."""
    return (
        f"<sub>Source: `{path}`, written by `{command}` at {_state(sha, dirty)}, {date[:10]}, on {machine}.</sub>"
    )


def _signed(value: float, spec: str = ".1f") -> str:
    return format(value, "+" + spec).replace("-", "−")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


# -- computed: the planner -------------------------------------------------------------------------------------
def _plan_one(gpu: str, method: str) -> tuple[Any, int]:
    """The one method's plan and the images per sample (its speed in img/s is samples/s times that)."""
    from planner.recommend import plan
    from planner.request import PlanRequest

    whole = plan(PlanRequest(gpu=gpu, methods=(method,)))
    return whole.methods[0], max(whole.workload.images, 1)


def _layout_text(mp: Any) -> str:
    text = f"{mp.micro_batch} x {mp.grad_accum}"
    if not mp.gradient_checkpointing:
        text += ", checkpointing off"
    if mp.optim != "adamw":
        text += f", --optim {mp.optim}"
    if mp.offload != "none":
        text += f", --offload {mp.offload}"
    return text


def render_plan_examples(root: Path) -> str:
    """Three ``phi3v-plan`` what-ifs with the figures the planner prints for them now."""
    from planner.memory_types import GIB

    lora, images = _plan_one("H100-SXM", "lora")
    best_gc = max((x for x in lora.layouts if x.fits and x.gradient_checkpointing), key=lambda x: x.samples_per_s)
    full_4090 = _plan_one("RTX4090", "full")[0]
    offload_s = sum(v for k, v in full_4090.speed.times.items() if "CPU Adam" in k or "PCIe" in k)
    full_l40s = _plan_one("L40S", "full")[0]
    plain = min(x.reserved_bytes for x in full_l40s.layouts if x.optim == "adamw" and x.offload == "none")
    lines = [
        "```bash",
        f"phi3v-plan --gpu H100-SXM --method lora   # {_layout_text(lora)}: {lora.speed.samples_per_s * images:.2f} img/s, "
        f"{lora.speed.samples_per_s / best_gc.samples_per_s:.2f}x the checkpointed "
        f"{best_gc.micro_batch} x {best_gc.grad_accum}",
        f"phi3v-plan --gpu RTX4090 --method full    # {_layout_text(full_4090)}: {full_4090.peak_gib:.1f} GiB on the "
        f"card, {full_4090.host_bytes / GIB:.0f} GiB host RAM, +{offload_s:.1f} s per step",
        f"phi3v-plan --gpu L40S --method full       # {_layout_text(full_l40s)}: {full_l40s.peak_gib:.1f} GiB "
        f"(plain AdamW: {plain / GIB:.1f} GiB)",
        "phi3v-bench matrix --grid gradient_checkpointing=on,off optim=adamw,adamw_8bit   # sweep the same axes",
        "```",
        "",
        "<sub>Computed: `phi3v-plan` at render time (`python -m bench.readme render`), not measured.</sub>",
    ]
    return "\n".join(lines)


def _calibration_row(r: dict[str, Any]) -> list[str]:
    role = {"fitted": "fitted", "held_out": "held out"}[r["role"]]
    speed_err = "0 %" if r["role"] == "fitted" else f"{_signed(r['speed_error_pct'])} %"
    if r["memory_saturated"]:
        gb, mem_err = f"{r['published_gb']:g} (card full)", "saturated" + ("" if r["memory_ok"] else ", misses")
    else:
        gb, mem_err = f"{r['published_gb']:g}", f"{_signed(r['memory_error_pct'])} %"
    held = r["memory_held_out_error_pct"]
    if r["memory_role"] == "fitted":
        mem_role = f"fitted; {_signed(held)} % left out"
    else:
        mem_role = "held out" + (f", not modelled: {r['memory_unmodelled_gb']:+.1f} GB" if r["memory_unmodelled_term"]
                                 else "")
    # The row as phi3v-plan --calibration names it: "8xA100-80GB x1" is one node of 8 GPUs, never "A100 x1".
    return [r["row"], role,
            f"{r['published_img_per_s']:.3f}", f"{r['predicted_img_per_s']:.3f}", speed_err, mem_role, gb,
            f"{r['predicted_gb']:.1f}", mem_err]


def render_calibration(root: Path) -> str:
    """``phi3v-plan --calibration``'s table and its held-out speed and memory lines."""
    from planner.calibration import calibration_report, calibration_summary, fit_speed_constants, load_calibration
    from planner.reports import calibration_lines
    from planner.shapes import load_shape

    calibration = load_calibration()
    shape = load_shape("phi-3-vision")
    rows = calibration_report(calibration, shape)
    summary = calibration_summary(rows, fit_speed_constants(calibration, shape)[1])
    header = ["row (GPUs per node x GPU, x nodes)", "speed role", "published img/s", "predicted", "error", "memory role", "published GB",
              "predicted", "error"]
    lines = _table(header, [_calibration_row(r) for r in rows if r["role"] != "excluded"])
    lines += ["", *(f"- {line}" for line in calibration_lines(summary))]
    lines += ["", "<sub>Computed: `phi3v-plan --calibration` at render time against "
              "`results/reference/speed.csv` (published by Microsoft), not measured by this project.</sub>"]
    return "\n".join(lines)


def render_gpu_tests(root: Path) -> str:
    """How many tests ``python -m pytest -m gpu`` runs (collected at render time)."""
    # only the files that mention the marker are collected: importing every test module would take minutes
    files = sorted(str(p.relative_to(root)) for p in (root / "tests").rglob("test_*.py")
                   if "mark.gpu" in p.read_text(encoding="utf-8"))  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        cwd=root, capture_output=True, text=True, check=False,
    )  # fmt: skip
    found = re.search(r"(\d+)/\d+ tests collected", done.stdout) or re.search(r"^(\d+) tests? collected", done.stdout,
                                                                            re.M)
    if not found:
        raise DataError(f"pytest --collect-only -m gpu printed no count: {done.stdout[-300:]}{done.stderr[-300:]}")
    return (
        "```bash\n"
        f"python -m pytest -m gpu                           # the GPU-only tests ({found.group(1)}; `--collect-only` "
        "lists them)\n"
        "phi3v-bench selfcheck --json > selfcheck.json     # every method trains on this card as phi3v-plan predicts\n"
        "```"
    )


def _form(planned: list[Any], method: str) -> str:
    check = next(p for p in planned if p.config.method == method and p.config.attn == "sdpa" and p.world_size == 1)
    if check.form == "reduced":
        return f"reduced, {check.decoder_layers}"
    if check.form == "skipped":
        return "skipped: not one layer fits" if "not even one" in check.reason else f"skipped: {check.reason}"
    return check.form


def render_selfcheck_plan(root: Path) -> str:
    """``python -m bench.selfcheck_plan``'s plan per card: forms per method and the expected duration."""
    from bench.selfcheck_plan import TargetMachine, plan_checks

    rows = []
    for gpu, count in (("H100-SXM", 1), ("A100-40GB", 1), ("V100-32GB", 1), ("T4", 1), ("H100-SXM", 8)):
        planned = plan_checks(TargetMachine.from_table(gpu, count))
        minutes = sum(p.expected_seconds for p in planned) / 60
        two = sum(p.world_size > 1 for p in planned)
        flash = any(p.config.attn == "flash_attention_2" for p in planned)
        checks = f"{len(planned)}" + (" (+ ZeRO-2, DDP)" if two else "") + ("" if flash else " (no flash-attn)")
        if count > 1:
            rows.append([f"{count} × {gpu}", checks, "", "", "", f"~{minutes:.1f} min"])
            continue
        lora = _form(planned, "lora")
        both = lora if lora == _form(planned, "qlora") else f"{lora}; qlora {_form(planned, 'qlora')}"
        rows.append([gpu, checks, _form(planned, "full"), _form(planned, "frozen_vision"), both, f"~{minutes:.1f} min"])
    lines = _table(["card", "checks", "full (decoder layers)", "frozen_vision", "lora, qlora", "expected"], rows)
    lines += ["", "<sub>Computed: `python -m bench.selfcheck_plan H100-SXM A100-40GB V100-32GB T4 H100-SXM:8` at render "
              "time (an estimate, not measured).</sub>"]
    return "\n".join(lines)


# -- measured: stored results ------------------------------------------------------------------------------------
def _case_label(case: str) -> str:
    """``mid full c4 mb1x2`` → ``mid full, 4 crops, micro-batch 1 × 2 accumulation``."""
    model, method, crops, batch, *rest = case.split()
    micro, accum = batch[2:].split("x")
    text = f"{model} {method}, {crops[1:]} crop{'s' if crops[1:] != '1' else ''}, micro-batch {micro}"
    if accum != "1":
        text += f" × {accum} accumulation"
    return text + (", checkpointing off" if rest else "")


def render_cpu_validation(root: Path) -> str:
    """The stored ``phi3v-plan --validate --save`` run: its table and its median."""
    path = VALIDATION / "plan-validate-cpu-AMD-EPYC-2t-20261201.json"
    record = _load(root, path)
    result = record["result"]
    rows = [[_case_label(r["case"]), str(r["seq_len_predicted"]), f"{r['measured_s']:.3f}", f"{r['predicted_s']:.3f}",
             f"{_signed(r['error_pct'])} %"] for r in result["rows"]]
    lines = _table(["config", "tokens", "measured s", "predicted s", "error"], rows)
    lines += ["", f"Median error {result['median_abs_error_pct']:.1f} %, max {result['max_abs_error_pct']:.1f} % "
              f"({result['repeats']} repeat(s) per case).", "",
              _source(path, record["command"], record["git_sha"], record["git_dirty"], record["date"],
                      record["machine"])]
    return "\n".join(lines)


def render_supervised_logits(root: Path) -> str:
    """The stored before/after measurement of supervised-only logits (tiny LoRA on CPU)."""
    path = VALIDATION / "supervised-logits-tiny-lora-cpu.json"
    record = _load(root, path)
    full, sup = record["prediction"]["full"], record["prediction"]["supervised"]
    change = record["step_time_change"]

    def row(label: str, p: dict[str, Any]) -> list[str]:
        return [label, f"{p['measured_tensor_peak_bytes'] / MIB:.1f} MiB", f"{p['allocated_bytes'] / MIB:.1f} MiB",
                f"{p['measured_step_s']:.2f} s", f"{p['step_s']:.2f} s", f"{p['model_flops_per_step'] / 1e9:#.3g} G",
                f"{p['predicted_model_flops_per_step'] / 1e9:#.3g} G"]

    measured_mib = (sup["measured_tensor_peak_bytes"] - full["measured_tensor_peak_bytes"]) / MIB
    predicted_mib = (sup["allocated_bytes"] - full["allocated_bytes"]) / MIB
    rows = [row("all logits (before)", full), row("supervised (after)", sup), [
        "change", f"{_signed(measured_mib)} MiB", f"{_signed(predicted_mib)} MiB "
        f"({_signed(100 * (predicted_mib / measured_mib - 1))} %)", f"{_signed(-100 * change['measured_fraction_saved'])} %",
        f"{_signed(-100 * change['predicted_fraction_saved'])} % ({_signed(change['error_pct'])} %)",
        f"{_signed((sup['model_flops_per_step'] - full['model_flops_per_step']) / 1e9, '.2f')} G",
        f"{_signed((sup['predicted_model_flops_per_step'] - full['predicted_model_flops_per_step']) / 1e9, '.2f')} G"]]
    header = ["", "tensor peak, measured", "predicted", "step, measured (wall)", "predicted (CPU s)", "FLOP replay",
              "predicted FLOPs"]
    lines = [*_table(header, rows), ""]
    for label, side in (("before", "bench_before"), ("after", "bench_after")):
        env = record[side]["environment"]
        command = record["commands"][label]
        lines.append(_source(path, command, env["git_sha"], env["git_dirty"], record[side]["started_at"],
                             f"{env['cpu']}, {env['cpu_count']} threads").replace("<sub>Source:", f"<sub>{label}:"))
    return "\n".join(lines)


def render_checkpointing(root: Path) -> str:
    """Every stored checkpointing on/off measurement (the two ``mid lora c4`` cases of ``--validate``), one per line."""
    lines = []
    for file in sorted((root / VALIDATION).glob("checkpointing-on-off-cpu*.json")):
        path = file.relative_to(root)
        record = _load(root, path)
        result = record.get("result", record)  # files written before save_validation keep the result at the top
        on, off = result["rows"]
        ratio = result["checkpoint_ratios"][0]
        lines.append(
            f"- {record['machine']}: on {on['measured_s']:.3f} s measured / {on['predicted_s']:.3f} s predicted "
            f"({_signed(on['error_pct'])} %), off {off['measured_s']:.3f} s / {off['predicted_s']:.3f} s "
            f"({_signed(off['error_pct'])} %); the on/off ratio {ratio['measured_ratio']:.3f} measured vs "
            f"{ratio['predicted_ratio']:.3f} predicted ({_signed(ratio['error_pct'])} %). "
            + _source(path, record["command"], record.get("git_sha", record.get("commit")), record.get("git_dirty"),
                      record["date"], record["machine"])
        )
        if record.get("provenance_note"):
            lines[-1] = lines[-1].replace(".</sub>", f". {record['provenance_note']}</sub>")
    return "\n".join(lines)


def render_packing(root: Path) -> str:
    """Every stored packed-vs-padded measurement (``python -m bench.packing_measure --save``), one per line."""
    lines = []
    for file in sorted((root / VALIDATION).glob("packing-*.json")):
        path = file.relative_to(root)
        record = _load(root, path)
        r = record["result"]
        if not {"workload", "padded", "packed"} <= set(r):
            continue
        w, pad, pack = r["workload"], r["padded"], r["packed"]
        budget = f"`--pack_tokens {w['pack_tokens']}`" if w["pack_tokens"] else "the default pack budget"
        losses = max((abs(a - b) for a, b in zip(pad["losses"], pack["losses"], strict=True)), default=0.0)
        lines.append(
            f"- {' / '.join(w['tasks'])}, `{w['model_config']}` ({w['method']}, {w['attention']}, {w['precision']}, "
            f"num_crops {w['num_crops']}, micro-batch {w['micro_batch']}, {budget}): "
            f"padding {100 * pad['padding_fraction']:.1f} % → {100 * pack['padding_fraction']:.1f} % of computed "
            f"tokens; step {pad['step_s_median']:.2f} s → {pack['step_s_median']:.2f} s (medians); "
            f"{pad['real_tokens_per_s']:.0f} → {pack['real_tokens_per_s']:.0f} real tokens/s: **{r['speed_up']:.2f}x**; "
            f"{len(pad['losses'])} per-step losses equal within {losses:.1e}. "
            + _source(path, record["command"], record["git_sha"], record["git_dirty"], record["date"],
                      record["machine"])
        )
    return "\n".join(lines)


def render_optimizer_memory(root: Path) -> str:
    """The stored 8-bit AdamW MemTracker measurement."""
    path = VALIDATION / "eight-bit-adamw-memory-cpu.json"
    record = _load(root, path)
    r = record["result"]
    error = r["predicted_peak_bytes"] / r["measured_peak_bytes"] - 1
    text = (
        f"{r['case']} (`planner.validate.eight_bit_adamw_memory`, also run by "
        f"`tests/planner/test_memtracker.py`): MemTracker peak {r['measured_peak_bytes'] / MIB:.1f} MiB, predicted "
        f"{r['predicted_peak_bytes'] / MIB:.1f} MiB ({_signed(100 * error)} %; plain AdamW predicted "
        f"{r['predicted_plain_adamw_bytes'] / MIB:.1f} MiB)."
    )
    return text + "\n\n" + _source(path, record["command"], record["git_sha"], record["git_dirty"], record["date"],
                                   record["machine"])


def render_selfcheck_run(root: Path) -> str:
    """The stored CPU selfcheck: duration, memory errors and losses per method."""
    path = VALIDATION / "selfcheck-cpu-AMD-EPYC-2t-20261201.json"
    record = _load(root, path)
    prov = record.get("provenance") or {}
    errors = ", ".join(f"{c['method']} {_signed(c['memory_error_pct'], '.2f')} %" for c in record["checks"])
    falls = all(c["losses"][-1] < c["losses"][0] for c in record["checks"])
    lora = next(c for c in record["checks"] if c["method"] == "lora")
    text = (
        f"Stored run ({record['device']}, {record['model']} model, {record['precision']}): "
        f"{'passed' if record['ok'] else 'failed'} in {record['seconds']:.0f} s; memory prediction error {errors}; "
        f"the loss {'fell on every method' if falls else 'did not fall on every method'} (lora "
        f"{lora['losses'][0]:.2f} → {lora['losses'][-1]:.2f} in {len(lora['losses'])} steps)."
    )
    note = f" {prov['note']}" if prov.get("note") else ""
    source = _source(path, prov.get("command", "not recorded"), prov.get("git_sha"), prov.get("git_dirty"),
                     prov.get("date", "date not recorded"), prov.get("machine", "machine not recorded"))
    return text + "\n\n" + source.replace(".</sub>", f".{note}</sub>")


def render_cpu_bench_table(root: Path) -> str:
    """The CPU table of ``results/v0.1.0/cpu`` (tiny defaults), with its provenance and dirty state."""
    from bench.store import read_results

    folder = Path("results/v0.1.0/cpu")
    results = sorted(read_results([root / folder]), key=lambda pr: -(pr[1].summary.img_per_s or 0))
    base = min(r.summary.img_per_s for _, r in results)
    rows = []
    for _, r in results:
        s, c = r.summary, r.config
        rows.append([c.method, str(c.nodes), str(c.world_size), c.attn, str(c.global_batch), f"{s.img_per_s:.3f}",
                     f"{s.img_per_s_per_gpu:.3f}", f"{s.img_per_s / base:.2f}x",
                     f"{s.peak_cpu_rss_bytes / 2**30:.1f}", "–"])
    header = ["Method", "# nodes", "GPUs", "Attention kernel", "Effective batch", "img/s", "img/s/GPU", "Speed-up",
              "Peak GiB (CPU RSS)", "MFU [counted]"]
    envs = [r.environment for _, r in results]
    shas = sorted({e.git_sha for e in envs if e.git_sha})
    dirty = any(e.git_dirty for e in envs)
    dates = sorted(r.started_at for _, r in results)
    source = _source(folder, "phi3v-bench run --method {full,lora,qlora}", ", ".join(shas), dirty, dates[0],
                     f"{envs[0].cpu}, {envs[0].cpu_count} threads")
    return "\n".join([*_table(header, rows), "", source])


BLOCKS: dict[str, Callable[[Path], str]] = {
    "plan-examples": render_plan_examples,
    "calibration": render_calibration,
    "cpu-validation": render_cpu_validation,
    "supervised-logits": render_supervised_logits,
    "checkpointing": render_checkpointing,
    "packing": render_packing,
    "optimizer-memory": render_optimizer_memory,
    "gpu-tests": render_gpu_tests,
    "selfcheck-plan": render_selfcheck_plan,
    "selfcheck-run": render_selfcheck_run,
    "cpu-bench-table": render_cpu_bench_table,
}


def render_blocks(text: str, root: Path = REPO_ROOT, only: set[str] | None = None) -> dict[str, tuple[str, str]]:
    """``name → (in the README, rendered now)`` for every block of ``text`` (or those in ``only``).

    Raises:
        DataError: A block names no renderer, or a renderer's stored result is missing.
    """
    out: dict[str, tuple[str, str]] = {}
    for match in _BLOCK.finditer(text):
        name = match.group(2)
        if name not in BLOCKS:
            raise DataError(f"README block <!-- render:{name} -->: no such renderer; use one of {', '.join(BLOCKS)}")
        if only is None or name in only:
            out[name] = (match.group(3), BLOCKS[name](root).rstrip("\n") + "\n")
    return out


def render_readme(text: str, root: Path = REPO_ROOT) -> str:
    """``text`` with every numbers block re-rendered (the rest untouched)."""
    rendered = {name: new for name, (_old, new) in render_blocks(text, root).items()}
    return _BLOCK.sub(lambda m: m.group(1) + rendered[m.group(2)] + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.readme render|check [--readme PATH]``."""
    parser = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("render", "check"))
    parser.add_argument("--readme", default=str(REPO_ROOT / "README.md"))
    args = parser.parse_args(argv)
    path = Path(args.readme)
    text = path.read_text(encoding="utf-8")
    if args.action == "render":
        atomic_write_text(path, render_readme(text))
        print(f"rendered {len(_BLOCK.findall(text))} block(s) into {path}")
        return 0
    stale = [name for name, (old, new) in render_blocks(text).items() if old != new]
    if stale:
        print(f"{path}: stale block(s) {', '.join(stale)}; run python -m bench.readme render", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
