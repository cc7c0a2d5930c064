"""``phi3v-plan --gpu``: nvidia-smi's own names, one ambiguity rule, a card outside the table, honest link labels."""

from __future__ import annotations

import json

import pytest

from phi3v_core.errors import ConfigError
from planner.cli import main
from planner.hardware import find_gpu


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA GeForce RTX 4090", "RTX4090"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A100-PCIE-40GB", "A100-40GB"),
        ("NVIDIA H100 80GB HBM3", "H100-SXM"),
        ("NVIDIA H100 PCIe", "H100-PCIe"),
        ("NVIDIA H100 NVL", "H100-NVL"),
        ("Tesla V100-SXM2-32GB", "V100-32GB"),
        ("Tesla T4", "T4"),
        ("NVIDIA L40S", "L40S"),
        ("rtx4090", "RTX4090"),
        ("H100-SXM", "H100-SXM"),
    ],
)
def test_nvml_and_table_names(name, key):
    assert find_gpu(name).key == key


@pytest.mark.parametrize(("name", "cards"), [("H100", "H100-SXM, H100-PCIe, H100-NVL"), ("A100", "A100-40GB, A100-80GB")])
def test_one_ambiguity_rule(name, cards):
    # a family name fitting several cards is ambiguous, whichever family (H100 used to mean SXM silently)
    with pytest.raises(ConfigError, match=f"ambiguous: {cards}"):
        find_gpu(name)


def test_unknown_card_suggests_nothing_unrelated_and_names_the_way_out(capsys):
    with pytest.raises(SystemExit):
        main(["--gpu", "MI300X"])
    err = capsys.readouterr().err
    assert "RTX3090" not in err and "no close match" in err and "--gpu_memory_gib" in err


def test_card_outside_the_table(capsys):
    argv = ["--gpu", "MI300X", "--gpu-memory-gib", "192", "--tflops", "1300", "--bandwidth", "5300", "--method", "lora"]
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    gpu = data["hardware"]["gpu"]
    assert gpu["key"] == "MI300X" and gpu["memory_gib"] == 192 and gpu["tflops_bf16"] == 1300
    lora = next(m for m in data["methods"] if m["method"] == "lora")
    assert lora["memory"]["expected_peak_gib"] > 24  # planned against its own memory, not a table card's


def test_tflops_without_memory_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--gpu", "RTX4090", "--tflops", "10"])
    assert "--gpu_memory_gib" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "label"),
    [(["--gpu", "H100-SXM"], "SXM;"), (["--gpu", "H100-SXM", "--gpus", "8"], "NVLink;"), (["--gpu", "RTX4090"], "PCIe;")],
)
def test_sxm_cards_are_not_labelled_pcie(argv, label, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main([*argv, "--method", "lora"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Hardware"))
    assert label in header and "node(s)" not in header and "1 node," in header


@pytest.mark.parametrize("flags", [["--gpu", "H100-SXM"], ["--gpu", "H100-SXM", "--gpu_memory_gib", "94"]])
def test_the_stated_card_is_resolved_once_however_often_the_plan_is_remade(monkeypatch, capsys, flags):
    # --deadline re-plans for several node counts: each plan takes the card the request boundary resolved
    import planner.request as request

    calls = []

    def counting(look_up):
        def wrapped(*args):
            calls.append(args[0])
            return look_up(*args)

        return wrapped

    monkeypatch.setattr(request, "find_gpu", counting(request.find_gpu))
    monkeypatch.setattr(request, "custom_gpu", counting(request.custom_gpu))
    assert main([*flags, "--method", "lora", "--deadline", "2", "--dataset-size", "20000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hardware"]["gpu"]["key"] == "H100-SXM" and out["deadline"] is not None
    assert calls == ["H100-SXM"]
