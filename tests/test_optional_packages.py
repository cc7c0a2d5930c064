"""The commands start without the optional packages they do not need; one that needs a missing one says so in one line.

A GPU node's image often lacks DeepSpeed, bitsandbytes and av (issue #22). Each command runs in a subprocess whose
``sitecustomize`` hides those packages from the import system, as if they were not installed, and logs every attempt
to import them: a command that should not need them must not even try.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.safety_helpers import HANG_GUARD_S, REPO, snapshot

HIDDEN = ("deepspeed", "bitsandbytes", "av")

_SITECUSTOMIZE = '''
import importlib.machinery, os, sys

_HIDDEN = set(os.environ["PHI3V_TEST_HIDE"].split(","))
_LOG = os.environ["PHI3V_TEST_HIDE_LOG"]


class _NotInstalled(importlib.machinery.PathFinder):
    """The path finder, blind to the hidden packages (``find_spec`` is None: what a missing package gives)."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in _HIDDEN:
            with open(_LOG, "a") as log:
                log.write(name + "\\n")
            return None
        return super().find_spec(name, path, target)


sys.meta_path = [_NotInstalled if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''


@pytest.fixture
def without_optional(tmp_path: Path):
    """Run ``python -m MODULE ARGS`` with DeepSpeed, bitsandbytes and av hidden; returns (process, attempted imports)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    log = tmp_path / "attempts.log"
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(site), str(REPO), env.get("PYTHONPATH", "")]),
        PHI3V_TEST_HIDE=",".join(HIDDEN),
        PHI3V_TEST_HIDE_LOG=str(log),
        PHI3V_CACHE=str(tmp_path / "cache"),
    )
    env.pop("PHI3V_DEBUG", None)

    def run(module: str, *args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
        proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                              cwd=REPO, timeout=HANG_GUARD_S)  # fmt: skip
        attempts = sorted({line.partition(".")[0] for line in log.read_text().split()}) if log.exists() else []
        return proc, attempts

    return run


def test_the_hider_hides(without_optional) -> None:
    proc, attempts = without_optional("bench.cli", "--help")
    assert proc.returncode == 0 and attempts == []
    code = "import importlib.util as u, sys; sys.exit(any(u.find_spec(n) for n in ('deepspeed','bitsandbytes','av')))"
    hidden = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": ""})
    assert hidden.returncode == 1  # installed here: the hider, not the machine, makes them missing above


@pytest.mark.parametrize(
    "argv",
    [
        ["planner.cli"],
        ["planner.cli", "--gpu", "H100-SXM", "--method", "lora", "--json"],
        ["planner.cli", "--calibration"],
        ["planner.cli", "--list-gpus"],
        ["bench.cli", "compare", "results/v0.1.0/cpu", "results/v0.1.0/cpu"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_plan_and_compare_run_without_deepspeed_bitsandbytes_and_av(without_optional, argv: list[str]) -> None:
    proc, attempts = without_optional(*argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert attempts == []  # not even tried


def test_report_runs_without_deepspeed_bitsandbytes_and_av(without_optional, tmp_path: Path) -> None:
    proc, attempts = without_optional("bench.cli", "report", "results/v0.1.0", "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "report" / "report.md").is_file() and attempts == []


def _one_line_naming(proc: subprocess.CompletedProcess[str], package: str) -> None:
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert f"pip install {package}" in proc.stderr


def test_a_qlora_benchmark_names_bitsandbytes_before_it_starts(without_optional, tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc, _ = without_optional("bench.cli", "run", "--method", "qlora", "--model", "tiny", "--steps", "2",
                               "--warmup", "1", "--repeats", "1", "--out", str(out), "--release", "t")  # fmt: skip
    _one_line_naming(proc, "bitsandbytes")
    assert "--method qlora" in proc.stderr and not out.exists()


def test_a_video_conversion_names_av(without_optional, tmp_path: Path) -> None:
    video = tmp_path / "ucf" / "train" / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g01_c01.avi"
    video.parent.mkdir(parents=True)
    video.write_bytes(b"not decoded: av is missing")
    before = snapshot(tmp_path / "ucf")
    proc, _ = without_optional("phi3v_core.cli.convert", "ucf101", "--src", str(tmp_path / "ucf"),
                               "--out_dir", str(tmp_path / "converted"))  # fmt: skip
    _one_line_naming(proc, "av")
    assert not (tmp_path / "converted").exists() and snapshot(tmp_path / "ucf") == before


def test_importing_the_commands_and_the_training_package_imports_no_optional_package() -> None:
    """The commands import their heavy parts when they run; the training path imports peft only with transformers'
    Trainer (``transformers.trainer_utils`` does, whenever peft is installed) and DeepSpeed/bitsandbytes not at all."""
    code = (
        "import sys, importlib\n"
        "for m in ('bench.cli', 'planner.cli', 'phi3v_core.cli.finetune', 'phi3v_core.cli.convert'):\n"
        "    importlib.import_module(m)\n"
        "light = sorted(p for p in ('peft', 'deepspeed', 'bitsandbytes', 'av') if p in sys.modules)\n"
        "import phi3v_core.training\n"
        "heavy = sorted(p for p in ('deepspeed', 'bitsandbytes', 'av') if p in sys.modules)\n"
        "print(light, heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=HANG_GUARD_S)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[] []"
