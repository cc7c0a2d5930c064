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
from bench.selfcheck_plan import Machine, check_setup, check_workload, plan_checks
from planner.hardware import qlora_unsupported_reason
from tests.safety_helpers import HANG_GUARD_S

METHODS = ("full", "frozen_vision", "lora", "qlora")

REQUIRED = {"method", "attn", "status", "losses", "measured_peak_bytes", "predicted_peak_bytes", "memory_error_pct",
            "mfu"}


def test_plan_covers_every_method_and_available_kernel() -> None:
    cpu = plan_checks(DeviceDescription())
    assert [(p.config.method, p.config.attn) for p in cpu] == [(m, "sdpa") for m in METHODS]
    assert all(p.config.model == "tiny" and p.form == "full-size" for p in cpu)
    h100 = plan_checks(Machine.from_table("H100-SXM"))
    assert len(h100) == 8 and {p.config.attn for p in h100} == {"sdpa", "flash_attention_2"}
    assert all(p.config.model == "phi-3.5-vision" and p.config.precision == "bf16" for p in h100)
    no_flash = plan_checks(Machine.from_table("A100-80GB", flash_attn_installed=False))
    assert {p.config.attn for p in no_flash} == {"sdpa"}


#: (GPU, per method: the form phi3v-plan's predictions give one card). Full fine-tuning keeps fp32 master weights
#: and AdamW states (16 bytes per parameter, ~62 GiB for 4.15 B parameters) on one card: never full-size.
EXPECTED_FORMS = {
    "H100-SXM": {"full": "reduced", "frozen_vision": "reduced", "lora": "full-size", "qlora": "full-size"},
    "A100-40GB": {"full": "reduced", "frozen_vision": "reduced", "lora": "full-size", "qlora": "full-size"},
    "V100-32GB": {"full": "reduced", "frozen_vision": "reduced", "lora": "full-size", "qlora": "full-size"},
    "T4": {"full": "skipped", "frozen_vision": "reduced", "lora": "full-size", "qlora": "full-size"},
}


@pytest.mark.parametrize("gpu", sorted(EXPECTED_FORMS))
def test_every_method_runs_full_size_reduced_or_is_skipped_with_a_reason(gpu: str) -> None:
    from planner.calibration import load_calibration
    from planner.estimate import estimate_memory
    from planner.layouts import fits_with_headroom
    from planner.shapes import load_shape

    machine = Machine.from_table(gpu)
    planned = plan_checks(machine)
    assert {p.config.method for p in planned} == set(METHODS)
    calibration = load_calibration()
    shape = load_shape("phi-3.5-vision")
    for p in planned:
        assert p.form == EXPECTED_FORMS[gpu][p.config.method], (gpu, p.label, p.reason)
        assert p.reason and p.world_size == 1
        if p.form == "skipped":
            assert p.decoder_layers is None and "phi3v-plan" in p.reason
            continue
        assert p.expected_seconds > 0

        def fits(layers: int, cfg=p.config) -> bool:
            memory = estimate_memory(dataclasses.replace(shape, num_layers=layers), check_setup(cfg, True),
                                     check_workload(cfg, shape), calibration.overheads)
            return fits_with_headroom(memory, machine.memory_bytes, calibration)

        # The depth is the planner's: it fits with the margin, one more layer would not.
        assert fits(p.decoder_layers)
        if p.form == "reduced":
            assert 1 <= p.decoder_layers < shape.num_layers and not fits(p.decoder_layers + 1)
            assert f"{p.decoder_layers} of 32 decoder layers" in p.reason
        else:
            assert p.decoder_layers == shape.num_layers
    # Whole plan within the 10-minute target on one H100 / A100 (by the plan's own estimate).
    if gpu in ("H100-SXM", "A100-40GB"):
        assert sum(p.expected_seconds for p in planned) <= 600


def test_qlora_follows_the_one_support_rule() -> None:
    # A Maxwell card (5.2) is below bitsandbytes' NF4 minimum: QLoRA is skipped with the planner's reason.
    maxwell = Machine(DeviceDescription("Tesla M40 24GB", (5, 2), False), 1, 24 * 2**30)
    qlora = next(p for p in plan_checks(maxwell) if p.config.method == "qlora")
    assert qlora.form == "skipped" and qlora.reason == qlora_unsupported_reason((5, 2))
    # A V100 (7.0) runs it (fp16), as phi3v-plan now says too.
    v100 = next(p for p in plan_checks(Machine.from_table("V100-32GB")) if p.config.method == "qlora")
    assert v100.form == "full-size" and v100.config.precision == "fp16"


def test_two_gpus_add_the_two_process_checks() -> None:
    one = plan_checks(Machine.from_table("A100-80GB", count=1))
    two = plan_checks(Machine.from_table("A100-80GB", count=2))
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
    _assert_report(code, report, {"full", "frozen_vision", "lora", "qlora"})
    assert all(len(check["losses"]) == 4 for check in report["checks"])
    assert report["model"] == "tiny"
    for check in report["checks"]:
        assert abs(check["memory_error_pct"]) <= 10.0
        assert check["mfu"] is None  # no GPU peak to divide by


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_selfcheck_json_on_cuda() -> None:
    """``phi3v-bench selfcheck --json`` on this GPU: every method ran, full-size or depth-reduced, and passed.

    Why it passes on an H100 80 GB, an A100 40 GB and a V100 32 GB by phi3v-plan's own predictions (the same
    numbers :func:`test_every_method_runs_full_size_reduced_or_is_skipped_with_a_reason` asserts on CPU): LoRA
    (14.7 GiB reserved) and QLoRA (8.0 GiB) fit all three full-size; full fine-tuning (fp32 master weights) and
    frozen_vision do not fit one card full-size and run reduced (H100: 23 / 25 of 32 decoder layers, A100-40GB: 9 /
    11, V100: 6 / 8), each within 95 % of the card; QLoRA's NF4 kernels need compute capability 6.0 (bitsandbytes),
    which all three have. On a 16 GB card (T4) not even one decoder layer of full fine-tuning fits: the plan skips
    it with that reason, and this test is skipped there, saying so. Expected duration (the plan's estimate):
    ~9 min on an H100, ~8.5 min on an A100-40GB, ~5.5 min on a V100 (plus ~2 min per 2-process check on a
    multi-GPU node).
    """
    skipped = [p for p in plan_checks(Machine.detect()) if p.form == "skipped"]
    if skipped:
        pytest.skip(f"phi3v-plan: {skipped[0].label} cannot run on this card ({skipped[0].reason})")
    code, report = _run_selfcheck_json()
    _assert_report(code, report, {"full", "frozen_vision", "lora", "qlora"})
    assert report["model"] == "phi-3.5-vision"
    for check in report["checks"]:
        assert check["form"] in ("full-size", "reduced")
        assert check["mfu"] is not None and 0 < check["mfu"] < 1


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


def test_flops_of_a_reduced_model_are_traced_once_and_shared(tmp_path) -> None:
    """MFU's FLOPs: traced on the reduced preset (fewer layers, fewer FLOPs), then read from the shared cache."""
    from bench.selfcheck import reduced_preset, traced_model_flops
    from bench.worker import processor_for, to_train_config
    from bench.workload import build_workload

    cfg = plan_checks(DeviceDescription(), steps=2)[2].config  # lora, tiny model (2 decoder layers)
    fixed = [build_workload(cfg, processor_for(cfg), cfg.global_batch).dataset[0]] * cfg.global_batch
    flops = {}
    for layers in (None, 1):
        with reduced_preset(cfg.model, layers) as model:
            train_cfg = dataclasses.replace(to_train_config(cfg, str(tmp_path), 1), model=model)
            flops[layers] = traced_model_flops(train_cfg, fixed, cfg, tmp_path)
            cache = tmp_path / f"{model}-lora-{cfg.global_batch}.json"
            cache.write_text(json.dumps({"model_flops": 7}))  # a second call reads the cache, never re-traces
            assert traced_model_flops(train_cfg, fixed, cfg, tmp_path) == 7
    assert 0 < flops[1] < flops[None]
