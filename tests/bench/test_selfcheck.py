"""`phi3v-bench selfcheck`: the plan of checks, the failure rules, and the real command on CPU (slow) and CUDA (gpu)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bench.config import DeviceDescription
from bench.selfcheck import Check, _problems, plan_checks

REQUIRED = {"method", "attn", "status", "losses", "measured_peak_bytes", "predicted_peak_bytes", "memory_error_pct",
            "mfu"}


def test_plan_covers_every_method_and_available_kernel() -> None:
    cpu = plan_checks(DeviceDescription())
    assert [(c.method, c.attn) for c in cpu] == [(m, "sdpa") for m in ("full", "frozen_vision", "lora", "qlora")]
    assert all(c.model == "tiny" for c in cpu)
    h100 = plan_checks(DeviceDescription("NVIDIA H100 80GB HBM3", (9, 0), True))
    assert len(h100) == 8 and {c.attn for c in h100} == {"sdpa", "flash_attention_2"}
    assert all(c.model == "phi-3.5-vision" and c.precision == "bf16" and c.num_crops == 16 for c in h100)
    no_flash = plan_checks(DeviceDescription("NVIDIA A100-SXM4-80GB", (8, 0), False))
    assert {c.attn for c in no_flash} == {"sdpa"}


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


def _run_selfcheck_json() -> tuple[int, dict]:
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "selfcheck", "--json"], capture_output=True, text=True,
                          timeout=3600, env=env)  # a hang guard only
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
    code, report = _run_selfcheck_json()
    _assert_report(code, report, {"full", "frozen_vision", "lora", "qlora"})
    assert report["model"] == "tiny"
    for check in report["checks"]:
        assert abs(check["memory_error_pct"]) <= 10.0
        assert check["mfu"] is None  # no GPU peak to divide by


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_selfcheck_json_on_cuda() -> None:
    code, report = _run_selfcheck_json()
    _assert_report(code, report, {"full", "frozen_vision", "lora", "qlora"})
    assert report["model"] == "phi-3.5-vision"
    for check in report["checks"]:
        assert check["mfu"] is not None and 0 < check["mfu"] < 1


def test_skipped_checks_do_not_fail_but_something_must_run() -> None:
    from bench.selfcheck import SelfCheckReport

    ok, skipped = Check("lora", "sdpa", status="ok"), Check("full", "sdpa", status="skipped", message="too big")
    assert SelfCheckReport("gpu", "m", "bf16", [ok, skipped], 1.0).ok
    assert not SelfCheckReport("gpu", "m", "bf16", [skipped], 1.0).ok
    assert not SelfCheckReport("gpu", "m", "bf16", [ok, Check("qlora", "sdpa", status="error")], 1.0).ok


@pytest.mark.slow
def test_isolated_check_runs_in_its_own_process() -> None:
    # The path CUDA takes (one process per check), exercised on the tiny model.
    from bench.selfcheck import run_check_isolated

    cfg = plan_checks(DeviceDescription(), steps=2)[2]
    check = run_check_isolated(cfg)
    assert (check.method, check.status) == ("lora", "ok"), check
    assert check.losses[-1] < check.losses[0] and abs(check.memory_error_pct) <= 10
