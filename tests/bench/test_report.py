"""report: markdown in the seed's layout beside the published rows, and valid PNG plots."""

from __future__ import annotations

import pytest
from PIL import Image

from bench.config import BenchConfig
from bench.report import build_report, write_report
from bench.results import BenchResult
from phi3v_core.errors import DataError
from tests.bench.factories import GIB, gpu_env, make_result

SEED = dict(model="phi-3.5-vision", gpus=8, global_batch=64, num_crops=16, seq_profile="docvqa", release="v1")


@pytest.fixture(scope="module")
def a100_results() -> list[BenchResult]:
    full = BenchConfig(method="full", attn="eager", precision="fp16", **SEED)
    return [
        make_result(full, step_time=64 / 5.0, seed=1),  # ~5 img/s: the seed's 1x row
        make_result(full.replace(attn="flash_attention_2", precision="bf16"), step_time=64 / 8.7, seed=2),
        make_result(full.replace(attn="flash_attention_2", precision="bf16", nodes=2), step_time=64 / 17.0, seed=3,
                    env=gpu_env()),
        make_result(BenchConfig(method="lora", attn="flash_attention_2", **SEED), step_time=64 / 12.0, seed=4),
        BenchResult.failure(BenchConfig(method="qlora", attn="eager", precision="fp16", **SEED), "oom",
                            "CUDA out of memory", gpu_env()),
    ]


def test_report_markdown_and_pngs(tmp_path, a100_results) -> None:
    report = build_report(a100_results)
    paths = write_report(report, tmp_path / "out")
    md = paths[0].read_text()
    assert paths[0].name == "report.md"
    assert "## v1 · 8xA100-SXM4-80GB" in md
    assert ("| Method | precision | # nodes | GPUs | Attention kernel | Effective batch | Layout | img/s | img/s/GPU | "
            "Speed-up |" in md)
    # Our full/1 node/eager row is 1.00x and sits beside the published 5.041 img/s, ~42 GB row.
    full_row = next(line for line in md.splitlines() if line.startswith("| full | fp16 | 1 | 8 | eager |"))
    assert "| 1.00x |" in full_row and "| 5.041 | ~42 |" in full_row
    assert "| recipe: micro-batch " in full_row and "checkpointing on, adamw |" in full_row  # the layout measured
    lora_row = next(line for line in md.splitlines() if line.startswith("| lora |"))
    assert "| 12.127 | ~16 |" in lora_row and "| flash-attn 2 |" in lora_row
    assert "spec/" not in md and "recipe.md" not in md  # no files users do not have
    assert "| OOM |" in md and "CUDA out of memory" in md
    assert "## Seed reference tables" in md and "33.433" in md and "83.65" in md

    pngs = paths[1:]
    assert len(pngs) == 3 and {p.suffix for p in pngs} == {".png"}
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
        assert f"]({png.name})" in md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)  # no temp files


def test_cpu_group_without_seed_baseline_and_no_reference(tmp_path) -> None:
    env = gpu_env(count=0)
    cfgs = [BenchConfig(method=m, attn=a, release="v1") for m in ("lora", "qlora") for a in ("sdpa", "eager")]
    results = [make_result(c, step_time=0.1 * (i + 1), env=env, seed=i) for i, c in enumerate(cfgs)]
    report = build_report(results, with_reference=False)
    assert "## v1 · cpu" in report.markdown
    assert "Seed" not in report.markdown
    assert "the slowest row here" in report.markdown  # no full/eager row to be the 1x
    # one node only: no scaling plot from single points; throughput and tensor memory with their repeats
    assert sorted(n.split("-")[0] for n in report.images) == ["memory", "throughput"]
    assert all(data[:4] == b"\x89PNG" for data in report.images.values())


def test_no_results_is_a_user_error() -> None:
    with pytest.raises(DataError, match="no results"):
        build_report([])


def _seed_columns(md: str, prefix: str) -> str:
    row = next(line for line in md.splitlines() if line.startswith(prefix))
    return "|".join(row.split("|")[-3:-1]).strip()


@pytest.mark.parametrize(
    ("change", "env", "reason"),
    [
        ({}, gpu_env(), None),
        ({"model": "tiny"}, gpu_env(), "not the full-size model"),
        ({}, gpu_env("NVIDIA H100 80GB HBM3"), "is not the seed's A100-80GB"),
        ({}, gpu_env("NVIDIA A100-SXM4-40GB"), "is not the seed's A100-80GB"),
        ({"gpus": 4, "global_batch": 64}, gpu_env(count=4), "4 GPUs per node"),
        ({"num_crops": 4}, gpu_env(), "at 4 crops"),
        ({"seq_profile": "nlvr2"}, gpu_env(), "profile nlvr2"),
        ({"attn": "sdpa"}, gpu_env(), "attention sdpa"),
        ({"global_batch": 32}, gpu_env(), "batch 32"),
        ({}, gpu_env(count=0), "CPU"),
    ],
)
def test_seed_row_only_beside_the_same_kind_of_run(change, env, reason) -> None:
    from bench.reference import load_reference_speed
    from bench.report import seed_match

    cfg = BenchConfig(method="lora", attn="flash_attention_2", **SEED).replace(**change)
    row, why = seed_match(load_reference_speed(), "8xA100-80GB", make_result(cfg, env=env))
    if reason is None:
        assert row is not None and row["img_per_s"] == pytest.approx(12.127) and why is None
    else:
        assert row is None and reason in why


def test_tiny_cpu_rows_get_a_dash_and_a_note() -> None:
    cfg = BenchConfig(method="lora", attn="sdpa", model="tiny", num_crops=1, global_batch=2, micro_batch=2, release="v1")
    md = build_report([make_result(cfg, env=gpu_env(count=0))]).markdown
    assert _seed_columns(md, "| lora |") == "– | –"
    assert "A dash in the seed columns (lora): model tiny is not the full-size model" in md


def test_several_releases_get_a_trend_table_and_plot_with_regressions_marked(tmp_path) -> None:
    cfg = BenchConfig(method="lora", attn="flash_attention_2", **SEED)
    other = cfg.replace(method="full")
    times = {"v0.1.0": 5.0, "v0.2.0": 5.05, "v0.10.0": 5.6}  # v0.10.0 is 10 % slower and sorts after v0.2.0
    results = [make_result(cfg.replace(release=rel), step_time=t, seed=i, jitter=0.005)
               for i, (rel, t) in enumerate(times.items())]
    results.append(make_result(other.replace(release="v0.1.0"), step_time=9.0))  # one release only: no trend
    report = build_report(results)
    md = report.markdown
    assert "## Across releases" in md
    section = md.split("## Across releases", 1)[1].split("## Seed reference tables", 1)[0]
    assert cfg.cell_id() in section and other.cell_id() not in section
    rows = [line for line in section.splitlines() if line.startswith("| v0.")]
    assert [r.split("|")[1].strip() for r in rows] == ["v0.1.0", "v0.2.0", "v0.10.0"]
    assert "| same |" in rows[1] and "▼ regressed" in rows[2]
    assert "| Release | img/s | MFU [counted] | Peak GiB" in section
    assert any(name.startswith("trend-") for name in report.images)
    write_report(report, tmp_path)
    trend = next(tmp_path.glob("trend-*.png"))
    with Image.open(trend) as image:
        assert image.format == "PNG"


def _plotted_axes(monkeypatch) -> list:
    """Capture every matplotlib Axes the report draws (so a test can read the plotted values)."""
    from bench import report_plots

    captured: list = []
    original = report_plots._new_figure

    def spy(title: str):
        fig, ax = original(title)
        captured.append(ax)
        return fig, ax

    monkeypatch.setattr(report_plots, "_new_figure", spy)
    return captured


def test_plots_show_tensor_memory_with_repeat_error_bars_from_zero(monkeypatch) -> None:
    env = gpu_env(count=0)
    results = []
    for i, (method, tensors) in enumerate((("lora", 3), ("full", 9))):
        r = make_result(BenchConfig(method=method, release="v1"), step_time=0.1 * (i + 1), env=env, seed=i)
        for k, rep in enumerate(r.metrics.repeats):
            for m in rep.memory:  # a CPU run: RSS is the same for every method, the live tensors are not
                m.gpu_allocated_bytes = m.gpu_reserved_bytes = None
                m.cpu_rss_bytes = 8 * GIB
                m.cpu_tensor_peak_bytes = (tensors + 0.1 * k) * GIB
        results.append(r)
    axes = _plotted_axes(monkeypatch)
    report = build_report(results, with_reference=False)
    memory = next(ax for ax in axes if ax.get_title().startswith("Peak tensor memory"))
    heights = sorted(round(p.get_height(), 1) for p in memory.patches)
    assert heights == [3.2, 9.2]  # live tensors (max over repeats), not the 8 GiB RSS
    assert "live CPU tensors" in memory.get_ylabel()
    bars = [c for c in memory.containers if hasattr(c, "errorbar")]
    assert bars and all(c.errorbar is not None for c in bars)  # min-max of the repeats
    for ax in axes:
        assert ax.get_ylim()[0] == 0
    assert not any(name.startswith("scaling-") for name in report.images)


def test_no_nan_or_none_cells(a100_results) -> None:
    md = build_report(a100_results).markdown
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip().lower() for c in line.strip("|").split("|")]
            assert not {"nan", "~nan", "none", "nanx", "nan%"} & set(cells), line
