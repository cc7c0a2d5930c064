"""The kernel, compile and per-tower axes of phi3v-bench: flags → config fields, file names, matrix axes, checks,
and the compile time stored apart from the step times."""

from __future__ import annotations

import pytest

from bench.cli import build_parser, config_from_args
from bench.config import IDENTITY_FIELDS, BenchConfig, DeviceDescription
from bench.matrix import parse_grid
from bench.preflight import kernel_problems
from bench.results import RepeatSample
from bench.worker import compile_seconds
from phi3v_core.training.callbacks import StepRecord

CPU = DeviceDescription(None, None, False)


def _config(*flags: str) -> BenchConfig:
    return config_from_args(build_parser().parse_args(["run", *flags]), CPU)[0]


def test_run_flags_set_the_lever_fields_and_name_the_result_file() -> None:
    cfg = _config("--method", "full", "--gradient_checkpointing", "llm", "--freeze_llm", "--vision_lr", "1e-5",
                  "--projector-lr", "2e-5", "--kernels", "liger", "--compile")
    assert (cfg.gradient_checkpointing, cfg.checkpoint_towers, cfg.freeze_llm) == (True, "llm", True)
    assert (cfg.vision_lr, cfg.projector_lr, cfg.kernels, cfg.compile) == (1e-5, 2e-5, "liger", True)
    assert cfg.cell_id().endswith("-gc-llm-only-freeze-llm-liger-compiled")
    plain = _config()
    assert not plain.compile and plain.kernels == "none" and plain.checkpoint_towers == "both"
    assert plain.cell_id().endswith("-gc")  # earlier results keep their names
    off = _config("--no-gradient-checkpointing")
    assert (off.gradient_checkpointing, off.checkpoint_towers) == (False, "both") and off.cell_id().endswith("-nogc")
    assert _config("--gradient-checkpointing").gradient_checkpointing is True


def test_the_levers_are_matrix_axes_and_identity_fields() -> None:
    grid = parse_grid(["kernels=none,liger", "compile=false,true", "checkpoint_towers=both,llm", "freeze_llm=true"])
    assert grid == {"kernels": ["none", "liger"], "compile": [False, True], "checkpoint_towers": ["both", "llm"],
                    "freeze_llm": [True]}
    assert {"kernels", "compile", "checkpoint_towers", "freeze_llm"} <= set(IDENTITY_FIELDS)


def test_bad_lever_values_are_reported_with_the_fix() -> None:
    problems = BenchConfig(kernels="triton", checkpoint_towers="clip", compile=True, warmup=0, vision_lr=2.0).problems()
    assert any("kernels 'triton' is not one of none, liger" in p for p in problems)
    assert any("checkpoint_towers 'clip'" in p for p in problems)
    assert any("compile needs warmup >= 1" in p and "--warmup" in p for p in problems)
    assert any("vision_lr must be a number in (0, 1)" in p for p in problems)
    assert BenchConfig(method="frozen_vision", freeze_llm=True).training_problems()  # trains nothing


def test_liger_is_refused_before_any_worker_on_a_machine_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernel_problems([BenchConfig(kernels="none")]) == []
    (problem,) = kernel_problems([BenchConfig(kernels="liger")])
    assert problem.startswith("--kernels liger needs a CUDA GPU (Liger's kernels are Triton")


def test_compile_seconds_are_the_first_steps_excess_over_a_timed_step() -> None:
    records = {s: StepRecord(step=s, seconds=t, wall_seconds=t, samples=2) for s, t in ((1, 41.0), (2, 1.5), (3, 1.0), (4, 1.2))}
    compiled = BenchConfig(compile=True, warmup=2, steps=2)
    assert compile_seconds(compiled, records, [1.0, 1.2]) == pytest.approx(41.0 - 1.1)
    assert compile_seconds(BenchConfig(), records, [1.0, 1.2]) is None
    assert RepeatSample(step_times_s=[1.0], compile_s=39.9).compile_s == 39.9 and RepeatSample().compile_s is None
