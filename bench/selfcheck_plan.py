"""What ``phi3v-bench selfcheck`` will run on a machine, decided by ``phi3v-plan``'s own rules (no GPU touched).

Every method is checked on every card. For each method x attention kernel the planner predicts the reserved peak of
the check's step (one process, AdamW with fp32 master weights for full/frozen_vision, a 16-bit base for LoRA, an NF4
base for QLoRA) and sizes the check with a stated margin (:data:`CHECK_MEMORY_SHARE`: reserved peak within 85 % of
the card, and within the planner's own limit), so that a prediction 10 % too low still fits the card - a check
sized to the edge would fail on the planner's error instead of testing the method:

* it fits: the check runs the full-size model (``form="full-size"``);
* it does not: the check runs a depth-reduced copy of the same architecture (``form="reduced"``) - same widths and
  vocabulary, the most decoder layers that still fit - so fp32 master weights, AMP and the method's code path run;
* not even one decoder layer fits, or QLoRA's kernels need a newer GPU
  (:func:`planner.hardware.qlora_unsupported_reason`): ``form="skipped"`` with the reason.

With two or more visible GPUs two 2-process checks are added (torchrun, NCCL): full fine-tuning under DeepSpeed
ZeRO-2 and LoRA under DDP. Each planned check carries an expected duration (the planner's step time plus fixed
allowances, see :data:`CHECK_OVERHEAD_S`), so the command can say how long it will take before it starts.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from functools import cache
from typing import Any

from bench.config import TINY_DEFAULTS, BenchConfig, DeviceDescription, choose_defaults
from phi3v_core.methods import METHOD_NAMES, get_method

__all__ = [
    "CHECK_MEMORY_SHARE",
    "CHECK_OVERHEAD_S",
    "TargetMachine",
    "check_memory_limit",
    "PlannedCheck",
    "check_setup",
    "check_sample_shape",
    "expected_seconds",
    "plan_checks",
]

GIB = 2**30
#: Seconds a check spends besides its training steps - an allowance, not a measurement (no GPU has run this yet):
#: a fresh Python with torch/transformers imported, the model built on the device, the CUDA context, the first
#: step's kernel selection ("cuda"); the tiny model on a CPU ("cpu", "cpu_step": the README's earlier CPU run took
#: 112 s for four checks on a loaded 2-core machine). MFU's FLOPs are counted analytically
#: (:mod:`bench.flops`, milliseconds), so no FLOP trace is budgeted.
CHECK_OVERHEAD_S = {"cuda": 40.0, "cpu": 16.0, "cpu_step": 3.0, "unknown_step": 2.0}


#: Share of the card a check's predicted reserved peak may take. A check measures the method, not the planner's
#: margin: 0.85 x 1.10 = 0.935, so a 10 % under-prediction still leaves the allocator's slack on the card.
CHECK_MEMORY_SHARE = 0.85


def check_memory_limit(capacity: float, calibration: Any) -> float:
    """Bytes a check's predicted reserved peak may reach on a card of ``capacity`` bytes: 85 % of the card, and
    never more than the planner's own limit (:func:`planner.layouts.usable_limit`)."""
    from planner.layouts import usable_limit

    return min(CHECK_MEMORY_SHARE * capacity, usable_limit(capacity, calibration))


@dataclass(frozen=True)
class TargetMachine:
    """The machine a self-check or matrix plans for: what the plan depends on (not the training core's
    :class:`phi3v_core.training.Machine`, which says what one process can run).

    Attributes:
        device: First GPU's name, compute capability and flash-attn (``gpu_name=None``: a CPU).
        gpu_count: GPUs this process can see (``CUDA_VISIBLE_DEVICES`` applied).
        memory_bytes: Memory of the first GPU (None on a CPU).
        bnb: The bitsandbytes library that loads with this torch (None: not installed, or a table machine, whose
            QLoRA follows the what-if rule).
    """

    device: DeviceDescription = dataclasses.field(default_factory=DeviceDescription)
    gpu_count: int = 0
    memory_bytes: float | None = None
    bnb: Any = None

    @classmethod
    def detect(cls, nvml: Any | None = None) -> TargetMachine:
        """This machine, read through NVML (no CUDA context in this process)."""
        from phi3v_core.nvml import visible_devices
        from phi3v_core.software import bnb_library, torch_cuda_build

        device = DeviceDescription.detect()
        if device.gpu_name is None:
            return cls()
        report = visible_devices(nvml)
        memory = report.devices[0].memory_total_bytes if report.devices else None
        return cls(device, max(1, len(report.devices)), memory, bnb_library(torch_cuda_build()))

    @classmethod
    def from_table(cls, gpu: str, count: int = 1, flash_attn_installed: bool = True) -> TargetMachine:
        """A machine of ``count`` GPUs from ``phi3v-plan``'s GPU table (``H100-SXM``, ``T4``, ...)."""
        from planner.hardware import find_gpu, supports_flash_attention

        spec = find_gpu(gpu)
        cc = tuple(spec.compute_capability)
        device = DeviceDescription(spec.name, cc, flash_attn_installed and supports_flash_attention(cc))
        return cls(device, count, spec.memory_bytes)


@dataclass(frozen=True)
class PlannedCheck:
    """One check of the plan.

    Attributes:
        config: The benchmark configuration it trains (``gpus=2`` for a 2-process check).
        form: ``full-size``, ``reduced`` (``decoder_layers`` of the full model's) or ``skipped``.
        decoder_layers: Decoder layers of the model the check builds (None when skipped).
        reason: Why this form (the planner's numbers).
        predicted_reserved_bytes: The planner's reserved peak for the form that runs (None on a CPU).
        expected_seconds: Expected duration (see :data:`CHECK_OVERHEAD_S`).
    """

    config: BenchConfig
    form: str
    decoder_layers: int | None
    reason: str
    predicted_reserved_bytes: float | None = None
    expected_seconds: float = 0.0

    @property
    def world_size(self) -> int:
        """Processes the check trains with."""
        return self.config.world_size

    @property
    def label(self) -> str:
        """``lora · sdpa``, with the form and process count when they are not the default."""
        parts = [self.config.method, self.config.attn]
        if self.form == "reduced":
            parts.append(f"reduced to {self.decoder_layers} decoder layers")
        if self.world_size > 1:
            parts.append(f"{self.world_size} processes ({'ZeRO-2' if _zero2(self.config) else 'DDP'})")
        return " · ".join(parts)


def _zero2(cfg: BenchConfig) -> bool:
    return cfg.world_size > 1 and get_method(cfg.method).supports_deepspeed


def check_setup(cfg: BenchConfig, cuda: bool) -> Any:
    """The planner's description of the step ``cfg`` trains, as the check runs it (one process, or ZeRO-2/DDP)."""
    from phi3v_core.training import TrainConfig
    from planner.train_setup import TrainSetup

    defaults = TrainConfig(model=cfg.model, output_dir="unused")  # the adapter's settings the bench trains with
    # ZeRO-2 buckets: from_workload's default, TrainConfig's 5e7 — the checks are sized with the buckets they run
    return TrainSetup.from_workload(
        cfg, world_size=cfg.world_size, grad_accum=cfg.grad_accum, zero2=_zero2(cfg), cuda=cuda,
        lora_rank=defaults.lora_rank, lora_lm_head=defaults.lora_lm_head, lora_vision=not defaults.freeze_vision,
    )  # fmt: skip


def check_sample_shape(cfg: BenchConfig, shape: Any, seq_len: int | None = None) -> Any:
    """The planner's :class:`~planner.estimate.SampleShape` of one sample of ``cfg``'s profile (``seq_len``: the
    measured length, if known)."""
    from planner.estimate import SampleShape

    profile = cfg.profile
    workload = SampleShape.from_images(shape, cfg.num_crops, (profile.image_width, profile.image_height),
                                       images=profile.images_per_sample, text_tokens=profile.text_tokens,
                                       answer_tokens=profile.answer_tokens or None)
    return workload if seq_len is None else dataclasses.replace(workload, seq_len=seq_len)


@cache
def _planner() -> tuple[Any, Any]:
    from planner.calibration import fit_speed_constants, load_calibration
    from planner.shapes import load_shape

    calibration = load_calibration()
    return calibration, fit_speed_constants(calibration, load_shape("phi-3-vision"))[0]


def _form(cfg: BenchConfig, machine: TargetMachine) -> tuple[str, int | None, str, Any]:
    """(form, decoder layers, reason, planner memory estimate) of one check on a GPU."""
    from planner.estimate import estimate_memory
    from planner.hardware import qlora_unsupported_reason
    from planner.shapes import load_shape

    calibration, _constants = _planner()
    cc = machine.device.compute_capability
    unsupported = qlora_unsupported_reason(cc, machine.bnb) if get_method(cfg.method).quantized else None
    if unsupported:
        return "skipped", None, unsupported, None
    shape = load_shape(cfg.model)
    setup = check_setup(cfg, cuda=True)
    capacity = float(machine.memory_bytes or 0)
    limit = check_memory_limit(capacity, calibration) / GIB
    for layers in range(shape.num_layers, 0, -1):
        memory = estimate_memory(dataclasses.replace(shape, num_layers=layers), setup,
                                 check_sample_shape(cfg, shape), calibration.overheads)
        if memory.reserved / GIB <= limit:
            need = memory.reserved / GIB
            if layers == shape.num_layers:
                return "full-size", layers, (
                f"phi3v-plan: {need:.1f} GiB reserved, check limit {limit:.1f} GiB (85 % of the card)"
                ), memory
            return "reduced", layers, (
                f"the full-size model does not fit 85 % of one {capacity / GIB:.0f} GiB card by phi3v-plan; {layers} "
                f"of {shape.num_layers} decoder layers need {need:.1f} GiB reserved, check limit {limit:.1f} GiB"
            ), memory
    return "skipped", None, (
        f"phi3v-plan: not even one decoder layer fits {limit:.1f} GiB ({memory.reserved / GIB:.1f} GiB reserved)"
    ), memory


def expected_seconds(cfg: BenchConfig, machine: TargetMachine, layers: int | None) -> float:
    """Expected duration of one check of ``layers`` decoder layers: fixed allowances plus the planner's step time
    (see :data:`CHECK_OVERHEAD_S`)."""
    steps = cfg.warmup + cfg.steps
    if machine.device.gpu_name is None:
        return CHECK_OVERHEAD_S["cpu"] + steps * CHECK_OVERHEAD_S["cpu_step"]
    if layers is None:
        return 0.0
    from planner.hardware import match_spec
    from planner.shapes import load_shape
    from planner.speed import Interconnect, predict_speed

    _calibration, constants = _planner()
    shape = dataclasses.replace(load_shape(cfg.model), num_layers=layers)
    cc = machine.device.compute_capability or (0, 0)
    spec = match_spec(machine.device.gpu_name, int(machine.memory_bytes or 0), cc)
    link = Interconnect(cfg.world_size, 1, spec.pcie_gbs or 32.0, False, 25.0, "selfcheck estimate: one node, PCIe")
    speed = predict_speed(shape, check_sample_shape(cfg, shape), check_setup(cfg, cuda=True), spec, link, constants)
    step_s = speed.step_s if speed is not None else CHECK_OVERHEAD_S["unknown_step"]
    return CHECK_OVERHEAD_S["cuda"] + steps * step_s


def plan_checks(machine: TargetMachine | DeviceDescription, steps: int = 3) -> list[PlannedCheck]:
    """Every method x every available attention kernel on ``machine`` (+ the 2-process checks with >= 2 GPUs)."""
    if isinstance(machine, DeviceDescription):
        machine = TargetMachine(machine, 0 if machine.gpu_name is None else 1)
    values, _reasons = choose_defaults(machine.device)
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
    cells = [BenchConfig(method=m, attn=a, **base).validate() for m in METHOD_NAMES for a in attns]
    if machine.device.gpu_name is not None and machine.gpu_count >= 2:
        cells += [BenchConfig(method=m, attn="sdpa", **{**base, "gpus": 2, "global_batch": 2}).validate()
                  for m in ("full", "lora")]
    planned = []
    for cfg in cells:
        if machine.device.gpu_name is None:
            form, layers, reason, memory = "full-size", None, "CPU: the tiny model", None
        else:
            form, layers, reason, memory = _form(cfg, machine)
        seconds = expected_seconds(cfg, machine, layers)
        reserved = memory.reserved if memory is not None and form != "skipped" else None
        planned.append(PlannedCheck(cfg, form, layers, reason, reserved, seconds))
    return planned


def main(argv: list[str] | None = None) -> int:
    """Print the selfcheck plan for GPUs of ``phi3v-plan``'s table: ``python -m bench.selfcheck_plan H100-SXM:8 T4``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("gpus", nargs="+", metavar="GPU[:COUNT]", help="a phi3v-plan GPU key, optionally :count")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    for item in args.gpus:
        name, _, count = item.partition(":")
        machine = TargetMachine.from_table(name, int(count or 1))
        planned = plan_checks(machine, args.steps)
        total = sum(p.expected_seconds for p in planned)
        print(f"{name} x{machine.gpu_count}: {len(planned)} checks, expected ~{total / 60:.1f} min")
        for p in planned:
            print(f"  {p.label:<60} {p.form:<9} ~{p.expected_seconds:3.0f} s  {p.reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
