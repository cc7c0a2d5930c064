"""phi3v_core.software: the bitsandbytes library that loads and its architectures, the CPU Adam build, torch vs NVML."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import pytest

from phi3v_core.software import (
    BnbLibrary,
    bnb_library,
    fatbin_architectures,
    offload_build_problem,
    qlora_unsupported_reason,
    torch_cuda_build,
    torch_gpu_problem,
)

_SPEC = importlib.util.find_spec("bitsandbytes")
BNB_DIR = Path(next(iter(_SPEC.submodule_search_locations))) if _SPEC and _SPEC.submodule_search_locations else None


def _fatbin(entries: list[tuple[int, int]]) -> bytes:
    """A fat binary as nvcc writes it: a 16-byte header, then one 64-byte-header entry per (kind, arch)."""
    body = b""
    for kind, arch in entries:
        payload = b"\0" * 8
        header = struct.pack("<HHIQIIII", kind, 0x101, 64, len(payload), 0, 0, 0, arch)  # arch at byte 28
        body += header.ljust(64, b"\0") + payload
    return b"ELF junk" + struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body + b"trailer"


def test_fatbin_architectures_are_read_from_the_entry_headers():
    data = _fatbin([(2, 75), (2, 80), (2, 90), (1, 90)]) + _fatbin([(2, 120), (1, 120)])
    assert fatbin_architectures(data) == ((75, 80, 90, 120), (90, 120))
    assert fatbin_architectures(b"no fat binary here") == ((), ())


@pytest.mark.skipif(BNB_DIR is None or not (BNB_DIR / "libbitsandbytes_cuda130.so").is_file(),
                    reason="bitsandbytes' CUDA libraries are not installed")
@pytest.mark.parametrize(
    ("torch_cuda", "least", "most", "v100"),
    [("12.6", 60, 90, True), ("12.8", 70, 120, True), ("13.0", 75, 120, False)],
)
def test_the_installed_bitsandbytes_libraries_hold_the_documented_architectures(torch_cuda, least, most, v100):
    """bitsandbytes 0.50: cuda118-126 sm 60-90, cuda128 sm 70-120, cuda130/132 sm 75+ (the issue's table)."""
    library = bnb_library(torch_cuda, environ={})
    assert library is not None and library.present and library.name == f"libbitsandbytes_cuda{torch_cuda.replace('.', '')}.so"
    assert (min(library.sass), max(library.sass)) == (least, most)
    assert (qlora_unsupported_reason((7, 0), library) is None) is v100
    assert qlora_unsupported_reason((9, 0), library) is None


def test_bnb_library_follows_torch_and_the_override(tmp_path):
    (tmp_path / "libbitsandbytes_cuda126.so").write_bytes(_fatbin([(2, 60), (2, 70), (2, 90), (1, 90)]))
    picked = bnb_library("12.6", tmp_path, environ={})
    assert picked == BnbLibrary("libbitsandbytes_cuda126.so", (12, 6), True, "torch.version.cuda 12.6", (60, 70, 90), (90,))
    overridden = bnb_library("13.0", tmp_path, environ={"BNB_CUDA_VERSION": "126"})
    assert overridden.name == "libbitsandbytes_cuda126.so" and overridden.source == "BNB_CUDA_VERSION=126"
    missing = bnb_library("13.0", tmp_path, environ={})
    assert missing is not None and not missing.present
    assert "does not ship" in qlora_unsupported_reason((9, 0), missing)
    assert bnb_library(None, tmp_path, environ={}) is None  # a CPU build of torch loads no CUDA library


def test_cubins_run_on_newer_minors_and_ptx_on_newer_gpus():
    library = BnbLibrary("libbitsandbytes_cuda126.so", (12, 6), True, "t", (60, 70, 80, 90), (90,))
    assert library.runs_on((8, 6)) and library.runs_on((8, 9))  # sm_80 machine code runs on 8.x
    assert library.runs_on((12, 0))  # compute_90 PTX is compiled by the driver for newer GPUs
    assert not library.runs_on((5, 2))
    table_only = BnbLibrary("libbitsandbytes_cuda130.so", (13, 0), True, "t")  # not read: the table decides
    assert not table_only.runs_on((7, 0)) and table_only.runs_on((7, 5))
    reason = qlora_unsupported_reason((7, 0), BnbLibrary("libbitsandbytes_cuda130.so", (13, 0), True, "torch.version.cuda 13.0", (75, 80, 90, 100, 120), (120,)))
    assert "libbitsandbytes_cuda130.so" in reason and "compute capability 7.0" in reason and "cu126" in reason
    assert qlora_unsupported_reason((5, 2)) is not None and qlora_unsupported_reason((7, 0)) is None  # what-if rule


def test_torch_cuda_build_is_read_without_importing_torch(tmp_path):
    (tmp_path / "version.py").write_text("__version__ = '2.11.0+cu130'\ncuda: Optional[str] = '13.0'\n")
    assert torch_cuda_build(tmp_path) == "13.0"
    (tmp_path / "version.py").write_text("__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\n")
    assert torch_cuda_build(tmp_path) is None
    import torch

    assert torch_cuda_build() == torch.version.cuda  # the installed torch, read from its file


def _which(present: set[str]):
    return lambda name: f"/usr/bin/{name}" if name in present else None


def _find(present: set[str]):
    return lambda name: object() if name in present else None


def test_offload_build_problem_names_each_missing_piece(tmp_path):
    deepspeed = tmp_path / "deepspeed"
    (deepspeed / "ops" / "adam").mkdir(parents=True)
    ok = {"ninja", "c++"}
    assert offload_build_problem(deepspeed, _which(ok), _find({"ninja"}), lambda c: None, environ={}) is None
    no_ninja = offload_build_problem(deepspeed, _which({"c++"}), _find(set()), lambda c: None, environ={})
    assert no_ninja.startswith("offload optimizer JIT-builds DeepSpeed's CPU Adam") and "pip install ninja" in no_ninja
    assert no_ninja.count("\n") == 0
    broken = offload_build_problem(deepspeed, _which(ok), _find({"ninja"}), lambda c: "c++ --version exited 1", environ={})
    assert "a working C++ compiler (c++ --version exited 1" in broken and "DS_BUILD_CPU_ADAM=1" in broken
    no_compiler = offload_build_problem(deepspeed, _which({"ninja"}), _find({"ninja"}), lambda c: None, environ={"CXX": "g++-13"})
    assert "g++-13 is not on PATH" in no_compiler
    (deepspeed / "ops" / "adam" / "cpu_adam_op.cpython-312-x86_64-linux-gnu.so").write_bytes(b"")
    assert offload_build_problem(deepspeed, _which(set()), _find(set()), lambda c: "broken", environ={}) is None
    assert "pip install deepspeed" in offload_build_problem(tmp_path / "none", _which(ok), _find(set()), environ={})


def test_offload_build_problem_runs_the_real_compiler_check():
    """This machine has ninja and c++ (the dev extra and the image): nothing to report; a bogus CXX is reported."""
    assert offload_build_problem() is None
    broken = offload_build_problem(environ={"CXX": "/bin/false"})
    assert broken is not None and "/bin/false --version exited 1" in broken


@pytest.mark.parametrize(
    ("torch_cuda", "available", "expected"),
    [
        (None, False, ["torch is a CPU build", "driver 550.54.15, CUDA 12.4", "CUDA <= 12.4", "CUDA_VISIBLE_DEVICES="]),
        ("13.0", False, ["built for CUDA 13.0", "update the driver to >= 580", "CUDA <= 12.4"]),
        ("12.4", False, ["CUDA 12.4 build) reports no usable GPU", "torch.cuda.init()"]),
        ("12.4", True, None),
        ("13.0", None, ["built for CUDA 13.0"]),  # torch not asked: judged by versions
        ("12.1", None, None),
    ],
)
def test_torch_gpu_problem_names_both_versions_and_the_fix(torch_cuda, available, expected):
    problem = torch_gpu_problem(1, "550.54.15", "12.4", torch_cuda, available)
    if expected is None:
        assert problem is None
    else:
        assert problem.count("\n") == 0 and all(part in problem for part in expected), problem
    assert torch_gpu_problem(0, None, None, None, False) is None  # no GPU seen: nothing to refuse


@pytest.mark.gpu(seconds=3)  # one 256 x 256 NF4 round trip (bitsandbytes' library load included)
def test_the_qlora_rule_matches_what_bitsandbytes_runs_on_this_gpu():
    """Where the rule says yes, bitsandbytes' NF4 kernel runs here; where it says no, it fails (seconds, no model)."""
    import torch

    reason = qlora_unsupported_reason(torch.cuda.get_device_capability(0), bnb_library(torch.version.cuda))
    try:
        import bitsandbytes.functional as bnbf

        weight = torch.randn(256, 256, device="cuda", dtype=torch.float16)
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4")
        back = bnbf.dequantize_4bit(packed, state)
        torch.cuda.synchronize()
        runs = bool(torch.isfinite(back).all()) and float((back - weight).abs().mean()) < 0.2
    except (RuntimeError, OSError):  # "no kernel image is available", or a library that would not load
        runs = False
    assert runs is (reason is None), reason
