"""phi3v-plan end to end: JSON and tables, errors, the no-GPU path and the 3-second budget."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from planner.cli import main
from planner.hardware import Detection, detect
from tests.safety_helpers import HANG_GUARD_S


def _run(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_json_plan(capsys):
    data = json.loads(
        _run(capsys, "--gpu", "A100-80GB", "--count", "8", "--nodes", "2", "--dataset-size", "1000", "--json")
    )
    assert data["recommended"] == "full"
    assert data["hardware"]["gpus_per_node"] == 8 and data["hardware"]["nodes"] == 2
    best = next(m for m in data["methods"] if m["method"] == "full")
    assert best["memory"]["expected_peak_gib"] < 80
    assert best["speed"]["epoch_s"] > 0
    assert "--nnodes=2" in best["command"]


def test_human_output(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # the launch command on one line
    out = _run(capsys, "--gpu", "T4", "--method", "lora", "--method", "qlora", "--cloud", "azure")
    for part in (
        "Recommendation",
        "phi3v-finetune --model_name_or_path",
        "--task docvqa --method lora",
        "fp16 / sdpa",
        "Memory per GPU",
        "no Azure ND SKU",
    ):
        assert part in " ".join(out.split()), part


def test_list_gpus_and_calibration(capsys):
    gpus = json.loads(_run(capsys, "--list-gpus", "--json"))
    assert {g["key"] for g in gpus} >= {"V100-32GB", "A100-80GB", "H100-SXM", "B200"}
    calibration = json.loads(_run(capsys, "--calibration", "--json"))
    assert len(calibration["rows"]) == 15
    assert "Predicted vs published" in _run(capsys, "--calibration")


def test_list_gpus_at_80_columns_shows_every_name_whole(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    out = _run(capsys, "--list-gpus")
    assert max(len(line) for line in out.splitlines()) <= 80
    names = {line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")}
    keys = {g["key"] for g in json.loads(_run(capsys, "--list-gpus", "--json"))}
    assert names == keys  # what --gpu takes, never "A100-40…"
    assert "…" not in out


def test_bad_input_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--gpu", "A100", "--nodes", "0"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: 2 problems:")
    assert "Traceback" not in err


def test_no_gpu_shows_common_gpus(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    monkeypatch.setattr(
        "planner.hardware.detect", lambda nvml=None: Detection(error="no NVIDIA driver/NVML on this machine (test)")
    )
    out = " ".join(_run(capsys, "--method", "lora").split())
    assert "No GPU detected: no NVIDIA driver/NVML on this machine (test)" in out
    assert "A100-80GB" in out and "H200" in out
    data = json.loads(_run(capsys, "--json", "--cloud", "azure"))
    assert len(data["plans"]) == 5 and data["recommended_sku"].startswith("Standard_ND96")


def test_detected_machine(capsys, monkeypatch, fake_nvml):
    found = detect(fake_nvml("hopper"))
    monkeypatch.setattr("planner.hardware.detect", lambda nvml=None: found)
    data = json.loads(_run(capsys, "--json"))
    assert data["detection"]["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert data["hardware"]["gpus_per_node"] == 8 and data["recommended"] == "full"


def test_trace_flag_on_tiny_model(capsys):
    data = json.loads(_run(capsys, "--gpu", "A100-80GB", "--model", "tiny", "--method", "lora", "--trace", "--json"))
    lora = data["methods"][0]
    assert lora["memory"]["phase"].startswith("traced step")
    assert data["trace"]["lora"]["dynamic"] > 0


def test_answers_without_importing_torch():
    """The planner must stay light: no torch/transformers import unless --trace/--validate/--data.

    The time is printed for information only: a test must not depend on how loaded the machine is.
    """
    code = (
        "import sys, time; t = time.perf_counter(); from planner.cli import main; "
        "main(['--gpu', 'A100-80GB', '--count', '8', '--nodes', '2', '--json']); "
        "main(['--gpu', 'RTX4090', '--calibration', '--json']); "
        "print('ELAPSED', time.perf_counter() - t, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=HANG_GUARD_S).stdout
    _, elapsed, torch_loaded, transformers_loaded = out.strip().splitlines()[-1].split()
    assert (torch_loaded, transformers_loaded) == ("False", "False")
    print(f"phi3v-plan answered in {float(elapsed):.2f} s (information only)")


def test_bad_flag_is_one_line_exit_1(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--gpu", "T4", "--count", "many"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--gpus" in err and "usage" not in err


def test_json_is_strict(capsys):
    text = _run(capsys, "--gpu", "Quadro RTX 8000", "--json")
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
