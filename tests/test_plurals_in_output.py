"""No "(s)" in what a newcomer reads (issue #24 §3: "1 crops", "1 node(s)"): the plan's workload line, compare's
reason for a verdict and the notes of a run count in the right number."""

from __future__ import annotations

import pytest

from bench.cli import main as bench_main
from bench.stats import compare_repeats
from bench.store import save_result
from planner.cli import main as plan_main
from tests.bench.factories import make_result


@pytest.mark.parametrize(("images", "expected"), [("1", "1 image x 2 crops"), ("2", "2 images x 2 crops")])
def test_the_plan_workload_line_counts_in_words(capsys, monkeypatch, images, expected):
    monkeypatch.setenv("COLUMNS", "400")
    assert plan_main(["--gpu", "RTX4090", "--num_crops", "1", "--images", images]) == 0
    workload = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Workload:"))
    assert expected in workload and "(s)" not in workload


def test_compare_names_the_repeats_in_words():
    many = compare_repeats([0.34], [0.25, 0.26]).reason
    assert "A has 1 and B 2 repeats," in many and "(s)" not in many
    noisy = compare_repeats([0.34, 0.20], [0.30]).reason  # within the noise: the "few repeats" clause
    assert "A has 2, B 1 repeat;" in noisy and "(s)" not in noisy
    single = compare_repeats([0.34, 0.33], [0.25]).reason
    assert "A has 2 and B 1 repeat," in single and "(s)" not in single


def test_report_counts_its_plots_in_words(tmp_path, capsys):
    save_result(make_result(), tmp_path / "results")  # one configuration, one release
    assert bench_main(["report", str(tmp_path / "results"), "--out", str(tmp_path / "report")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "and 0 plots from 1 result" in out, out  # one point: no plot is drawn
    assert "(s)" not in out and "1 plots" not in out and "1 results" not in out
