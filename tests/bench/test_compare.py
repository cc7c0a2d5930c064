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


def test_cli_at_80_columns_never_cuts_a_verdict(two_releases, capsys, monkeypatch) -> None:
    base, cand = two_releases
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["compare", str(base), str(cand)]) == EXIT_REGRESSION
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    table = [line for line in lines if line.startswith("│")]
    assert any(line.rstrip(" │").endswith("regressed") for line in table)
    assert any(line.rstrip(" │").endswith("same") for line in table)
    assert "…" not in out
    # the statistic is named, and each verdict says why
    assert "img/s = median over repeats of (images per step ÷ the repeat's median step time)" in out.replace("\n", " ")
    assert "regressed: img/s: Δ -20.0% > max(5%" in out.replace("\n", " ") or "regressed: img/s: Δ" in out


def test_one_number_per_result_run_and_compare_agree() -> None:
    # Even steps per repeat and jitter: the median of pooled steps and the median of per-repeat values differ, so
    # one statistic must be used everywhere.
    a = make_result(LORA, steps=4, repeats=3, jitter=0.2, seed=5)
    b = make_result(LORA, steps=4, repeats=3, jitter=0.2, seed=6)
    m = compare_results([a], [b]).matches[0]
    assert m.throughput.a == a.summary.img_per_s and m.throughput.b == b.summary.img_per_s
    assert a.summary.img_per_s == pytest.approx(a.metrics.images_per_step / a.summary.step_time_median_s)


def test_minus_47_percent_against_one_repeat_is_not_same() -> None:
    a = make_result(LORA, repeats=1, step_time=0.5, seed=1)
    b = make_result(LORA, repeats=3, step_time=0.5, jitter=0.0, seed=2)
    for rep, share in zip(b.metrics.repeats, (0.40, 0.526, 0.70)):  # B's repeats scatter by ±30 %
        rep.step_times_s = [t / share for t in rep.step_times_s]
    m = compare_results([a], [b]).matches[0]
    assert m.throughput.delta_pct == pytest.approx(-47.4, abs=1.5)
    assert m.verdict == "inconclusive"
    assert "would decide it" in m.reason or "run >= 3 repeats" in m.reason


def test_drift_is_flagged_before_the_verdict(capsys) -> None:
    newer = gpu_env()
    newer.packages = {**newer.packages, "transformers": "4.99.0", "torch": "2.14.0"}
    a = make_result(LORA, seed=1)
    b = make_result(LORA, seed=2, env=newer)
    b.metrics.tokens_per_step = a.metrics.tokens_per_step + 64  # what a step is changed
    report = compare_results([a], [b])
    drift = report.matches[0].drift
    assert "torch 2.13.0 vs 2.14.0" in drift and "transformers absent vs 4.99.0" in drift
    assert any(d.startswith("tokens per step") for d in drift)
    assert report.to_dict()["matches"][0]["drift"] == drift
    text = report.to_markdown()
    assert text.index("DRIFT") < text.index(f"{report.matches[0].cell}: same")
    from rich.console import Console

    report.print_rich(Console(width=80), "compare")
    out = capsys.readouterr().out
    assert out.lstrip().startswith("DRIFT")  # before the table and any verdict


def test_results_that_differ_in_optimizer_state_are_not_compared_and_say_why() -> None:
    a = make_result(LORA, seed=1)
    b = make_result(LORA.replace(optim="adamw_8bit"), seed=2)
    c = make_result(FULL, seed=3)
    report = compare_results([a, c], [b, make_result(FULL, seed=4)])
    assert [m.identity["method"] for m in report.matches] == ["full"]
    assert any("differ in optim (adamw vs adamw_8bit)" in n for n in report.notes)


def test_old_results_without_the_new_fields_still_compare(tmp_path) -> None:
    import json as _json

    from bench.store import read_results

    path = save_result(make_result(LORA, seed=1), tmp_path)
    data = _json.loads(path.read_text())
    for rep in data["metrics"]["repeats"]:
        for m in rep["memory"]:
            m.pop("energy_j", None)
    data["metrics"].pop("attention_flops_per_step", None)
    path.write_text(_json.dumps(data))
    (_, old), = read_results([path])
    assert old.summary.energy_j_per_sample is None and old.summary.mfu_6n is None
    assert compare_results([old], [make_result(LORA, seed=2)]).matches[0].verdict == "same"
