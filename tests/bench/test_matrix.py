"""Sweeps: presets, grids, OOM/error rows with an injected runner, resume, progress bar."""

from __future__ import annotations

import io

import pytest
import torch

from bench.config import BenchConfig
from bench.matrix import PRESETS, build_cells, classify_failure, parse_assignments, parse_grid, run_matrix
from bench.reference import load_reference_speed
from bench.results import BenchResult
from bench.store import load_result, result_path
from phi3v_core.errors import ConfigError
from phi3v_core.methods import METHOD_NAMES, METHODS
from tests.bench.factories import gpu_env, make_result


class FakeRunner:
    """Stands in for bench.runner.run_config: records calls, fails on chosen methods."""

    def __init__(self, oom: tuple[str, ...] = (), crash: tuple[str, ...] = (), returned_oom: tuple[str, ...] = ()):
        self.calls: list[str] = []
        self.oom, self.crash, self.returned_oom = oom, crash, returned_oom

    def __call__(self, cfg: BenchConfig) -> BenchResult:
        self.calls.append(cfg.cell_id())
        if cfg.method in self.oom:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if cfg.method in self.crash:
            raise RuntimeError("NCCL error: unhandled system error\nsecond line")
        if cfg.method in self.returned_oom:
            return BenchResult.failure(cfg, "oom", "OOM at micro-step 3", gpu_env(count=cfg.gpus), failed_at_step=1)
        return make_result(cfg, env=gpu_env(count=cfg.gpus))


def quick_cells(tmp_path, **overrides) -> list[BenchConfig]:
    """The quick sweep's cells of the recipe's four methods (the fake runners below name those)."""
    cells = build_cells("quick", overrides={"out": str(tmp_path), "release": "v-test", **overrides})
    return [c for c in cells if METHODS[c.method].recipe_name is not None]


def test_presets_are_valid_and_sized_like_the_seed_tables() -> None:
    # quick: every registered method with both portable attention kernels
    quick = 2 * len(METHOD_NAMES)
    assert {name: len(build_cells(name)) for name in PRESETS} == {"seed-a100": 10, "seed-v100": 5, "quick": quick}


@pytest.mark.parametrize(("preset", "hardware"), [("seed-a100", "8xA100-80GB"), ("seed-v100", "8xV100-32GB")])
def test_seed_presets_cover_exactly_the_published_rows(preset, hardware) -> None:
    ref = load_reference_speed()
    published = {(r.method, r.nodes, r.flash_attention, r.gpus) for r in ref[ref.hardware == hardware].itertuples()}
    ours = {(c.method, c.nodes, c.attn == "flash_attention_2", c.world_size) for c in build_cells(preset)}
    assert ours == published
    assert all(c.global_batch == 64 and c.num_crops == 16 and c.seq_profile == "docvqa" for c in build_cells(preset))


def test_grid_expands_a_cartesian_product_over_preset_cells() -> None:
    grid = parse_grid(["method=lora,qlora", "attn=sdpa,eager"])
    cells = build_cells(None, grid, parse_assignments(["model=tiny", "steps=5"]))
    assert [(c.method, c.attn) for c in cells] == [("lora", "sdpa"), ("lora", "eager"), ("qlora", "sdpa"),
                                                  ("qlora", "eager")]
    assert all(c.steps == 5 for c in cells)
    # A grid axis replaces the preset's value; duplicates collapse.
    assert len(build_cells("quick", {"attn": ["sdpa"]})) == len(METHOD_NAMES)


def test_grid_and_set_parse_errors_are_reported_together() -> None:
    with pytest.raises(ConfigError) as err:
        parse_grid(["method", "stepz=1,2", "steps=3,4", "gpus=1", "gpus=2"])
    text = str(err.value)
    assert text.startswith("4 problems")
    assert "must look like field=v1,v2" in text and "did you mean 'steps'" in text
    assert "use --set for steps" in text and "given twice" in text
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignments(["steps"])


def test_invalid_cells_are_rejected_before_anything_runs() -> None:
    with pytest.raises(ConfigError, match=r"method 'sft'.*\(cell sft-"):
        build_cells(None, {"method": ["lora", "sft"]})


def test_oom_and_crash_become_rows_and_the_sweep_goes_on(tmp_path) -> None:
    runner = FakeRunner(oom=("qlora",), crash=("frozen_vision",), returned_oom=("full",))
    cells = quick_cells(tmp_path)
    summary = run_matrix(cells, environment=gpu_env(count=1), run_cell=runner, progress=False)
    assert len(runner.calls) == 8  # every cell ran despite the failures
    assert summary.counts() == {"ok": 2, "oom": 4, "error": 2, "skipped": 0}
    for outcome in summary.outcomes:
        stored = load_result(outcome.path)
        assert stored.status == outcome.status
        assert outcome.path == result_path(tmp_path, "v-test", "1xA100-SXM4-80GB", outcome.config)
        if outcome.config.method == "qlora":
            assert stored.message.startswith("OutOfMemoryError: CUDA out of memory")
            assert stored.environment.hardware == "1xA100-SXM4-80GB"  # failure rows still say where they ran
        if outcome.config.method == "frozen_vision":
            assert stored.message == "RuntimeError: NCCL error: unhandled system error"
        if outcome.config.method == "full":
            assert stored.failed_at_step == 1


def test_resume_skips_finished_cells_and_retries_errors(tmp_path) -> None:
    cells = quick_cells(tmp_path)
    run_matrix(cells, environment=gpu_env(count=1), run_cell=FakeRunner(oom=("qlora",), crash=("lora",)),
               progress=False)
    again = FakeRunner()
    summary = run_matrix(cells, environment=gpu_env(count=1), run_cell=again, progress=False)
    assert sorted(again.calls) == sorted(c.cell_id() for c in cells if c.method == "lora")  # errors retried only
    assert summary.counts() == {"ok": 2, "oom": 0, "error": 0, "skipped": 6}
    forced = FakeRunner()
    run_matrix(cells, environment=gpu_env(count=1), run_cell=forced, force=True, progress=False)
    assert len(forced.calls) == 8


def test_corrupt_result_file_is_re_measured(tmp_path) -> None:
    cells = quick_cells(tmp_path)[:1]
    path = result_path(tmp_path, "v-test", "1xA100-SXM4-80GB", cells[0])
    path.parent.mkdir(parents=True)
    path.write_text('{"half": ')  # e.g. written by a tool without atomic writes
    runner = FakeRunner()
    run_matrix(cells, environment=gpu_env(count=1), run_cell=runner, progress=False)
    assert runner.calls == [cells[0].cell_id()]
    assert load_result(path).status == "ok"


@pytest.mark.parametrize("force", [False, True])
def test_a_newer_versions_finished_result_is_never_replaced(tmp_path, force) -> None:
    cells = quick_cells(tmp_path)[:1]
    path = result_path(tmp_path, "v-test", "1xA100-SXM4-80GB", cells[0])
    path.parent.mkdir(parents=True)
    newer = make_result(cells[0], env=gpu_env(count=1)).to_dict() | {"schema_version": 99}
    import json

    path.write_text(json.dumps(newer))
    before = path.read_bytes()
    runner = FakeRunner()
    summary = run_matrix(cells, environment=gpu_env(count=1), run_cell=runner, force=force, progress=False)
    assert runner.calls == [] and path.read_bytes() == before
    assert summary.outcomes[0].status == "skipped" and "newer phi3v-bench" in summary.outcomes[0].message


def test_failed_write_keeps_the_measured_result_and_stops_the_sweep(tmp_path, monkeypatch) -> None:
    """A full disk fails every later write too: the sweep stops, and the cell it measured stays in the summary."""
    import errno

    import bench.matrix

    def read_only(path, text):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(bench.matrix, "atomic_write_text", read_only)
    cells = quick_cells(tmp_path)
    runner = FakeRunner()
    summary = run_matrix(cells, environment=gpu_env(count=1), run_cell=runner, progress=False)
    assert runner.calls == [cells[0].cell_id()]  # stopped after the first cell
    (outcome,) = summary.outcomes
    assert outcome.saved is False and outcome.status == "ok" and outcome.result is not None
    assert "read-only file system" in summary.write_error and str(outcome.path) in summary.write_error
    cell = summary.to_dict()["cells"][0]
    assert cell["saved"] is False and cell["result"]["summary"]["img_per_s"] == outcome.result.summary.img_per_s
    assert not any(tmp_path.rglob("*.json"))


def test_runner_must_return_the_config_it_was_given(tmp_path) -> None:
    cells = quick_cells(tmp_path)[:1]
    summary = run_matrix(cells, environment=gpu_env(count=1), progress=False,
                         run_cell=lambda cfg: make_result(cfg.replace(method="lora")))
    assert summary.outcomes[0].status == "error"
    assert "returned a result for" in summary.outcomes[0].message


def test_default_runner_is_bench_runner_run_config(tmp_path, monkeypatch) -> None:
    import bench.runner

    runner = FakeRunner()
    monkeypatch.setattr(bench.runner, "run_config", runner)
    run_matrix(quick_cells(tmp_path)[:2], environment=gpu_env(count=1), progress=False)
    assert len(runner.calls) == 2


def test_progress_bar_draws_the_sweep(tmp_path) -> None:
    from rich.console import Console

    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=160)
    run_matrix(quick_cells(tmp_path)[:2], environment=gpu_env(count=1), run_cell=FakeRunner(),
               progress=True, console=console)
    drawn = stream.getvalue()
    assert "2/2" in drawn and "ok 2" in drawn


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (torch.OutOfMemoryError("CUDA out of memory"), "oom"),
        (MemoryError(), "host_oom"),
        (RuntimeError("CUDA error: out of memory"), "oom"),
        (RuntimeError("NCCL error: unhandled cuda error, NCCL version 2.21.5; Cuda failure 2 'out of memory'"), "oom"),
        (RuntimeError("CUDA driver error: out of memory"), "oom"),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), "oom"),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
                      "to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"), "host_oom"),
        (RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"), "oom"),
        (RuntimeError("shape mismatch"), "error"),
        (ValueError("bad"), "error"),
    ],
)
def test_classify_failure(exc, status) -> None:
    assert classify_failure(exc) == status


def test_resume_keeps_host_oom_and_retries_killed_and_timeout(tmp_path) -> None:
    status_of = {"qlora": "host_oom", "full": "killed", "frozen_vision": "timeout"}

    def first_run(cfg: BenchConfig) -> BenchResult:
        if cfg.method in status_of:
            return BenchResult.failure(cfg, status_of[cfg.method], "it happened", gpu_env(count=cfg.gpus))
        return make_result(cfg, env=gpu_env(count=cfg.gpus))

    cells = quick_cells(tmp_path)
    summary = run_matrix(cells, environment=gpu_env(count=1), run_cell=first_run, progress=False)
    assert summary.counts() == {"ok": 2, "oom": 0, "error": 0, "skipped": 0, "host_oom": 2, "killed": 2, "timeout": 2}
    again = FakeRunner()
    run_matrix(cells, environment=gpu_env(count=1), run_cell=again, progress=False)
    # host_oom is an answer about this machine (kept); a signal from outside or a timeout is retried.
    assert sorted(again.calls) == sorted(c.cell_id() for c in cells if c.method in ("full", "frozen_vision"))


@pytest.mark.parametrize(("sets", "said"), [
    ({"offload": "optimizer"}, "offload optimizer is DeepSpeed ZeRO-2's, for full/frozen_vision, not lora"),
    ({"offload": "optimizer", "optim": "adamw_8bit"}, "offload optimizer steps with DeepSpeed's CPU Adam"),
])  # fmt: skip
def test_cells_run_would_refuse_are_refused_before_the_sweep(tmp_path, sets, said) -> None:
    with pytest.raises(ConfigError, match=said.replace("(", r"\(")):
        quick_cells(tmp_path, **sets)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("release", ["validation", "reference"])
def test_a_release_named_like_the_planners_folders_is_refused_at_write_time(tmp_path, release) -> None:
    with pytest.raises(ConfigError, match=f"release '{release}' is reserved"):
        quick_cells(tmp_path, release=release)


def test_sweep_table_at_80_columns_shows_whole_cell_names() -> None:
    import io
    from pathlib import Path

    from rich.console import Console

    from bench.matrix import CellOutcome, MatrixSummary
    from bench.run_view import print_sweep
    from tests.bench.factories import make_result

    cfgs = [BenchConfig(method="lora", model="tiny", release="v1", gradient_checkpointing=gc, optim=o)
            for gc in (True, False) for o in ("adamw", "adamw_8bit")]
    summary = MatrixSummary([CellOutcome(c, "ok", Path("x.json"), "", make_result(c)) for c in cfgs])
    out = io.StringIO()
    print_sweep(Console(file=out, width=80), summary, len(cfgs))
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    joined = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│"))
    for c in cfgs:  # folded across lines, never cut: the differing tails (nogc, adamw_8bit) are all there
        assert c.cell_id() in joined
