"""`phi3v-bench run` progress and advice (issues #24 §4, #26 §2): repeat i/N, step j/M and an ETA on stderr in every
mode, the failure's reason before any table, and one line of advice when the run ran slower than the plan."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import bench.runner
from bench.advice import command_for, run_advice
from bench.cli import main
from bench.config import BenchConfig
from bench.fit import Memory, fit_problem, predict
from bench.progress import RunProgress
from bench.results import BenchResult, capture_environment
from phi3v_core.cli.vocabulary import SHARED_FLAGS
from phi3v_core.progress import format_seconds
from tests.bench.factories import make_result

GIB = 1 << 30


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_show_repeat_step_and_eta_and_are_throttled() -> None:
    stream, clock = io.StringIO(), _Clock()
    progress = RunProgress(2, live=True, stream=stream, clock=clock, min_interval_s=10)  # StringIO: not a terminal
    progress.update(0, None)
    clock.now = 30
    progress.update(0, {"phase": "training", "step": 0, "total": 4, "warmup": 1})
    clock.now = 35
    progress.update(0, {"phase": "training", "step": 1, "total": 4, "warmup": 1})  # throttled: same phase, < 10 s
    clock.now = 60
    progress.update(0, {"phase": "training", "step": 2, "total": 4, "warmup": 1})
    progress.update(0, {"phase": "done"})
    lines = stream.getvalue().splitlines()
    assert lines[0] == "phi3v-bench run: repeat 1/2 · starting a fresh process · elapsed 0 s, ETA after the first step"
    assert lines[1].startswith("phi3v-bench run: repeat 1/2 · step 0/4 · elapsed 30 s")
    assert not any("step 1/4" in line for line in lines)
    # 2 of 4 steps of repeat 1 of 2 = a quarter done in 60 s: 3 minutes to go
    assert lines[2] == "phi3v-bench run: repeat 1/2 · step 2/4 · elapsed 1 m 00 s, ETA 3 m 00 s"
    assert lines[3] == "phi3v-bench run: repeat 1/2 · finished · elapsed 1 m 00 s, ETA 1 m 00 s"


def test_after_a_finished_repeat_the_eta_counts_down() -> None:
    """Once repeat 1 took 60 s, repeat 2's start and model build (no steps yet) leave ~60 s less the time it has
    taken; the ETA never grows with the elapsed time (it read "elapsed 1 m 24 s, ETA 1 m 24 s" in #24's capture)."""
    stream, clock = io.StringIO(), _Clock()
    progress = RunProgress(2, live=False, stream=stream, clock=clock, min_interval_s=0)
    progress.update(0, None)
    clock.now = 60
    progress.update(0, {"phase": "done"})
    for now, state in ((61, None), (76, {"phase": "building"}), (84, {"phase": "training", "step": 0, "total": 4})):
        clock.now = now
        progress.update(1, state)
    lines = stream.getvalue().splitlines()
    assert lines[1] == "phi3v-bench run: repeat 1/2 · finished · elapsed 1 m 00 s, ETA 1 m 00 s"
    assert lines[2:] == [
        "phi3v-bench run: repeat 2/2 · starting a fresh process · elapsed 1 m 01 s, ETA 1 m 00 s",
        "phi3v-bench run: repeat 2/2 · building the model · elapsed 1 m 16 s, ETA 45 s",
        "phi3v-bench run: repeat 2/2 · step 0/4 · elapsed 1 m 24 s, ETA 37 s",
    ]


def test_durations_read_as_a_person_would() -> None:
    assert [format_seconds(s) for s in (5, 185, 3720)] == ["5 s", "3 m 05 s", "1 h 02 m"]


def test_the_runner_reports_the_workers_progress_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in worker writes progress.json like rank 0 does; the runner reads it while it waits."""
    script = (
        "import json, pathlib, sys, time\n"
        "folder = pathlib.Path(sys.argv[1])\n"
        "(folder / 'progress.json').write_text(json.dumps({'phase': 'training', 'step': 3, 'total': 5, 'warmup': 1}))\n"
        "time.sleep(2)\n"
    )
    monkeypatch.setattr(bench.runner, "launch_commands",
                        lambda cfg, config, folder, **_: [[sys.executable, "-c", script, str(folder)]])
    seen: list[tuple[int, dict | None]] = []
    bench.runner.run_config(BenchConfig(release="t", repeats=1), timeout_s=120,
                            progress=lambda repeat, state: seen.append((repeat, state)))
    assert (0, {"phase": "training", "step": 3, "total": 5, "warmup": 1}) in seen
    assert seen[-1] == (0, {"phase": "done"})


def test_json_run_prints_progress_on_stderr_and_keeps_stdout_for_the_result(tmp_path, monkeypatch, capsys) -> None:
    def fake_run_config(cfg: BenchConfig, **_: object) -> BenchResult:
        report = bench.runner._REPORTER.get()
        report(0, {"phase": "training", "step": 2, "total": 4, "warmup": 1})
        report(0, {"phase": "done"})
        return make_result(cfg)

    monkeypatch.setattr(bench.runner, "run_config", fake_run_config)
    assert main(["run", "--out", str(tmp_path), "--repeats", "1", "--json"]) == 0
    captured = capsys.readouterr()
    assert "repeat 1/1 · step 2/4" in captured.err and "ETA" in captured.err
    json.loads(captured.out.strip().splitlines()[-1])  # stdout: the one JSON line


def test_a_failures_reason_comes_before_any_table(tmp_path, monkeypatch, capsys) -> None:
    def failed(cfg: BenchConfig, **_: object) -> BenchResult:
        return BenchResult.failure(cfg, "host_oom", "killed by the kernel's OOM killer", capture_environment())

    monkeypatch.setattr(bench.runner, "run_config", failed)
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["run", "--out", str(tmp_path), "--repeats", "1"]) == 1
    out = capsys.readouterr().out
    assert "host_oom: killed by the kernel's OOM killer" in out
    assert "img/s" not in out  # nothing was measured: no table of dashes


def _layout(micro: int, checkpointing: bool, speed: float, chosen: bool = False) -> SimpleNamespace:
    values = {"micro_batch": micro, "grad_accum": 8 // micro, "gradient_checkpointing": checkpointing,
              "optim": "adamw", "offload": "none", "samples_per_s": speed, "chosen": chosen}
    return SimpleNamespace(**values, to_dict=lambda: dict(values))


def test_advice_names_the_faster_layout_and_its_command() -> None:
    cfg = BenchConfig(method="lora", model="phi-3.5-vision", global_batch=8, micro_batch=1, release="t")
    plan = SimpleNamespace(layouts=[_layout(1, True, 1.0), _layout(2, False, 1.4, chosen=True)])
    line = run_advice(cfg, 45 * GIB, 80 * GIB, plan)
    assert line.startswith("peak 45.0 of 80.0 GiB; micro-batch 2 × 4, checkpointing off, adamw is predicted 1.4× faster: ")
    assert line.endswith(command_for(cfg, plan.layouts[1]))
    assert "--per_device_train_batch_size 2 --no_gradient_checkpointing" in line


def test_printed_commands_use_the_primary_spellings() -> None:
    """A command to copy uses the primary spelling of every shared flag (issue #24 §3), never an alias: the advice's
    command and the nearest layout a fit refusal names."""
    aliases = {alias for flag in SHARED_FLAGS.values() for alias in flag.aliases}
    cfg = BenchConfig(method="lora", model="phi-3.5-vision", global_batch=8, micro_batch=1, release="t")
    assert not aliases & set(command_for(cfg, _layout(2, False, 1.4)).split())
    refused = BenchConfig(method="lora", model="phi-3.5-vision", precision="fp32", release="t", global_batch=8,
                          micro_batch=4, gradient_checkpointing=False)
    fits = predict(BenchConfig(**{**refused.to_dict(), "micro_batch": 1, "gradient_checkpointing": True}), gpu=False)
    message = fit_problem(refused, False, Memory(None, fits.host_bytes + GIB / 10))
    nearest = message.split("nearest layout that fits: ")[1].split(" (predicted")[0]
    assert nearest == "--per_device_train_batch_size 1 --gradient_checkpointing"
    assert not aliases & set(nearest.split())


def test_no_advice_when_the_run_used_the_card_and_the_plans_layout() -> None:
    cfg = BenchConfig(method="lora", model="phi-3.5-vision", global_batch=8, micro_batch=2,
                      gradient_checkpointing=False, release="t")
    plan = SimpleNamespace(layouts=[_layout(1, True, 1.0), _layout(2, False, 1.4, chosen=True)])
    assert run_advice(cfg, 70 * GIB, 80 * GIB, plan) is None
    unused = run_advice(cfg, 20 * GIB, 80 * GIB, plan)
    assert unused.startswith("peak 20.0 of 80.0 GiB; no faster layout of lora")
