"""phi3v-finetune refuses, before the model is built, what cannot run here: a GPU torch cannot use, QLoRA on a GPU
the loading bitsandbytes library has no kernels for, an optimizer offload whose CPU Adam cannot be built."""

from __future__ import annotations

import sys

import pytest
import torch

import phi3v_core.training.run
from phi3v_core.cli.finetune import main
from phi3v_core.software import BnbLibrary
from phi3v_core.training import Machine, TrainConfig
from tests.planner.conftest import FakeDevice, FakeNVML
from tests.safety_helpers import expect_user_error

pytestmark = pytest.mark.usefixtures("finetune_env")

CUDA126 = BnbLibrary("libbitsandbytes_cuda126.so", (12, 6), True, "torch.version.cuda 12.6", (60, 70, 75, 80, 86, 89, 90), (90,))
CUDA130 = BnbLibrary("libbitsandbytes_cuda130.so", (13, 0), True, "torch.version.cuda 13.0", (75, 80, 86, 89, 90, 100, 120), (120,))
V100 = Machine(cuda=True, capability=(7, 0), device_count=1, bnb=CUDA130)


def test_finetune_refuses_a_gpu_torch_cannot_use(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([FakeDevice("NVIDIA H100 80GB HBM3", 80 * 2**30, (9, 0))]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(phi3v_core.training.run, "run", lambda *a, **k: pytest.fail("nothing may be built"))
    expect_user_error(main, ["--synthetic", "4", "--no-tqdm", "--output_dir", str(tmp_path / "out")],
                      "but torch is a CPU build: nothing would run on the GPU", tmp_path, capsys)


def test_qlora_follows_the_bitsandbytes_library_that_loads():
    problems = TrainConfig(method="qlora", precision="fp16").problems(V100)
    assert any("libbitsandbytes_cuda130.so" in p and "compute capability 7.0" in p for p in problems), problems
    ok = TrainConfig(method="qlora", precision="fp16").problems(Machine(cuda=True, capability=(7, 0), device_count=1, bnb=CUDA126))
    assert not any("bitsandbytes" in p for p in ok), ok


def test_offload_build_problem_is_a_config_problem():
    broken = Machine(offload_problem="offload optimizer JIT-builds DeepSpeed's CPU Adam, which needs ninja (pip install ninja)")
    problems = TrainConfig(method="full", offload="optimizer").problems(broken)
    assert any(p.startswith("offload optimizer JIT-builds") for p in problems)
    assert not any("JIT" in p for p in TrainConfig(method="full").problems(broken))  # only where it offloads


def test_finetune_names_the_offload_fix_in_flag_terms(monkeypatch, tmp_path, capsys):
    from phi3v_core.cli import finetune_config

    broken = Machine(offload_problem="offload optimizer JIT-builds DeepSpeed's CPU Adam, which needs ninja (pip "
                                     "install ninja, with its bin folder on PATH)")
    real = finetune_config.build_config
    monkeypatch.setattr("phi3v_core.cli.finetune.build_config", lambda args, **kw: real(args, broken, **kw))
    expect_user_error(main, ["--synthetic", "4", "--no-tqdm", "--method", "full", "--offload", "optimizer",
                             "--output_dir", str(tmp_path / "out")],
                      "--offload optimizer JIT-builds DeepSpeed's CPU Adam, which needs ninja", tmp_path, capsys)
