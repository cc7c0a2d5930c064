"""phi3v-bench CLI: help, one-line errors with exit 1, and the run/matrix/report commands with a fake runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bench.runner
from bench.cli import build_parser, config_from_args, main
from bench.config import DeviceDescription, choose_defaults
from bench.store import load_result
from tests.bench.factories import make_result
from tests.safety_helpers import HANG_GUARD_S


def test_help_has_examples(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "Examples:" in out and "phi3v-bench matrix --preset quick" in out
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "exit codes: 0 no regression, 2 regression, 1 user error" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required"),
        (["bogus"], "invalid choice"),
        (["compare", "a"], "the following arguments are required: b"),
        (["run", "--steps", "many"], "invalid int value"),
        (["run", "--method", "sft", "--num-crops", "40"], "2 problems: method 'sft'"),
        (["matrix"], "pass --preset"),
        (["matrix", "--preset", "nope"], "unknown preset 'nope'"),
        (["matrix", "--grid", "method"], "must look like field=v1,v2"),
        (["report", "/no/such/results"], "/no/such/results: no such file or folder"),
        (["compare", "a", "b", "--alpha", "2"], "--alpha must be in (0, 1)"),
    ],
)
def test_user_errors_are_one_line_exit_1(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_console_entry_point_error_has_no_traceback(tmp_path) -> None:
    env = {**os.environ, "PHI3V_DEBUG": ""}
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "report", str(tmp_path / "missing")],
                          capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_run_writes_a_result_via_the_runner(tmp_path, monkeypatch, capsys) -> None:
    seen = []

    def fake_run_config(cfg):
        seen.append(cfg)
        return make_result(cfg)

    monkeypatch.setattr(bench.runner, "run_config", fake_run_config)
    argv = ["run", "--method", "qlora", "--attn", "eager", "--gpus", "8", "--batch-size", "64", "--steps", "7",
            "--no-gradient-checkpointing", "--release", "v9", "--out", str(tmp_path), "--json"]
    assert main(argv) == 0
    cfg = seen[0]
    assert (cfg.method, cfg.attn, cfg.gpus, cfg.steps, cfg.gradient_checkpointing, cfg.release) == \
        ("qlora", "eager", 8, 7, False, "v9")
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert load_result(data["path"]).config == cfg
    assert data["path"].startswith(str(tmp_path / "v9" / "8xA100-SXM4-80GB"))
    assert cfg.global_batch == 64  # --batch-size is the old name of --global-batch
    assert data["defaults"]  # the card's reasons for the defaults chosen


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        (DeviceDescription(), {"model": "tiny", "precision": "fp32", "attn": "sdpa", "num_crops": 1}),
        (DeviceDescription("NVIDIA H100 80GB HBM3", (9, 0), True),
         {"model": "phi-3.5-vision", "precision": "bf16", "attn": "flash_attention_2", "num_crops": 16,
          "seq_profile": "docvqa"}),
        (DeviceDescription("NVIDIA A100-SXM4-80GB", (8, 0), False),
         {"model": "phi-3.5-vision", "precision": "bf16", "attn": "sdpa", "num_crops": 16}),
        (DeviceDescription("Tesla V100-SXM2-32GB", (7, 0), True),
         {"model": "phi-3.5-vision", "precision": "fp16", "attn": "sdpa", "num_crops": 16}),
    ],
)
def test_defaults_fit_the_machine(device, expected) -> None:
    values, reasons = choose_defaults(device)
    assert {k: values[k] for k in expected} == expected
    card = " ".join(reasons)
    for key in ("model", "precision", "attn"):
        assert f"{key} {values[key]}" in card  # every choice is explained
    if device.compute_capability == (7, 0):
        assert "7.0 < 8.0" in card


def test_explicit_flags_beat_machine_defaults() -> None:
    args = build_parser().parse_args(["run", "--model", "tiny", "--precision", "bf16", "--attention", "eager"])
    cfg, reasons = config_from_args(args, DeviceDescription("NVIDIA H100 80GB HBM3", (9, 0), True))
    assert (cfg.model, cfg.precision, cfg.attn, cfg.num_crops, cfg.global_batch) == ("tiny", "bf16", "eager", 1, 2)
    assert any("given on the command line" in r for r in reasons)


def test_run_human_output(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench.runner, "run_config", make_result)
    assert main(["run", "--gpus", "8", "--batch-size", "64", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "img/s" in out and "wrote " in out


def test_matrix_then_report_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench.runner, "run_config", make_result)
    results = tmp_path / "results"
    assert main(["matrix", "--grid", "method=lora,full", "--set", "gpus=8", "global_batch=64", "--release", "v1",
                 "--out", str(results), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["counts"]["ok"] == 2
    # The old field name still works in --set (and resumes the same cells).
    assert main(["matrix", "--grid", "method=lora,full", "--set", "gpus=8", "batch_size=64", "--release", "v1",
                 "--out", str(results), "--no-progress"]) == 0
    assert "skipped 2" in capsys.readouterr().out
    assert main(["report", str(results), "--out", str(tmp_path / "report"), "--json"]) == 0
    written = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # one node only: a scaling plot would have one point per line, so it is left out
    assert written["results"] == 2 and [Path(p).name.split("-")[0] for p in written["images"]] == ["throughput", "memory"]
    assert "| lora |" in (tmp_path / "report" / "report.md").read_text()


def test_matrix_dry_run_lists_cells(tmp_path, capsys) -> None:
    assert main(["matrix", "--preset", "seed-v100", "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("->") == 5 and "5 cells (dry run" in out
    assert not any(tmp_path.iterdir())
