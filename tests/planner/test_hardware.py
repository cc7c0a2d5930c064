"""NVML detection with an injected fake NVML, and the precision/attention the planner derives from it."""

from __future__ import annotations

import pytest

from phi3v_core.software import BnbLibrary, Software
from planner.hardware import detect
from planner.recommend import PlanRequest, plan

from .conftest import FakeDevice

#: bitsandbytes 0.50's libraries as read from its wheel (tests/core/test_software.py pins the reading).
CUDA126 = BnbLibrary("libbitsandbytes_cuda126.so", (12, 6), True, "torch.version.cuda 12.6", (60, 70, 75, 80, 86, 89, 90), (90,))
CUDA130 = BnbLibrary("libbitsandbytes_cuda130.so", (13, 0), True, "torch.version.cuda 13.0", (75, 80, 86, 89, 90, 100, 120), (120,))
#: A GPU machine with everything installed (torch for CUDA 12.4, flash-attn, bitsandbytes, a CPU Adam that builds).
COMPLETE = Software(flash_attn=True, torch_cuda="12.4", bitsandbytes=True, bnb=CUDA126)


@pytest.mark.parametrize(
    ("machine", "key", "arch", "count", "nvlink"),
    [
        ("volta", "V100-32GB", "Volta", 8, True),
        ("turing", "T4", "Turing", 1, False),
        ("ampere", "A100-80GB", "Ampere", 8, True),
        ("hopper", "H100-SXM", "Hopper", 8, True),
    ],
)
def test_detection(fake_nvml, machine, key, arch, count, nvlink):
    nvml = fake_nvml(machine)
    found = detect(nvml)
    assert found.ok and found.error is None
    assert found.count == count
    assert found.spec.key == key and found.spec.architecture == arch
    assert found.nvlink is nvlink
    assert found.driver == "550.54.15" and found.cuda_driver == "12.4"
    assert nvml.shutdown_calls == 1


@pytest.mark.parametrize(
    ("machine", "precision", "attention", "qlora"),
    [
        ("volta", "fp16", "sdpa", True),  # no bf16 (is_bf16_supported() would say True), no FA2; NF4 runs (CC 6.0+)
        ("turing", "fp16", "sdpa", True),
        ("ampere", "bf16", "flash_attention_2", True),
        ("hopper", "bf16", "flash_attention_2", True),
    ],
)
def test_detected_hardware_gets_the_right_precision_and_attention(fake_nvml, machine, precision, attention, qlora):
    result = plan(PlanRequest(), nvml=fake_nvml(machine), software=COMPLETE)
    assert {m.precision for m in result.methods} == {precision}
    assert {m.attn for m in result.methods} == {attention}
    assert result.method("qlora").supported is qlora
    assert result.hardware.source.startswith("detected")
    best = result.best
    assert best is not None and best.fits
    assert ("--bf16" in best.command) is (precision == "bf16")
    assert ("--use_flash_attention" in best.command) is (attention == "flash_attention_2")
    if precision == "fp16":
        assert "--precision fp16 --attn sdpa" in best.command


def test_unknown_card_plans_from_nvml_with_an_architecture_level_speed(fake_nvml):
    nvml = fake_nvml([FakeDevice("NVIDIA Future Card 5000", 30 * 2**30, (8, 9))])
    found = detect(nvml)
    assert found.spec.detected and found.spec.architecture == "Ada"
    assert found.spec.memory_gib == 30  # memory from NVML, whatever the table says
    result = plan(PlanRequest(methods=("lora", "qlora")), detection=found)
    lora = result.method("lora")
    assert lora.precision == "bf16" and lora.capacity_bytes == 30 * 2**30
    assert lora.speed is not None and any("architecture-level estimate" in r for r in lora.reasons)
    assert any("not in the table" in n for n in result.notes)


def test_rtx4090_is_in_the_table_and_detected(fake_nvml):
    result = plan(PlanRequest(gpu="RTX4090", methods=("lora", "qlora")))
    assert result.hardware.gpu.architecture == "Ada" and result.best is not None and result.best.speed is not None
    found = detect(fake_nvml([FakeDevice("NVIDIA GeForce RTX 4090", 24564 * 2**20, (8, 9))]))
    assert found.spec.key == "RTX4090" and found.spec.memory_gib == pytest.approx(23.99, abs=0.01)


def test_mixed_gpus_plan_for_the_weakest(fake_nvml):
    nvml = fake_nvml(
        [
            FakeDevice("NVIDIA A100-SXM4-80GB", 80 * 2**30, (8, 0)),
            FakeDevice("NVIDIA A100-SXM4-40GB", 40 * 2**30, (8, 0)),
        ]
    )
    result = plan(PlanRequest(methods=("lora",)), nvml=nvml)
    assert result.hardware.gpu.memory_gib == 40
    assert any("weakest" in n for n in result.notes)


def test_no_driver_is_reported_plainly(fake_nvml):
    found = detect(fake_nvml("ampere", fail_init=True))
    assert not found.ok
    assert "no NVIDIA driver" in found.error and "Driver Not Loaded" in found.error


def test_missing_pynvml(monkeypatch):
    monkeypatch.setattr("planner.hardware._import_nvml", lambda: None)
    assert detect().error == "pynvml (nvidia-ml-py) is not installed"


def test_detected_machine_without_flash_attn_gets_no_flash_command(fake_nvml):
    """The commands never ask for a kernel that is not installed; the plan says what installing it would gain."""
    software = Software(flash_attn=False, torch_cuda="12.4", bitsandbytes=True, bnb=CUDA126)
    result = plan(PlanRequest(), nvml=fake_nvml([FakeDevice("NVIDIA H100 80GB HBM3", 80 * 2**30, (9, 0))]), software=software)
    assert {m.attn for m in result.methods} == {"sdpa"}
    for method in result.methods:
        if method.command:
            assert "--use_flash_attention" not in method.command and "--attn sdpa" in method.command
        assert any("flash-attn is not installed here" in r and "pip install flash-attn" in r for r in method.reasons)
    assert not any("what-if" in n for n in result.notes)
    with_flash = plan(PlanRequest(), nvml=fake_nvml([FakeDevice("NVIDIA H100 80GB HBM3", 80 * 2**30, (9, 0))]), software=COMPLETE)
    assert {m.attn for m in with_flash.methods} == {"flash_attention_2"}
    assert "--use_flash_attention" in with_flash.best.command


def test_what_if_hardware_states_its_flash_and_qlora_assumptions():
    h100 = plan(PlanRequest(gpu="H100-SXM"))
    assert "--use_flash_attention" in h100.best.command
    assert any("what-if hardware" in n and "flash-attn is installed there" in n for n in h100.notes)
    v100 = plan(PlanRequest(gpu="V100-32GB", methods=("qlora",))).method("qlora")
    assert v100.supported  # some bitsandbytes library holds sm 7.0 ...
    assumption = next(r for r in v100.reasons if r.startswith("what-if"))
    assert "CUDA 12.8 or CUDA 12.6" in assumption and "CUDA 13" not in assumption.split("on the target")[0]


@pytest.mark.parametrize(("library", "supported"), [(CUDA126, True), (CUDA130, False)])
def test_detected_qlora_follows_the_bitsandbytes_library_that_loads(fake_nvml, library, supported):
    software = Software(torch_cuda=".".join(map(str, library.toolkit)), bitsandbytes=True, bnb=library)
    qlora = plan(PlanRequest(methods=("qlora",)), nvml=fake_nvml("volta"), software=software).method("qlora")
    assert qlora.supported is supported
    if supported:
        assert any("libbitsandbytes_cuda126.so" in r and "holds this GPU" in r for r in qlora.reasons)
    else:
        assert "no kernels for compute capability 7.0" in qlora.reasons[0] and "cu126" in qlora.reasons[0]
    missing = plan(PlanRequest(methods=("qlora",)), nvml=fake_nvml("hopper"), software=Software(torch_cuda="12.4"))
    assert not missing.method("qlora").supported and "pip install bitsandbytes" in missing.method("qlora").reasons[0]


def test_offload_is_recommended_only_where_cpu_adam_builds(fake_nvml):
    """One L4 holds full fine-tuning only with the optimizer offloaded: not offered where DeepSpeed cannot build."""
    l4 = [FakeDevice("NVIDIA L4", 23034 * 2**20, (8, 9))]
    request = PlanRequest(methods=("full",), host_ram_gib=512)  # not this test machine's RAM
    ok = plan(request, nvml=fake_nvml(l4), software=COMPLETE).method("full")
    assert ok.fits and ok.offload == "optimizer" and "--offload optimizer" in ok.command
    broken = Software(flash_attn=True, torch_cuda="12.4", bitsandbytes=True, bnb=CUDA126,
                      offload_problem="--offload optimizer JIT-builds DeepSpeed's CPU Adam, which needs ninja")
    blocked = plan(request, nvml=fake_nvml(l4), software=broken).method("full")
    assert blocked.offload == "none" and not (blocked.command or "").count("--offload")
    if not blocked.fits:
        assert any("cannot be built here" in r and "ninja" in r for r in blocked.reasons)
    what_if = plan(PlanRequest(gpu="L4", methods=("full",))).method("full")
    assert what_if.offload == "optimizer" and any("what-if: assumes DeepSpeed can build" in r for r in what_if.reasons)


def test_detected_plan_warns_when_torch_cannot_use_the_gpu(fake_nvml):
    cpu_build = plan(PlanRequest(methods=("lora",)), nvml=fake_nvml("hopper"), software=Software(flash_attn=True))
    assert any("torch is a CPU build" in n and "CUDA 12.4" in n for n in cpu_build.notes)
    too_new = Software(flash_attn=True, torch_cuda="13.0")
    notes = plan(PlanRequest(methods=("lora",)), nvml=fake_nvml("hopper"), software=too_new).notes
    assert any("built for CUDA 13.0" in n and ">= 580" in n for n in notes)
    assert not any("refuse" in n for n in plan(PlanRequest(methods=("lora",)), nvml=fake_nvml("hopper"), software=COMPLETE).notes)


@pytest.mark.gpu(seconds=2)  # one plan on the detected card, no model
def test_the_detected_plan_on_this_gpu_asks_only_for_installed_kernels():
    """On a real GPU: the plan's command uses flash attention exactly where phi3v-finetune can run it (no model)."""
    from phi3v_core.device import flash_attention_usable

    result = plan(PlanRequest(methods=("lora",)))
    assert result.hardware.source.startswith("detected")
    assert ("--use_flash_attention" in (result.best.command or "")) is flash_attention_usable()
