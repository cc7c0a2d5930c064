"""``phi3v-bench selfcheck``: the first command to run on a new machine - does every method train, and do the numbers
that the benchmark and the planner report hold here?

The plan (:mod:`bench.selfcheck_plan`) covers every method and attention kernel (on CUDA: sdpa, plus
flash_attention_2 when flash-attn is installed; on CPU: sdpa), each on the full-size model where ``phi3v-plan``
says it fits one card, else on a depth-reduced copy of the same architecture, else skipped with the reason; with two
or more GPUs it adds 2-process checks (DeepSpeed ZeRO-2 for full fine-tuning, DDP for LoRA). Each check trains a
few steps on one small fixed batch through the real fine-tuning core (``phi3v_core.training.train``) and the
benchmark's own measurement protocol (:mod:`bench.measure`), and checks:

* the loss is finite and falls from the first step to the last (a fixed batch is memorised), judged over the steps
  whose update was applied: an fp16 loss scaler skips the first steps by design, and a skipped step changes nothing;
* the measured peak memory is close to ``phi3v-plan``'s prediction for the same configuration
  (:func:`planner.estimate.estimate_memory`): on CUDA ``max_memory_allocated`` over the steps after the first
  (optimizer states exist by then), on CPU the peak bytes of live tensors of one step (:class:`LiveTensorBytes`);
* MFU (CUDA only), from the step's FLOPs counted analytically (:func:`bench.measure.analytic_step_flops`, the
  same count ``phi3v-bench run`` uses) and the GPU's dense peak.

On CUDA the model is phi-3.5-vision (random weights) at the DocVQA shape (16 crops) in bf16 (fp16 below compute
capability 8.0), each check in its own process pinned to one GPU; on CPU it is the tiny model. The expected duration
is printed before the first check and one progress line per check (stderr: ``--json`` keeps stdout for the report).
A failed check exits non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.config import BenchConfig, DeviceDescription
from bench.selfcheck_plan import PlannedCheck, TargetMachine, check_sample_shape, check_setup, plan_checks
from phi3v_core.io import json_safe
from phi3v_core.methods import get_method

__all__ = [
    "Check",
    "SelfCheckReport",
    "plan_checks",
    "predicted_peak_bytes",
    "reduced_preset",
    "run_check",
    "run_check_isolated",
    "run_selfcheck",
    "step_model_flops",
]

#: Memory prediction error (percent) beyond which a check fails. The planner's closed form is exact on the tiny model
#: on CPU (no allocator); on a GPU kernels' workspaces and the allocator's rounding add a few percent.
MAX_MEMORY_ERROR_PCT = {"cpu": 10.0, "cuda": 15.0}
#: Learning rates for memorising one fixed batch in a few steps: random weights train at the first, fresh adapters
#: (B starts at zero-ish) need the second.
SELFCHECK_LR = {"weights": 1e-4, "adapters": 1e-3}


def selfcheck_lr(method: str) -> float:
    """The learning rate a check of ``method`` memorises its fixed batch with (:data:`SELFCHECK_LR`)."""
    return SELFCHECK_LR["adapters" if get_method(method).uses_lora else "weights"]


@dataclass
class Check:
    """One method x attention check (the fields of ``--json``'s ``checks`` entries).

    Attributes:
        method: Fine-tuning method.
        attn: Attention implementation.
        status: ``ok``, ``fail`` (a check did not hold), ``error`` (it crashed; ``message`` says why) or
            ``skipped`` (``message`` says why: phi3v-plan predicts not even one decoder layer fits, or the GPU is
            too old for the method's kernels).
        form: ``full-size`` (the real depth), ``reduced`` (``decoder_layers`` decoder layers, same widths and
            vocabulary: the full-size model does not fit one card by phi3v-plan) or ``skipped``.
        decoder_layers: Decoder layers of the model that trained (None when skipped or on the tiny CPU model).
        world_size: Processes (2: torchrun with NCCL, ZeRO-2 for full fine-tuning, DDP for LoRA).
        expected_seconds: The plan's expected duration.
        losses: Training loss of every step.
        skipped_steps: 1-based steps whose optimizer update the fp16 loss scaler skipped (excluded from the
            loss rule: they changed no weight).
        measured_peak_bytes: Measured peak (CUDA: max_memory_allocated; CPU: live tensor bytes).
        predicted_peak_bytes: ``phi3v-plan``'s prediction of the same quantity.
        memory_error_pct: ``(predicted - measured) / measured * 100``.
        mfu: Model FLOPs utilisation of the steps after the first (CUDA only).
        seconds: Wall time of the check.
        problems: What did not hold.
        message: Error message of a crash, or why the check was skipped / reduced.
    """

    method: str
    attn: str
    status: str = "ok"
    form: str = "full-size"
    decoder_layers: int | None = None
    world_size: int = 1
    expected_seconds: float = 0.0
    losses: list[float | None] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    measured_peak_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    memory_error_pct: float | None = None
    mfu: float | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    message: str = ""

    @property
    def label(self) -> str:
        """``full · sdpa · reduced to 9 decoder layers`` (form and processes only when not the default)."""
        parts = [self.method, self.attn]
        if self.form == "reduced":
            parts.append(f"reduced to {self.decoder_layers} decoder layers")
        if self.world_size > 1:
            parts.append(f"{self.world_size} processes")
        return " · ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclass
class SelfCheckReport:
    """All checks plus what they ran on."""

    device: str
    model: str
    precision: str
    checks: list[Check]
    seconds: float
    expected_seconds: float = 0.0
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every check passed or was skipped with a reason, and at least one ran."""
        return all(c.status == "ok" or (c.status == "skipped" and c.message) for c in self.checks) and any(
            c.status == "ok" for c in self.checks
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (one object, ``checks`` list inside)."""
        return json_safe({
            "ok": self.ok,
            "device": self.device,
            "model": self.model,
            "precision": self.precision,
            "seconds": round(self.seconds, 1),
            "expected_seconds": round(self.expected_seconds),
            "checks": [c.to_dict() for c in self.checks],
            "provenance": self.provenance,
        })


def predicted_peak_bytes(
    cfg: BenchConfig, seq_len: int, cuda: bool, layers: int | None = None, supervised_tokens: int | None = None
) -> int:
    """``phi3v-plan``'s allocated-peak prediction for ``cfg`` (``layers`` decoder layers) at ``seq_len`` tokens.

    ``supervised_tokens``: labelled positions per sample, where training computes logits (None: the profile's).
    """
    from planner.estimate import estimate_memory
    from planner.shapes import load_shape

    shape = load_shape(cfg.model)
    if layers is not None:
        shape = dataclasses.replace(shape, num_layers=layers)
    workload = check_sample_shape(cfg, shape, seq_len)
    if supervised_tokens is not None:
        workload = dataclasses.replace(workload, supervised_tokens=supervised_tokens)
    return int(estimate_memory(shape, check_setup(cfg, cuda), workload).allocated)


@contextlib.contextmanager
def reduced_preset(model: str, layers: int | None) -> Iterator[str]:
    """A model preset name for ``model`` with ``layers`` decoder layers (same widths, vocabulary and vision tower).

    Registered in :data:`phi3v_core.config.MODEL_PRESETS` for the duration of the block, so the real training path
    (``build_model``, the FLOP trace) builds it like any preset; ``layers=None`` yields ``model`` unchanged.
    """
    if layers is None:
        yield model
        return
    from phi3v_core.config import MODEL_PRESETS

    name = f"{model}-{layers}-layers"
    MODEL_PRESETS[name] = functools.partial(MODEL_PRESETS[model], num_hidden_layers=layers)
    try:
        yield name
    finally:
        MODEL_PRESETS.pop(name, None)


def step_model_flops(train_cfg: Any, fixed: list[Any], cfg: BenchConfig) -> int:
    """Model FLOPs of one step of the check (its depth, its batch), counted analytically: no trace, milliseconds."""
    from bench.flop_count import analytic_step_flops, step_micro_batches

    batches = step_micro_batches(train_cfg, fixed, cfg.micro_batch, cfg.grad_accum)
    return int(analytic_step_flops(train_cfg, batches).model_flops)


def run_check(cfg: BenchConfig, layers: int | None = None) -> Check:
    """Train ``cfg`` for ``warmup + steps`` steps on one fixed batch and check loss, memory and MFU.

    Args:
        cfg: The configuration (see :func:`plan_checks`).
        layers: Decoder layers of a depth-reduced model (None: the model as it is).
    """
    from bench.measure import TimedWindow
    from bench.worker import peak_flops, plan_steps, processor_for
    from phi3v_core.device import local_device
    from phi3v_core.training import train
    from phi3v_core.training.workload import build_workload, to_train_config

    check = Check(cfg.method, cfg.attn, form="full-size" if layers is None else "reduced", decoder_layers=layers,
                  world_size=cfg.world_size)
    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = local_device(cuda)
    layout = plan_steps(cfg, cuda)  # the worker's layout: warmup, timed window, then the CPU memory step
    total = int(layout["total"] or 1)
    try:
        workload = build_workload(cfg, processor_for(cfg), cfg.global_batch)
        example = workload.dataset[0]
        fixed = [example] * (cfg.global_batch * total)  # one fixed batch, every step
        seq_len = int(example["input_ids"].numel())
        supervised = int((example["labels"][1:] != -100).sum())
        # The worker's callbacks in the worker's order: the window opens before the first timed step's clock.
        window = TimedWindow.for_layout(layout)
        timer, probes = window.timer, window.probes
        with reduced_preset(cfg.model, layers) as model, tempfile.TemporaryDirectory(prefix="phi3v-selfcheck-") as tmp:
            train_cfg = dataclasses.replace(to_train_config(cfg, tmp, total), model=model,
                                            learning_rate=selfcheck_lr(cfg.method))
            train(train_cfg, fixed, callbacks=window.callbacks)
            check.losses = [r.loss for r in timer.records]
            check.skipped_steps = [r.step for r in timer.records if r.skipped]
            check.measured_peak_bytes = probes.gpu_allocated_bytes if cuda else probes.tensor_peak_bytes
            check.predicted_peak_bytes = predicted_peak_bytes(cfg, seq_len, cuda, layers, supervised)
            if check.measured_peak_bytes:
                check.memory_error_pct = (
                    (check.predicted_peak_bytes - check.measured_peak_bytes) / check.measured_peak_bytes * 100.0
                )
            peak = peak_flops(device, cfg.precision)
            timed = [r.seconds for r in window.timed_records()]
            if peak and timed and int(os.environ.get("RANK", "0")) == 0:
                flops = step_model_flops(train_cfg, fixed, cfg)
                check.mfu = flops / sorted(timed)[len(timed) // 2] / peak
    except Exception as exc:  # noqa: BLE001 - one failing method must not hide the others
        check.status = "error"
        check.message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    finally:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    check.seconds = time.perf_counter() - start
    if check.status == "ok":
        check.problems = _problems(check, "cuda" if cuda else "cpu")
        check.status = "fail" if check.problems else "ok"
    return check


def _problems(check: Check, kind: str) -> list[str]:
    problems = list(_loss_problems(check.losses, check.skipped_steps))
    limit = MAX_MEMORY_ERROR_PCT[kind]
    if check.memory_error_pct is None:
        problems.append("no peak memory measured")
    elif abs(check.memory_error_pct) > limit:
        problems.append(f"memory prediction off by {check.memory_error_pct:+.1f}% (limit ±{limit:g}%)")
    return problems


def _loss_problems(losses: list[float | None], skipped_steps: list[int]) -> list[str]:
    """The loss rule over the *applied* steps (1-based ``skipped_steps`` excluded).

    A step's loss is computed before its own update, so the loss of the last applied step shows every applied
    update before it; it must be below the loss of the first applied step. A skipped step changed no weight (the
    fp16 scaler halves its scale and retries), so it can neither fail nor pass the rule.
    """
    skipped = set(skipped_steps)
    applied = [loss for step, loss in enumerate(losses, 1) if step not in skipped]
    if not losses or any(v is None or not math.isfinite(v) for v in applied):
        return [f"loss not finite on every applied step: {losses}"]
    if len(applied) < 2:
        return [f"only {len(applied)} of {len(losses)} steps applied an update (the fp16 loss scaler skipped steps "
                f"{sorted(skipped)}): too few to tell whether the loss falls; run more steps (--steps)"]
    if not applied[-1] < applied[0]:
        note = f" (applied steps only; skipped {sorted(skipped)})" if skipped else ""
        return [f"loss did not fall on a fixed batch: {applied[0]:.4f} -> {applied[-1]:.4f}{note}"]
    return []


def _command(planned: PlannedCheck, config: Path, out: Path) -> list[str]:
    """One check's command: ``python -m bench.selfcheck`` (pinned to one GPU), or torchrun for a 2-process check."""
    args = ["-m", "bench.selfcheck", "--config", str(config), "--out", str(out)]
    if planned.form == "reduced" and planned.decoder_layers is not None:
        args += ["--layers", str(planned.decoder_layers)]
    if planned.world_size == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={planned.world_size}", *args]


def run_check_isolated(planned: PlannedCheck | BenchConfig, timeout_s: float = 1800.0) -> Check:
    """:func:`run_check` in a fresh process: one check's GPU memory (and allocator state) cannot leak into the next.

    A single-process check is pinned to the first visible GPU (:func:`bench.pinning.single_process_env`); a
    2-process check runs under torchrun on the first two. ``timeout_s`` only guards against a hang; a check that
    exceeds it is an ``error``.
    """
    from bench.pinning import single_process_env

    if isinstance(planned, BenchConfig):
        planned = PlannedCheck(planned, "full-size", None, "")
    cfg = planned.config
    with tempfile.TemporaryDirectory(prefix="phi3v-selfcheck-") as tmp:
        config = Path(tmp) / "config.json"
        out = Path(tmp) / "check.json"
        config.write_text(json.dumps(cfg.to_dict()))
        env = single_process_env() if planned.world_size == 1 else dict(os.environ)
        command = _command(planned, config, out)
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            return Check(cfg.method, cfg.attn, status="error", form=planned.form, decoder_layers=planned.decoder_layers,
                         world_size=planned.world_size, message=f"no result within {timeout_s:.0f} s")
        if not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            return Check(cfg.method, cfg.attn, status="error", form=planned.form,
                         decoder_layers=planned.decoder_layers, world_size=planned.world_size,
                         message=f"check process exited {proc.returncode}: {tail[-1] if tail else 'no output'}"[:300])
        return Check(**json.loads(out.read_text()))


def _skipped(planned: PlannedCheck) -> Check:
    cfg = planned.config
    return Check(cfg.method, cfg.attn, status="skipped", form="skipped", world_size=planned.world_size,
                 message=planned.reason)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_selfcheck(
    steps: int = 3,
    device: DeviceDescription | TargetMachine | None = None,
    progress: Callable[[Check], None] | None = None,
    isolate: bool | None = None,
    log: Callable[[str], None] = _stderr,
    command: str = "bench.selfcheck.run_selfcheck()",
) -> SelfCheckReport:
    """Run every check of :func:`plan_checks` on this machine.

    Args:
        steps: Checked steps per configuration after one warmup step.
        device: The machine (detected when omitted).
        progress: Called with each finished :class:`Check` (for live output).
        isolate: Run each check in its own process (default: on CUDA, where a full-size model's memory must be
            returned before the next one; on CPU the tiny model fits easily and process start-ups would dominate).
            2-process checks always run in their own processes.
        log: Where the expected duration and one line per check go (default: stderr, so ``--json`` stays clean).
        command: The command line recorded in the report's ``provenance`` (with commit, date and machine).
    """
    from phi3v_core.environment import capture_environment, utc_now

    start = time.perf_counter()
    started = utc_now()
    if isinstance(device, TargetMachine):
        machine = device
    else:
        machine = TargetMachine.detect() if device is None else plan_machine(device)
    isolate = machine.device.gpu_name is not None if isolate is None else isolate
    plan = plan_checks(machine, steps)
    expected = sum(p.expected_seconds for p in plan)
    log(f"selfcheck: {len(plan)} checks on {machine.device.gpu_name or 'cpu'}, expected ~{expected / 60:.1f} min "
        "(phi3v-plan's step times plus fixed allowances; an estimate)")
    checks = []
    for i, planned in enumerate(plan, 1):
        prefix = f"[{i}/{len(plan)}] {planned.label}"
        if planned.form == "skipped":
            check = _skipped(planned)
        else:
            log(f"{prefix}: running ({planned.form}, expected ~{planned.expected_seconds:.0f} s)")
            layers = planned.decoder_layers if planned.form == "reduced" else None
            if isolate or planned.world_size > 1:
                check = run_check_isolated(planned)
            else:
                check = run_check(planned.config, layers)
        check.expected_seconds = planned.expected_seconds
        check.decoder_layers = check.decoder_layers or planned.decoder_layers  # full-size: the model's own
        if planned.form == "reduced" and not check.message:
            check.message = planned.reason
        log(f"{prefix}: {check.status} ({check.seconds:.0f} s){': ' + check.message if check.status != 'ok' else ''}")
        checks.append(check)
        if progress is not None:
            progress(check)
    cfg = plan[0].config
    env = capture_environment()
    provenance = {"command": command, "git_sha": env.git_sha, "git_dirty": env.git_dirty, "date": started,
                  "machine": env.hardware}
    return SelfCheckReport(device=machine.device.gpu_name or "cpu", model=cfg.model, precision=cfg.precision,
                           checks=checks, seconds=time.perf_counter() - start, expected_seconds=expected,
                           provenance=provenance)


def plan_machine(device: DeviceDescription) -> TargetMachine:
    """A :class:`TargetMachine` for a bare device description: its memory from ``phi3v-plan``'s GPU table, one GPU."""
    if device.gpu_name is None:
        return TargetMachine(device)
    from planner.hardware import match_spec

    spec = match_spec(device.gpu_name, 0, device.compute_capability or (0, 0))
    return TargetMachine(device, 1, spec.memory_bytes)


def main(argv: list[str] | None = None) -> int:
    """One isolated check: ``python -m bench.selfcheck --config cfg.json --out check.json [--layers N]``.

    Under torchrun every rank trains; rank 0 writes the result.
    """
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of a depth-reduced model")
    args = parser.parse_args(argv)
    cfg = BenchConfig.from_dict(json.loads(Path(args.config).read_text()))
    check = run_check(cfg, args.layers)
    if int(os.environ.get("RANK", "0")) == 0:
        from phi3v_core.io import atomic_write_text

        atomic_write_text(args.out, json.dumps(json_safe(check.to_dict())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
