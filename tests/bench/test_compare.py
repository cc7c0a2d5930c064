"""compare: matching by config identity, failure transitions, exit codes and output formats."""

from __future__ import annotations

import json

import pytest

from bench.cli import main
from bench.compare import EXIT_REGRESSION, compare_results
from bench.config import BenchConfig
from bench.results import BenchResult
from bench.store import save_result
from phi3v_core.errors import DataError
from tests.bench.factories import GIB, gpu_env, make_result

LORA = BenchConfig(method="lora", gpus=8, global_batch=64, release="v1")
FULL = BenchConfig(method="full", gpus=8, global_batch=64, release="v1")


def test_matching_ignores_protocol_fields_and_lists_unmatched() -> None:
    a = [make_result(LORA, seed=1), make_result(FULL, seed=2)]
    b = [make_result(LORA.replace(steps=20, release="v2"), seed=3),
         make_result(LORA.replace(method="qlora", release="v2"), seed=4)]
    report = compare_results(a, b)
    assert [m.identity["method"] for m in report.matches] == ["lora"]
    assert [i["method"] for i in report.only_a] == ["full"]
    assert [i["method"] for i in report.only_b] == ["qlora"]
    assert report.matches[0].verdict == "same"
    assert report.exit_code == 0


def test_slowdown_and_memory_growth_regress() -> None:
    slow = compare_results([make_result(LORA, step_time=0.5, seed=1)], [make_result(LORA, step_time=0.6, seed=2)])
    assert slow.matches[0].verdict == "regressed" and slow.exit_code == EXIT_REGRESSION
    fat = compare_results([make_result(LORA, seed=1)], [make_result(LORA, seed=1, allocated=22 * GIB)])
    m = fat.matches[0]
    assert m.throughput.verdict == "same"
    assert {c.field: c.verdict for c in m.memory}["gpu_allocated_bytes"] == "regressed"
    assert m.verdict == "regressed"


def test_new_oom_is_a_regression_and_fixed_oom_is_not() -> None:
    oom = BenchResult.failure(LORA, "oom", "CUDA out of memory", gpu_env())
    broke = compare_results([make_result(LORA)], [oom])
    assert broke.matches[0].status == "ok→oom" and broke.matches[0].verdict == "regressed"
    fixed = compare_results([oom], [make_result(LORA)])
    assert fixed.matches[0].verdict == "improved" and fixed.exit_code == 0


def test_duplicate_identity_on_one_side_is_ambiguous() -> None:
    with pytest.raises(DataError, match="two results for"):
        compare_results([make_result(LORA), make_result(LORA.replace(steps=3))], [make_result(LORA)])


@pytest.fixture
def two_releases(tmp_path):
    base, cand = tmp_path / "a", tmp_path / "b"
    save_result(make_result(LORA, step_time=0.50, seed=1), base)
    save_result(make_result(FULL, step_time=1.00, seed=2), base)
    save_result(make_result(LORA.replace(release="v2"), step_time=0.50, seed=3), cand)
    save_result(make_result(FULL.replace(release="v2"), step_time=1.25, seed=4), cand)  # full got 20 % slower
    return base, cand


def test_cli_exit_code_two_on_regression_with_json(two_releases, capsys) -> None:
    base, cand = two_releases
    assert main(["compare", str(base), str(cand), "--json"]) == EXIT_REGRESSION
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    verdicts = {m["identity"]["method"]: m["verdict"] for m in data["matches"]}
    assert verdicts == {"lora": "same", "full": "regressed"}
    assert data["regressions"] == 1 and data["exit_code"] == 2


def test_cli_no_regression_exit_zero_and_markdown(two_releases, capsys) -> None:
    base, _ = two_releases
    assert main(["compare", str(base), str(base), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| method | layout | img/s A | img/s B | Δ img/s |")
    assert "| recipe: micro-batch 1 × " in out  # the layout each side measured
    assert "2 matched, 0 regressed" in out


def test_cli_rich_table(two_releases, capsys) -> None:
    base, cand = two_releases
    assert main(["compare", str(base), str(cand)]) == EXIT_REGRESSION
    out = capsys.readouterr().out
    assert "regressed" in out and "1 regressed" in out


def test_cli_empty_side_is_a_user_error(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(tmp_path / "empty"), str(tmp_path / "empty")])
    assert exc.value.code == 1
    assert "holds no result .json files" in capsys.readouterr().err
