"""A stdout that goes away (``| head -1``) or was never open (``>&-``) costs no work (issue #27 §2), real processes."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.safety_helpers import HANG_GUARD_S, repo_env

LEAN = ["--synthetic", "2", "--use_lora", "--lora_rank", "4", "--num_crops", "1", "--batch_size", "1",
        "--max_steps", "1", "--warmup_steps", "0", "--no-eval", "--no-tqdm"]  # fmt: skip


def _env() -> dict[str, str]:
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PHI3V_MODEL", "PHI3V_DEBUG")
    return {**{k: v for k, v in repo_env().items() if k not in drop}, "HF_HUB_OFFLINE": "1"}


def _closed_stdout(module: str, *argv: str) -> subprocess.CompletedProcess:
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", module, *argv])
    return subprocess.run(["bash", "-c", f"{command} >&-"], env=_env(), capture_output=True, text=True,
                          timeout=HANG_GUARD_S)  # fmt: skip


@pytest.mark.parametrize("argv", [["planner.cli", "--gpu", "A100-80GB"], ["planner.cli", "--gpu", "A100-80GB", "--json"]])
def test_a_closed_stdout_does_not_turn_a_read_only_command_into_an_error(argv):
    proc = _closed_stdout(*argv)
    assert proc.returncode == 0 and "error" not in proc.stderr, proc.stderr


def test_a_closed_stdout_does_not_crash_convert_nor_end_up_in_its_files(tmp_path):
    out = tmp_path / "data"
    proc = _closed_stdout("phi3v_core.cli.convert", "synthetic", "--task", "nlvr2", "--n", "2", "--out_dir", str(out))
    assert proc.returncode == 0 and "error" not in proc.stderr, proc.stderr
    for path in out.rglob("*.jsonl"):
        for line in path.read_text().splitlines():
            json.loads(line)  # no printed table landed in a file that took descriptor 1
    assert not list(tmp_path.glob(".data*"))  # the lock beside the folder released and removed


def test_finetune_piped_into_head_keeps_training_and_saves_the_model(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "phi3v_core.cli.finetune", *LEAN, "--output_dir", str(out)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = proc.stdout.readline()  # what `| head -1` reads, then it exits
    proc.stdout.close()
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert first, err
    assert proc.returncode == 0, err[-2000:]
    assert "standard output was closed by its reader; the command goes on" in err
    assert (out / "run_complete.json").is_file() and (out / "adapter_model.safetensors").is_file()


def test_a_fifo_named_json_does_not_hang_compare(tmp_path):
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        os.mkfifo(tmp_path / side / "cell.json")
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "compare", str(tmp_path / "a"), str(tmp_path / "b")],
                          env=_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
    assert "FIFO" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert Path(tmp_path / "a" / "cell.json").exists()
