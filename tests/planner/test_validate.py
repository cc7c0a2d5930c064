"""The speed model against real phi3v-bench steps on this CPU (issue #10 item 3)."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
from pathlib import Path

import pytest

from planner.validate import DEFAULT_CASES, ValidationCase, checkpoint_ratios, measure_rates, validate_cpu


def test_micro_benchmark_measures_positive_rates():
    rates = measure_rates(0.3)
    assert rates.matmul_flops > 1e8 and rates.bandwidth > 1e8 and rates.softmax_elements_per_s > 1e5
    assert 0 < rates.op_overhead_s < 1e-2 and "measured on this CPU" in rates.source


def test_cases_span_methods_lengths_batches_and_two_model_sizes():
    assert len(DEFAULT_CASES) >= 6
    assert {c.model for c in DEFAULT_CASES} == {"tiny", "mid"}
    assert len({c.method for c in DEFAULT_CASES}) >= 3
    assert len({c.num_crops for c in DEFAULT_CASES}) >= 2 and len({c.micro_batch for c in DEFAULT_CASES}) >= 2


def test_checkpointing_is_validated_both_ways_and_paired():
    pairs = {(c.model, c.method, c.num_crops, c.micro_batch) for c in DEFAULT_CASES if not c.gradient_checkpointing}
    assert pairs and all(
        any(c.gradient_checkpointing and (c.model, c.method, c.num_crops, c.micro_batch) == p for c in DEFAULT_CASES)
        for p in pairs
    )
    row = dict(model="mid", method="lora", num_crops=4, micro_batch=1, grad_accum=1, case="x")
    rows = [
        {**row, "gradient_checkpointing": True, "measured_s": 6.0, "predicted_s": 7.0, "predicted_other_checkpointing_s": 5.0},
        {**row, "gradient_checkpointing": False, "measured_s": 5.0, "predicted_s": 4.0, "predicted_other_checkpointing_s": 5.6},
    ]
    (ratio,) = checkpoint_ratios(rows)
    assert ratio["predicted_ratio"] == pytest.approx(1.4) and ratio["measured_ratio"] == pytest.approx(1.2)
    assert ratio["error_pct"] == pytest.approx(100 * (1.4 / 1.2 - 1))


def test_validation_measures_predicts_and_compares_each_case():
    """The machinery of ``phi3v-plan --validate`` on a checkpointing pair of tiny cases: real steps measured, the
    speed model's prediction beside them, the error and the on/off ratio computed from the two.

    How close the prediction comes is a speed figure of a shared CPU, not a test: ``phi3v-plan --validate`` reports
    it (README "Validation"), and a loaded machine moves it by tens of per cent.
    """
    cases = (ValidationCase("tiny", "lora", 1, 1, 1, True), ValidationCase("tiny", "lora", 1, 1, 1, False))
    result = validate_cpu(cases, steps=1, bench_seconds=0.2)
    rows = result["rows"]
    assert [r["case"] for r in rows] == [c.label for c in cases]
    for row in rows:
        assert row["measured_s"] > 0 and row["predicted_s"] > 0 and len(row["repeats"]) == 1
        assert row["error_pct"] == pytest.approx(100 * (row["predicted_s"] / row["measured_s"] - 1))
        assert "measured on this CPU" in row["rates"]
        # the model's sequence length is the processor's (the bench encodes real samples)
        assert abs(row["seq_len_predicted"] - row["tokens_per_sample_measured"]) <= 8
    assert result["median_abs_error_pct"] == pytest.approx(statistics.median(abs(r["error_pct"]) for r in rows))
    (ratio,) = result["checkpoint_ratios"]
    assert ratio["measured_ratio"] == pytest.approx(rows[0]["measured_s"] / rows[1]["measured_s"])
    assert ratio["predicted_ratio"] > 1  # recompute costs time in the model


def test_saved_validation_names_machine_commit_date_and_command(tmp_path):
    from planner.validate import save_validation

    result = {"rows": [], "median_abs_error_pct": None, "repeats": 3}
    path = save_validation(result, tmp_path / "v.json", "phi3v-plan --validate --repeats 3")
    record = json.loads(path.read_text())
    assert record["result"] == result and record["command"] == "phi3v-plan --validate --repeats 3"
    assert record["machine"].startswith(("cpu-", "1x", "2x", "4x", "8x")) and record["date"][:2] == "20"
    assert record["environment"]["cpu_count"] >= 1
    # the commit is the source tree's own, not merely a key that may hold None
    head = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[2]), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    if not head:
        pytest.skip("not a git checkout: no commit to record")
    assert record["git_sha"] == head and re.fullmatch(r"[0-9a-f]{40}", record["git_sha"])
    assert isinstance(record["git_dirty"], bool)
