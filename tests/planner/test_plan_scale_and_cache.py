"""phi3v-plan from the user's side: GPU counts checked against real nodes and the data, a corrupt trace cache rebuilt
with a warning, stdout named when writing to it fails."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from planner.cli import main
from planner.trace_cache import read_cached_trace
from tests.safety_helpers import HANG_GUARD_S, expect_user_error

GPU = ["--gpu", "A100-80GB", "--method", "lora"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--count", "1000"], "--gpus 1000 GPUs in one node: the largest nodes hold 16"),
        (["--count", "17"], "spread them over nodes, e.g. --gpus 8 --nodes 3"),
        (["--count", "8", "--nodes", "2", "--dataset-size", "10"], "--dataset-size 10 is smaller than the 16 GPUs"),
        (["--count", "8", "--batch-size", "4"], "--batch_size 4 is smaller than the 8 GPUs"),
    ],
    ids=["1000-in-one-node", "17-in-one-node", "fewer-samples-than-gpus", "batch-below-gpus"],
)
def test_scale_refusals(argv, expected, tmp_path, capsys):
    expect_user_error(main, [*GPU, *argv], expected, tmp_path, capsys)


def test_sixteen_gpus_in_one_node_is_a_real_node(capsys):
    """16 GPUs in one node is planned as such: one node of 16, the global batch split over 16 ranks, a fitting plan."""
    assert main([*GPU, "--count", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    hardware = out["hardware"]
    assert (hardware["gpus_per_node"], hardware["nodes"]) == (16, 1)
    (lora,) = out["methods"]
    assert lora["method"] == "lora" and lora["fits"]
    assert lora["micro_batch"] * lora["grad_accum"] * 16 == lora["global_batch"] == 64
    assert lora["command"].startswith("torchrun --nproc_per_node=16 ")


def test_scale_problems_are_reported_together(tmp_path, capsys):
    err = expect_user_error(
        main, [*GPU, "--count", "1000", "--dataset-size", "5", "--batch-size", "2"], "3 problems", tmp_path, capsys
    )
    assert "--dataset-size 5" in err and "--batch_size 2" in err


def _trace_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "traces" / "k.json"
    path.parent.mkdir()
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text",
    [
        '{"key": "k", "dyn',
        "[]",
        '{"key": "other", "dynamic": 1}',
        '{"key": "k", "dynamic": "x"}',
        "\udcff"[:0] + "\x00",
    ],
    ids=["truncated", "array", "other-key", "garbage-fields", "binary"],
)
def test_an_unusable_trace_cache_is_rebuilt_with_a_warning(text, tmp_path, caplog):
    path = _trace_file(tmp_path, text)
    with caplog.at_level(logging.WARNING, logger="planner.trace_cache"):
        assert read_cached_trace(path, "k") is None
    assert any(f"trace cache {path} ignored and rebuilt" in r.getMessage() for r in caplog.records)


def test_a_good_trace_cache_is_used(tmp_path):
    good = {"key": "k", "dynamic": 5, "micro_batch": 1, "seq_len": 10, "dynamic_snapshot": {}, "peak": {}}
    path = _trace_file(tmp_path, json.dumps(good))
    assert read_cached_trace(path, "k") == {**good, "cached": True}


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("fmt", [["--json"], []], ids=["json", "table"])
def test_a_full_stdout_is_named(fmt):
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "planner.cli", *GPU, *fmt],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=HANG_GUARD_S,
            env={**os.environ, "PHI3V_DEBUG": ""},
        )
    assert done.returncode == 1, done.stderr
    assert (
        done.stderr == "error: writing to standard output (stdout): no space left on the device; free space or "
        "write elsewhere\n"
    )
