"""``phi3v-bench selfcheck``: the first command to run on a new machine — does every method train, and do the numbers
that the benchmark and the planner report hold here?

For every method and attention kernel (on CUDA: sdpa, plus flash_attention_2 when flash-attn is installed; on CPU:
sdpa) it trains a few steps on one small fixed batch, in this process, through the real fine-tuning core
(``phi3v_core.training.train``) and the benchmark's own measurement protocol (:mod:`bench.measure`), and checks:

* the loss is finite on every step and falls from the first step to the last (a fixed batch is memorised);
* the measured peak memory is close to ``phi3v-plan``'s prediction for the same configuration
  (:func:`planner.estimate.estimate_memory`): on CUDA ``max_memory_allocated`` over the steps after the first
  (optimizer states exist by then), on CPU the peak bytes of live tensors of one step (:class:`LiveTensorBytes`);
* MFU (CUDA only), from FLOPs traced on fake tensors and the GPU's dense peak.

On CUDA the model is the full-size phi-3.5-vision (random weights) at the DocVQA shape (16 crops) in bf16 (fp16 below
compute capability 8.0); on CPU it is the tiny model. A failed check exits non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.config import TINY_DEFAULTS, BenchConfig, DeviceDescription, choose_defaults
from phi3v_core.constants import METHOD_NAMES
from phi3v_core.io import json_safe

__all__ = [
    "Check",
    "SelfCheckReport",
    "plan_checks",
    "predicted_peak_bytes",
    "run_check",
    "run_check_isolated",
    "run_selfcheck",
]

#: Memory prediction error (percent) beyond which a check fails. The planner's closed form is exact on the tiny model
#: on CPU (no allocator); on a GPU kernels' workspaces and the allocator's rounding add a few percent.
MAX_MEMORY_ERROR_PCT = {"cpu": 10.0, "cuda": 15.0}
#: Learning rates for memorising one fixed batch in a few steps (random weights, fresh LoRA adapters).
SELFCHECK_LR = {"full": 1e-4, "frozen_vision": 1e-4, "lora": 1e-3, "qlora": 1e-3}


@dataclass
class Check:
    """One method x attention check (the fields of ``--json``'s ``checks`` entries).

    Attributes:
        method: Fine-tuning method.
        attn: Attention implementation.
        status: ``ok``, ``fail`` (a check did not hold), ``error`` (it crashed; ``message`` says why) or
            ``skipped`` (phi3v-plan predicts it does not fit this GPU, e.g. full fine-tuning with fp32 master weights
            on one 80 GB card; ``message`` gives the numbers).
        losses: Training loss of every step.
        measured_peak_bytes: Measured peak (CUDA: max_memory_allocated; CPU: live tensor bytes).
        predicted_peak_bytes: ``phi3v-plan``'s prediction of the same quantity.
        memory_error_pct: ``(predicted - measured) / measured * 100``.
        mfu: Model FLOPs utilisation of the steps after the first (CUDA only).
        seconds: Wall time of the check.
        problems: What did not hold.
        message: Error message of a crash.
    """

    method: str
    attn: str
    status: str = "ok"
    losses: list[float | None] = field(default_factory=list)
    measured_peak_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    memory_error_pct: float | None = None
    mfu: float | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    message: str = ""

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

    @property
    def ok(self) -> bool:
        """Whether every check passed (skipped ones aside) and at least one ran."""
        return all(c.status in ("ok", "skipped") for c in self.checks) and any(c.status == "ok" for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (one object, ``checks`` list inside)."""
        return json_safe({
            "ok": self.ok,
            "device": self.device,
            "model": self.model,
            "precision": self.precision,
            "seconds": round(self.seconds, 1),
            "checks": [c.to_dict() for c in self.checks],
        })


def plan_checks(device: DeviceDescription, steps: int = 3) -> list[BenchConfig]:
    """The configurations to check on ``device``: every method x every available attention kernel."""
    values, _reasons = choose_defaults(device)
    attns = ["sdpa"]
    if values["attn"] == "flash_attention_2":
        attns.append("flash_attention_2")
    base = dict(model=values["model"], precision=values["precision"], seq_profile="docvqa",
                num_crops=values.get("num_crops", 16), steps=steps, warmup=1, repeats=1, release="selfcheck",
                out=tempfile.gettempdir())
    if values["model"] == "tiny":
        base.update(num_crops=TINY_DEFAULTS["num_crops"], global_batch=2, micro_batch=2)
    else:
        base.update(global_batch=1, micro_batch=1)
    return [BenchConfig(method=m, attn=a, **base).validate() for m in METHOD_NAMES for a in attns]


def _train_setup(cfg: BenchConfig, cuda: bool) -> Any:
    """The planner's description of the step ``cfg`` trains (single process, as the check runs)."""
    from phi3v_core.training import TrainConfig
    from planner.estimate import TrainSetup

    defaults = TrainConfig(model=cfg.model, output_dir="unused")
    full = cfg.method in ("full", "frozen_vision")
    return TrainSetup(
        method=cfg.method,
        precision=cfg.precision,
        # phi3v-finetune without DeepSpeed keeps fp32 master weights for full/frozen; LoRA bases are 16-bit.
        weight_dtype="fp32" if full else None,
        attn=cfg.attn,
        gradient_checkpointing=cfg.gradient_checkpointing,
        micro_batch=cfg.micro_batch,
        grad_accum=cfg.grad_accum,
        world_size=1,
        zero_stage=0,
        lora_rank=defaults.lora_rank,
        lora_lm_head=defaults.lora_lm_head,
        lora_vision=not defaults.freeze_vision,
        optimizer_foreach=cuda,  # torch's AdamW takes the multi-tensor path only for CUDA tensors
    )


def predicted_peak_bytes(cfg: BenchConfig, seq_len: int, cuda: bool, supervised_tokens: int | None = None) -> int:
    """``phi3v-plan``'s allocated-peak prediction for ``cfg`` at ``seq_len`` tokens per sample (no allocator cache).

    ``supervised_tokens``: labelled positions per sample, where training computes logits (None: the profile's).
    """
    from planner.estimate import Workload, estimate_memory
    from planner.shapes import load_shape

    shape = load_shape(cfg.model)
    profile = cfg.profile
    workload = Workload.from_images(shape, cfg.num_crops, (profile.image_width, profile.image_height),
                                    images=profile.images_per_sample, text_tokens=0)
    answer = profile.answer_tokens if supervised_tokens is None else supervised_tokens
    workload = dataclasses.replace(workload, seq_len=seq_len, supervised_tokens=answer)
    return int(estimate_memory(shape, _train_setup(cfg, cuda), workload).allocated)


def _fits(cfg: BenchConfig, seq_len: int) -> str | None:
    """Why ``cfg`` cannot fit this GPU by phi3v-plan's prediction (``None`` when it fits or on CPU)."""
    if not torch.cuda.is_available():
        return None
    capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    predicted = predicted_peak_bytes(cfg, seq_len, cuda=True)  # the profile's answer length
    # Allocated peak plus the CUDA context and a little allocator slack must fit.
    if predicted * 1.05 + (1 << 30) > capacity:
        return (f"phi3v-plan predicts {predicted / 2**30:.1f} GiB allocated, more than this "
                f"{capacity / 2**30:.0f} GiB GPU holds with context and allocator slack")
    return None


def run_check(cfg: BenchConfig, flop_cache: dict[str, int] | None = None) -> Check:
    """Train ``cfg`` for ``warmup + steps`` steps on one fixed batch and check loss, memory and MFU.

    Args:
        cfg: The configuration (see :func:`plan_checks`).
        flop_cache: Model FLOPs per method, shared between checks (they do not depend on the attention kernel).
    """
    from bench.measure import InstrumentedSteps, step_micro_batches, trace_step_flops
    from bench.worker import _peak_flops, _processor, to_train_config
    from bench.workload import build_workload
    from phi3v_core.training import StepTimer, train

    check = Check(cfg.method, cfg.attn)
    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    first, last = cfg.warmup + 1, cfg.warmup + cfg.steps
    memory_step = None if cuda else last + 1
    total = memory_step or last
    try:
        workload = build_workload(cfg, _processor(cfg), cfg.global_batch)
        example = workload.dataset[0]
        fixed = [example] * (cfg.global_batch * total)  # one fixed batch, every step
        seq_len = int(example["input_ids"].numel())
        supervised = int((example["labels"][1:] != -100).sum())
        too_big = _fits(cfg, seq_len)
        if too_big:
            check.status, check.message = "skipped", too_big
            check.predicted_peak_bytes = predicted_peak_bytes(cfg, seq_len, cuda, supervised)
            return check
        timer = StepTimer()
        probes = InstrumentedSteps(first_timed_step=first, last_timed_step=last, memory_step=memory_step)
        with tempfile.TemporaryDirectory(prefix="phi3v-selfcheck-") as scratch:
            train_cfg = dataclasses.replace(to_train_config(cfg, scratch, total), learning_rate=SELFCHECK_LR[cfg.method])
            train(train_cfg, fixed, callbacks=[timer, probes])
        check.losses = [r.loss for r in timer.records]
        check.measured_peak_bytes = probes.gpu_allocated_bytes if cuda else probes.tensor_peak_bytes
        check.predicted_peak_bytes = predicted_peak_bytes(cfg, seq_len, cuda, supervised)
        if check.measured_peak_bytes:
            check.memory_error_pct = (
                (check.predicted_peak_bytes - check.measured_peak_bytes) / check.measured_peak_bytes * 100.0
            )
        peak_flops = _peak_flops(device, cfg.precision)
        timed = [r.seconds for r in timer.records if first <= r.step <= last]
        if peak_flops and timed:
            cache = flop_cache if flop_cache is not None else {}
            if cfg.method not in cache:
                batches = step_micro_batches(train_cfg, fixed, cfg.micro_batch, cfg.grad_accum)
                cache[cfg.method] = trace_step_flops(train_cfg, batches, with_recompute=False).model_flops
            check.mfu = cache[cfg.method] / sorted(timed)[len(timed) // 2] / peak_flops
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
    problems = []
    losses = check.losses
    if not losses or any(v is None or not math.isfinite(v) for v in losses):
        problems.append(f"loss not finite on every step: {losses}")
    elif not losses[-1] < losses[0]:
        problems.append(f"loss did not fall on a fixed batch: {losses[0]:.4f} -> {losses[-1]:.4f}")
    limit = MAX_MEMORY_ERROR_PCT[kind]
    if check.memory_error_pct is None:
        problems.append("no peak memory measured")
    elif abs(check.memory_error_pct) > limit:
        problems.append(f"memory prediction off by {check.memory_error_pct:+.1f}% (limit ±{limit:g}%)")
    return problems


def run_check_isolated(cfg: BenchConfig, timeout_s: float = 1800.0) -> Check:
    """:func:`run_check` in a fresh process: one check's GPU memory (and allocator state) cannot leak into the next.

    ``timeout_s`` only guards against a hang; a check that exceeds it is an ``error``.
    """
    with tempfile.TemporaryDirectory(prefix="phi3v-selfcheck-") as tmp:
        config = Path(tmp) / "config.json"
        out = Path(tmp) / "check.json"
        config.write_text(json.dumps(cfg.to_dict()))
        command = [sys.executable, "-m", "bench.selfcheck", "--config", str(config), "--out", str(out)]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return Check(cfg.method, cfg.attn, status="error", message=f"no result within {timeout_s:.0f} s")
        if not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            return Check(cfg.method, cfg.attn, status="error",
                         message=f"check process exited {proc.returncode}: {tail[-1] if tail else 'no output'}"[:300])
        return Check(**json.loads(out.read_text()))


def run_selfcheck(
    steps: int = 3,
    device: DeviceDescription | None = None,
    progress: Any = None,
    isolate: bool | None = None,
) -> SelfCheckReport:
    """Run every check on this machine.

    Args:
        steps: Checked steps per configuration after one warmup step.
        device: The machine (detected when omitted).
        progress: Called with each finished :class:`Check` (for live output).
        isolate: Run each check in its own process (default: on CUDA, where a full-size model's memory must be
            returned before the next one; on CPU the tiny model fits easily and process start-ups would dominate).
    """
    start = time.perf_counter()
    device = device or DeviceDescription.detect()
    isolate = device.gpu_name is not None if isolate is None else isolate
    cells = plan_checks(device, steps)
    checks = []
    flop_cache: dict[str, int] = {}
    for cfg in cells:
        check = run_check_isolated(cfg) if isolate else run_check(cfg, flop_cache)
        checks.append(check)
        if progress is not None:
            progress(check)
    return SelfCheckReport(
        device=device.gpu_name or "cpu",
        model=cells[0].model,
        precision=cells[0].precision,
        checks=checks,
        seconds=time.perf_counter() - start,
    )


def main(argv: list[str] | None = None) -> int:
    """One isolated check: ``python -m bench.selfcheck --config cfg.json --out check.json``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    cfg = BenchConfig.from_dict(json.loads(Path(args.config).read_text()))
    check = run_check(cfg)
    from phi3v_core.io import atomic_write_text

    atomic_write_text(args.out, json.dumps(json_safe(check.to_dict())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
