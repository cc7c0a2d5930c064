"""A GPU that torch cannot use is refused before anything is built, never silently replaced by the CPU.

A fake NVML reports one H100 on this CPU machine (torch here is a CPU build): ``phi3v-bench run`` and ``selfcheck``
stop with one line naming the driver's CUDA version, torch's build and the fix; nothing is measured or written.
"""

from __future__ import annotations

import sys

import pytest
import torch

import bench.runner
from bench.cli import main
from tests.planner.conftest import FakeDevice, FakeNVML
from tests.safety_helpers import expect_user_error

H100 = [FakeDevice("NVIDIA H100 80GB HBM3", 80 * 2**30, (9, 0), nvlinks=18)]


@pytest.fixture
def one_h100(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML sees one H100 (driver 550, CUDA 12.4); torch cannot use it; measuring would fail the test."""
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(list(H100)))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def measured(*_args, **_kwargs):
        raise AssertionError("a refused run must not start a measurement")

    monkeypatch.setattr(bench.runner, "run_config", measured)


@pytest.mark.usefixtures("one_h100")
def test_bench_run_refuses_a_cpu_build_of_torch_on_a_gpu_machine(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.version, "cuda", None)
    err = expect_user_error(main, ["run", "--method", "lora", "--out", str(tmp_path / "results")],
                            "NVML sees 1 GPU(s) (driver 550.54.15, CUDA 12.4) but torch is a CPU build", tmp_path, capsys)
    assert "install a torch build for CUDA <= 12.4" in err
    assert not (tmp_path / "results").exists()


@pytest.mark.usefixtures("one_h100")
def test_bench_run_refuses_a_torch_newer_than_the_driver(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    expect_user_error(main, ["run", "--method", "lora", "--out", str(tmp_path)],
                      "torch is built for CUDA 13.0, newer than the driver supports: torch cannot use the GPU; update "
                      "the driver to >= 580", tmp_path, capsys)


@pytest.mark.usefixtures("one_h100")
def test_matrix_refuses_but_a_dry_run_still_lists(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.version, "cuda", None)
    expect_user_error(main, ["matrix", "--preset", "quick", "--out", str(tmp_path / "r")], "but torch is a CPU build",
                      tmp_path, capsys)
    assert main(["matrix", "--preset", "quick", "--out", str(tmp_path / "r"), "--dry-run"]) == 0


@pytest.mark.usefixtures("one_h100")
def test_selfcheck_refuses_before_planning_any_check(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.version, "cuda", None)
    import bench.selfcheck

    monkeypatch.setattr(bench.selfcheck, "run_selfcheck", lambda **_kw: pytest.fail("selfcheck must not start"))
    expect_user_error(main, ["selfcheck"], "but torch is a CPU build", tmp_path, capsys)


def test_hidden_gpus_run_on_the_cpu_on_purpose(monkeypatch):
    """CUDA_VISIBLE_DEVICES= hides the GPUs from NVML too: nothing is refused (the documented way to use the CPU)."""
    from phi3v_core.software import torch_gpu_refusal

    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(list(H100)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert torch_gpu_refusal() is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert torch_gpu_refusal() is not None


@pytest.mark.gpu(seconds=1)  # NVML and torch's version, no model
def test_a_usable_gpu_is_not_refused():
    """On a GPU machine whose torch works, NVML and torch agree: the guard stays silent (seconds, no model)."""
    from phi3v_core.software import torch_gpu_refusal

    assert torch_gpu_refusal() is None


FAKE_PYNVML = '''
from types import SimpleNamespace
def nvmlInit(): pass
def nvmlShutdown(): pass
def nvmlSystemGetDriverVersion(): return "550.54.15"
def nvmlSystemGetCudaDriverVersion(): return 12040
def nvmlDeviceGetCount(): return 1
def nvmlDeviceGetHandleByIndex(i): return "h100"
def nvmlDeviceGetName(h): return "NVIDIA H100 80GB HBM3"
def nvmlDeviceGetMemoryInfo(h): return SimpleNamespace(total=80 * 2**30, used=0, free=80 * 2**30)
def nvmlDeviceGetCudaComputeCapability(h): return (9, 0)
'''


@pytest.mark.skipif(torch.version.cuda is not None, reason="the early answer is for a CPU build of torch")
def test_a_cpu_build_is_refused_without_importing_torch(tmp_path):
    """The refusal reads torch/version.py: no torch import (tens of seconds on a busy host) before saying no."""
    import os
    import subprocess

    (tmp_path / "pynvml.py").write_text(FAKE_PYNVML)
    code = ("import sys; from phi3v_core.software import torch_gpu_refusal; "
            "print(torch_gpu_refusal()); print('torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, check=True)
    refusal, imported = done.stdout.strip().splitlines()
    assert "torch is a CPU build" in refusal and imported == "False"
