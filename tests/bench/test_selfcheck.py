"""`phi3v-bench selfcheck`: the plan of checks, the failure rules, and the real command on CPU (slow) and CUDA (gpu)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from bench.config import DeviceDescription
from bench.selfcheck import Check, _problems
from bench.selfcheck_plan import TargetMachine, check_sample_shape, check_setup, plan_checks
from phi3v_core.methods import METHOD_NAMES, get_method
from planner.hardware import qlora_unsupported_reason
from tests.safety_helpers import HANG_GUARD_S

METHODS = METHOD_NAMES

REQUIRED = {"method", "attn", "status", "losses", "measured_peak_bytes", "predicted_peak_bytes", "memory_error_pct",
            "mfu"}


def test_plan_covers_every_method_and_available_kernel() -> None:
    cpu = plan_checks(DeviceDescription())
    assert [(p.config.method, p.config.attn) for p in cpu] == [(m, "sdpa") for m in METHODS]
    assert all(p.config.model == "tiny" and p.form == "full-size" for p in cpu)
    h100 = plan_checks(TargetMachine.from_table("H100-SXM"))
    assert len(h100) == 2 * len(METHODS) and {p.config.attn for p in h100} == {"sdpa", "flash_attention_2"}
    assert all(p.config.model == "phi-3.5-vision" and p.config.precision == "bf16" for p in h100)
    no_flash = plan_checks(TargetMachine.from_table("A100-80GB", flash_attn_installed=False))
    assert {p.config.attn for p in no_flash} == {"sdpa"}


#: (GPU, per method: the form phi3v-plan's predictions give one card at the selfcheck's margin, 85 % of the card).
#: Full fine-tuning keeps fp32 master weights and AdamW states (16 bytes per parameter, ~62 GiB for 4.15 B
#: parameters) on one card: never full-size.
EXPECTED_FORMS = {
    "H100-SXM": {"full": "reduced", "frozen_vision": "reduced", "lora": "full-size", "qlora": "full-size"},
    "A100-40GB": {"full": "reduced", "frozen_vision": "reduced", "lora": "full-size", "qlora": "full-size"},
    "V100-32GB": {"full": "reduced", "frozen_vision": "reduced", "lora": "full-size", "qlora": "full-size"},
    "T4": {"full": "skipped", "frozen_vision": "reduced", "lora": "reduced", "qlora": "full-size"},
}


def _reserved(cfg, machine: TargetMachine, layers: int) -> float:
    from planner.calibration import load_calibration
    from planner.estimate import estimate_memory
    from planner.shapes import load_shape

    shape = load_shape(cfg.model)
    return estimate_memory(dataclasses.replace(shape, num_layers=layers), check_setup(cfg, True),
                           check_sample_shape(cfg, shape), load_calibration().overheads).reserved


def _expected_form(gpu: str, method: str) -> str:
    """A method outside the recipe's four (DoRA) is sized like LoRA: an adapter over a 16-bit base."""
    forms = EXPECTED_FORMS[gpu]
    return forms.get(method, forms["lora" if get_method(method).uses_lora else "full"])


@pytest.mark.parametrize("gpu", sorted(EXPECTED_FORMS))
def test_every_method_runs_full_size_reduced_or_is_skipped_with_a_reason(gpu: str) -> None:
    from bench.selfcheck_plan import check_memory_limit
    from planner.calibration import load_calibration

    machine = TargetMachine.from_table(gpu)
    planned = plan_checks(machine)
    assert {p.config.method for p in planned} == set(METHODS)
    limit = check_memory_limit(machine.memory_bytes, load_calibration())
    for p in planned:
        assert p.form == _expected_form(gpu, p.config.method), (gpu, p.label, p.reason)
        assert p.reason and p.world_size == 1
        if p.form == "skipped":
            assert p.decoder_layers is None and "phi3v-plan" in p.reason
            continue
        assert p.expected_seconds > 0
        # The depth is the planner's: it fits with the margin, one more layer would not.
        assert _reserved(p.config, machine, p.decoder_layers) <= limit
        if p.form == "reduced":
            assert 1 <= p.decoder_layers < 32 and _reserved(p.config, machine, p.decoder_layers + 1) > limit
            assert f"{p.decoder_layers} of 32 decoder layers" in p.reason
        else:
            assert p.decoder_layers == 32
    # Whole plan within 2.5 minutes per registered method on one H100 / A100 (by the plan's own estimate): the
    # 10-minute target of the recipe's four; every method added to the registry adds its checks (DoRA: ~1-2 min).
    if gpu in ("H100-SXM", "A100-40GB"):
        assert sum(p.expected_seconds for p in planned) <= 150 * len(METHODS)


@pytest.mark.parametrize(("gpu", "count"), [("H100-SXM", 1), ("T4", 1), ("H100-SXM", 2)])
def test_checks_are_sized_with_a_margin_a_10_percent_under_prediction_survives(gpu: str, count: int) -> None:
    """Fake cards (H100 80 GB, T4 16 GB, 2 x H100 with the ZeRO-2 check): every check that runs is predicted at
    <= 85 % of the card, so a prediction 10 % too low still fits the card - sized to the edge (the old rule: H100
    full 75.2 of 75.7 GiB, T4 LoRA 14.2 of 14.2, ZeRO-2 76.0 of 76.0) it would not."""
    from bench.selfcheck_plan import CHECK_MEMORY_SHARE

    machine = TargetMachine.from_table(gpu, count=count)
    planned = [p for p in plan_checks(machine) if p.form != "skipped"]
    assert planned and (count == 1 or any("ZeRO-2" in p.label for p in planned))
    for p in planned:
        assert p.predicted_reserved_bytes <= CHECK_MEMORY_SHARE * machine.memory_bytes, p.label
        assert 1.10 * p.predicted_reserved_bytes < machine.memory_bytes, p.label
        assert "85 %" in p.reason
    reduced = [p for p in planned if p.form == "reduced"]
    assert reduced  # each of these cards has checks the margin reduces
    for p in reduced:  # and the margin does not throw away more than one layer's worth
        assert _reserved(p.config, machine, p.decoder_layers + 1) > CHECK_MEMORY_SHARE * machine.memory_bytes


def test_qlora_follows_the_one_support_rule() -> None:
    # A Maxwell card (5.2) is below bitsandbytes' NF4 minimum: QLoRA is skipped with the planner's reason.
    maxwell = TargetMachine(DeviceDescription("Tesla M40 24GB", (5, 2), False), 1, 24 * 2**30)
    qlora = next(p for p in plan_checks(maxwell) if p.config.method == "qlora")
    assert qlora.form == "skipped" and qlora.reason == qlora_unsupported_reason((5, 2))
    # A V100 (7.0) runs it (fp16), as phi3v-plan now says too.
    v100 = next(p for p in plan_checks(TargetMachine.from_table("V100-32GB")) if p.config.method == "qlora")
    assert v100.form == "full-size" and v100.config.precision == "fp16"


def test_two_gpus_add_the_two_process_checks() -> None:
    one = plan_checks(TargetMachine.from_table("A100-80GB", count=1))
    two = plan_checks(TargetMachine.from_table("A100-80GB", count=2))
    assert all(p.world_size == 1 for p in one)
    extra = [p for p in two if p.world_size == 2]
    assert [(p.config.method, p.config.gpus) for p in extra] == [("full", 2), ("lora", 2)]
    assert "ZeRO-2" in extra[0].label and "DDP" in extra[1].label
    # ZeRO-2 shards the optimizer states and casts weights to 16-bit: the check's setup says so.
    setup = check_setup(extra[0].config, True)
    assert setup.zero == 2 and setup.stored_weight_dtype == "bf16" and setup.world_size == 2
    assert len(two) == len(one) + 2


@pytest.mark.parametrize(
    ("losses", "error", "expected"),
    [
        ([3.0, 2.5, 2.0], 1.0, []),
        ([3.0, float("nan"), 2.0], 1.0, ["not finite"]),
        ([3.0, 3.1, 3.2], 1.0, ["did not fall"]),
        ([3.0, 2.0], 25.0, ["memory prediction off by +25.0%"]),
        ([3.0, 2.0], None, ["no peak memory"]),
    ],
)
def test_failure_rules(losses, error, expected) -> None:
    problems = _problems(Check("lora", "sdpa", losses=losses, memory_error_pct=error), "cpu")
    assert len(problems) == len(expected)
    for problem, fragment in zip(problems, expected):
        assert fragment in problem


@pytest.mark.parametrize(
    ("losses", "skipped", "expected"),
    [
        # fp16: the scaler skips the first steps (the weights did not change, the loss stays put), then it falls
        ([3.0, 3.0, 3.0, 2.6], [1, 2], None),
        ([3.0, 3.0, 2.7, 2.5], [1], None),
        # a skipped step's non-finite loss is the overflow the scaler handled, not divergence
        ([float("inf"), 3.0, 2.6], [1], None),
        # the applied steps must still learn
        ([3.0, 3.0, 3.0, 3.1], [1, 2], "did not fall"),
        # one applied step cannot show its own effect: say so rather than pass or blame the method
        ([3.0, 3.0, 3.0, 3.0], [1, 2, 3], "too few to tell"),
        ([3.0, float("nan"), 2.0], [], "not finite"),
    ],
)
def test_the_loss_rule_judges_applied_steps_only(losses, skipped, expected) -> None:
    check = Check("lora", "sdpa", losses=losses, skipped_steps=skipped, memory_error_pct=1.0)
    problems = _problems(check, "cuda")
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0]


def test_a_check_times_its_steps_like_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """selfcheck and the worker share one :class:`TimedWindow`: the window opens before the first timed step's
    clock starts (the selfcheck used to list its timer first)."""
    import bench.measure as measure
    from bench.selfcheck import run_check

    windows = []
    real = measure.TimedWindow.for_layout.__func__

    def recording(cls, layout):  # noqa: ANN001, ANN202
        windows.append(real(cls, layout))
        return windows[-1]

    monkeypatch.setattr(measure.TimedWindow, "for_layout", classmethod(recording))
    cfg = plan_checks(DeviceDescription(), steps=2)[2].config  # lora on the tiny model
    check = run_check(cfg)
    assert check.status == "ok", check
    (window,) = windows
    assert window.callbacks == [window.probes, window.timer]
    assert window.window_before_clock
    assert [r.step for r in window.timed_records()] == [2, 3]  # after one warmup step


def _run_selfcheck_json(*args: str) -> tuple[int, dict]:
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "selfcheck", "--json", *args], capture_output=True, text=True,
                          timeout=HANG_GUARD_S, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]  # exactly one JSON object on stdout
    return proc.returncode, json.loads(lines[0])


def _assert_report(code: int, report: dict, methods: set[str]) -> None:
    assert code == 0, json.dumps(report, indent=1)
    assert report["ok"] is True
    assert {c["method"] for c in report["checks"]} == methods
    for check in report["checks"]:
        assert REQUIRED <= set(check)
        assert check["status"] == "ok", check
        losses = check["losses"]
        assert all(isinstance(v, float) for v in losses) and losses[-1] < losses[0]
        assert check["measured_peak_bytes"] > 0 and check["predicted_peak_bytes"] > 0


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU variant; the gpu test covers CUDA")
def test_selfcheck_json_on_cpu() -> None:
    # Two checked steps instead of the default three (each check: warmup, 2 steps, the memory step): the loss still
    # has to fall on every method, and the --steps option reaches the checks.
    code, report = _run_selfcheck_json("--steps", "2")
    _assert_report(code, report, set(METHODS))
    assert all(len(check["losses"]) == 4 for check in report["checks"])
    assert report["model"] == "tiny"
    for check in report["checks"]:
        assert abs(check["memory_error_pct"]) <= 10.0
        assert check["mfu"] is None  # no GPU peak to divide by


#: Decoder layers of the one selfcheck check the GPU tests run (the same code path as any depth).
SMOKE_LAYERS = 2


@pytest.mark.gpu(seconds=45)  # the plan's own estimate for this check on an H100 (see the CPU test below)
def test_one_selfcheck_check_on_cuda() -> None:
    """The selfcheck's CUDA path in one check: LoRA · sdpa on phi-3.5-vision reduced to 2 decoder layers.

    The whole selfcheck is ``phi3v-bench selfcheck`` (about 9 minutes on an H100), its own command: ``pytest -m gpu``
    only shows that its machinery works here - its own process pinned to one GPU, the worker's timed window, the
    applied-steps loss rule, the planner's memory prediction within 15 %, MFU from the analytic FLOPs. A 2-layer
    LoRA model needs about 3 GiB by phi3v-plan, so it passes on any card the GPU tests target (H100 80 GB, A100
    40 GB, V100 32 GB, T4 16 GB).
    """
    from bench.selfcheck import run_check_isolated

    planned = next(p for p in plan_checks(TargetMachine.detect()) if (p.config.method, p.config.attn) == ("lora", "sdpa"))
    check = run_check_isolated(dataclasses.replace(planned, form="reduced", decoder_layers=SMOKE_LAYERS))
    assert check.status == "ok", check
    assert check.decoder_layers == SMOKE_LAYERS and check.form == "reduced"
    assert check.measured_peak_bytes > 0 and abs(check.memory_error_pct) <= 15
    assert check.mfu is not None and 0 < check.mfu < 1


def test_the_gpu_smoke_check_is_estimated_by_the_plan() -> None:
    """The GPU test's stated seconds cover the plan's own estimate of that check on an H100."""
    from bench.selfcheck_plan import expected_seconds

    machine = TargetMachine.from_table("H100-SXM")
    planned = next(p for p in plan_checks(machine) if (p.config.method, p.config.attn) == ("lora", "sdpa"))
    estimate = expected_seconds(planned.config, machine, SMOKE_LAYERS)
    stated = test_one_selfcheck_check_on_cuda.pytestmark[0].kwargs["seconds"]
    assert 0 < estimate <= stated, (estimate, stated)


def test_skipped_checks_need_a_reason_and_something_must_run() -> None:
    from bench.selfcheck import SelfCheckReport

    ok, skipped = Check("lora", "sdpa", status="ok"), Check("full", "sdpa", status="skipped", message="too big")
    assert SelfCheckReport("gpu", "m", "bf16", [ok, skipped], 1.0).ok
    assert not SelfCheckReport("gpu", "m", "bf16", [ok, Check("full", "sdpa", status="skipped")], 1.0).ok
    assert not SelfCheckReport("gpu", "m", "bf16", [skipped], 1.0).ok
    assert not SelfCheckReport("gpu", "m", "bf16", [ok, Check("qlora", "sdpa", status="error")], 1.0).ok


@pytest.mark.slow
def test_a_reduced_check_runs_in_its_own_process_and_trains_the_reduced_model() -> None:
    """The path CUDA takes (one process per check, ``--layers`` for a depth-reduced one), on the tiny model.

    One check covers both: the child builds the preset with fewer decoder layers through the real training path.
    """
    from bench.selfcheck import run_check_isolated
    from bench.selfcheck_plan import PlannedCheck

    cfg = plan_checks(DeviceDescription(), steps=2)[0].config  # full fine-tuning of the tiny model (2 layers)
    check = run_check_isolated(PlannedCheck(cfg, "reduced", 1, "test: 1 of 2 decoder layers"))
    assert (check.method, check.status, check.form, check.decoder_layers) == ("full", "ok", "reduced", 1), check
    assert check.losses[-1] < check.losses[0]
    # The planner's 1-layer prediction matches what was measured: the model really had one layer.
    assert abs(check.memory_error_pct) <= 10


def test_the_reduced_preset_exists_only_inside_its_block() -> None:
    from bench.selfcheck import reduced_preset
    from phi3v_core.config import MODEL_PRESETS, get_config

    with reduced_preset("tiny", 1) as name:
        assert get_config(name).num_hidden_layers == 1 and get_config("tiny").num_hidden_layers == 2
    assert name not in MODEL_PRESETS and not any(key.endswith("-layers") for key in MODEL_PRESETS)


def test_mfu_flops_of_a_reduced_model_are_counted_for_its_depth(tmp_path) -> None:
    """MFU's FLOPs: counted analytically on the reduced preset (fewer layers, fewer FLOPs), no trace."""
    from bench.selfcheck import reduced_preset, step_model_flops
    from bench.worker import processor_for, to_train_config
    from phi3v_core.training.workload import build_workload

    cfg = plan_checks(DeviceDescription(), steps=2)[2].config  # lora, tiny model (2 decoder layers)
    fixed = [build_workload(cfg, processor_for(cfg), cfg.global_batch).dataset[0]] * cfg.global_batch
    flops = {}
    for layers in (None, 1):
        with reduced_preset(cfg.model, layers) as model:
            train_cfg = dataclasses.replace(to_train_config(cfg, str(tmp_path), 1), model=model)
            flops[layers] = step_model_flops(train_cfg, fixed, cfg)
    assert 0 < flops[1] < flops[None]
