"""NVML detection with an injected fake NVML, and the precision/attention the planner derives from it."""

from __future__ import annotations

import pytest

from planner.hardware import detect
from planner.recommend import PlanRequest, plan

from .conftest import FakeDevice


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
    result = plan(PlanRequest(), nvml=fake_nvml(machine))
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
