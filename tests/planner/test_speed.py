"""FLOPs, calibrated MFU and the communication model against the published table (anchors §3.1, §4.4)."""

from __future__ import annotations

import dataclasses

import pytest

from planner.calibration import calibration_report, load_calibration
from planner.estimate import TrainSetup, Workload
from planner.hardware import find_gpu
from planner.shapes import ModelShape
from planner.speed import Interconnect, flops_per_sample, predict_speed, reference_shape

PHI3V = ModelShape.preset("phi-3-vision")
REFERENCE = Workload(seq_len=2443, vision_crops=17, image_tokens=2377, pixel_slots=17, crop_copy=False)


@pytest.mark.parametrize(("method", "expected"), [("full", 8.1e13), ("lora", 5.4e13), ("frozen_vision", 6.8e13)])
def test_flops_per_sample_match_the_derivation(method, expected):
    # anchors §3.1: full 8.1e13, LoRA (4PD-style) 5.4e13, frozen vision 6.8e13 per DocVQA sample
    flops = flops_per_sample(reference_shape(PHI3V, method), REFERENCE, TrainSetup(method=method)).total
    assert flops == pytest.approx(expected, rel=0.03)


def test_real_crops_only_cost_less_than_all_slots():
    ours = Workload.from_images(PHI3V, 16, (1008, 1680), text_tokens=66)
    assert ours.vision_crops == 16 and ours.seq_len == 2443
    setup = TrainSetup(method="full")
    assert (
        flops_per_sample(PHI3V, ours, setup).vision
        < flops_per_sample(reference_shape(PHI3V, "full"), REFERENCE, setup).vision
    )


@pytest.mark.parametrize(
    ("key", "mfu"),
    [
        (("Ampere", "full", "flash"), 0.28),
        (("Ampere", "full", "eager"), 0.16),
        (("Ampere", "lora", "flash"), 0.26),
        (("Ampere", "qlora", "flash"), 0.23),
        (("Volta", "full", "eager"), 0.20),
        (("Volta", "lora", "eager"), 0.15),
    ],
)
def test_calibrated_mfu(key, mfu):
    table = load_calibration().mfu_table(PHI3V)
    assert table[key][0] == pytest.approx(mfu, abs=0.006)


@pytest.mark.parametrize("row", ["8xA100-80GB x2 full FA2", "8xA100-80GB x4 full FA2", "8xV100-32GB x2 full no FA"])
def test_multi_node_rows_within_5_percent(row):
    report = {r["row"]: r for r in calibration_report(load_calibration(), PHI3V)}
    assert abs(report[row]["speed_error"]) <= 0.05, report[row]


def test_fallbacks_are_stated():
    calibration = load_calibration()
    mfu, source = calibration.mfu_for(PHI3V, find_gpu("H100-80GB"), "full", "flash_attention_2")
    assert mfu == pytest.approx(0.28, abs=0.01) and "Hopper uncalibrated" in source
    mfu, source = calibration.mfu_for(PHI3V, find_gpu("T4"), "qlora", "sdpa")
    assert 0.1 < mfu < 0.2 and "Turing uncalibrated" in source and "scaled from lora" in source
    mfu, source = calibration.mfu_for(PHI3V, find_gpu("A100-80GB"), "frozen_vision", "flash_attention_2")
    assert "suspect" in source


def test_pcie_and_network_slow_things_down():
    gpu = find_gpu("A100-80GB")
    work = Workload.from_images(PHI3V, 16, (1008, 1680), text_tokens=66)
    setup = TrainSetup(method="full", world_size=16, grad_accum=4)
    nvlink = predict_speed(PHI3V, work, setup, gpu, Interconnect(8, 2, 600, True, 200), 0.28, "t")
    pcie = predict_speed(PHI3V, work, setup, gpu, Interconnect(8, 2, 64, False, 200), 0.28, "t")
    slow_net = predict_speed(PHI3V, work, setup, gpu, Interconnect(8, 2, 600, True, 12.5), 0.28, "t")
    assert pcie.samples_per_s < nvlink.samples_per_s
    assert slow_net.samples_per_s < 0.8 * nvlink.samples_per_s
    no_gc = predict_speed(
        PHI3V,
        work,
        dataclasses.replace(setup, gradient_checkpointing=False),
        gpu,
        Interconnect(8, 2, 600, True, 200),
        0.28,
        "t",
    )
    assert no_gc.compute_s < nvlink.compute_s
    epoch = predict_speed(PHI3V, work, setup, gpu, Interconnect(8, 2, 600, True, 200), 0.28, "t", dataset_size=1000)
    assert epoch.epoch_s == pytest.approx(1000 / epoch.samples_per_s)
