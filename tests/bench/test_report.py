"""report: markdown in the seed's layout beside the published rows, and valid PNG plots."""

from __future__ import annotations

import pytest
from PIL import Image

from bench.config import BenchConfig
from bench.report import build_report, write_report
from bench.results import BenchResult
from phi3v_core.errors import DataError
from tests.bench.factories import gpu_env, make_result

SEED = dict(model="phi-3.5-vision", gpus=8, batch_size=64, release="v1")


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
    assert ("| Method | precision | # nodes | GPUs | flash attention | Effective batch | img/s | img/s/GPU | Speed-up |"
            in md)
    # Our full/1 node/eager row is 1.00x and sits beside the published 5.041 img/s, ~42 GB row.
    full_row = next(line for line in md.splitlines() if line.startswith("| full | fp16 | 1 | 8 |  |"))
    assert "| 1.00x |" in full_row and "| 5.041 | ~42 |" in full_row
    lora_row = next(line for line in md.splitlines() if line.startswith("| lora |"))
    assert "| 12.127 | ~16 |" in lora_row
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
    assert len(report.images) == 3 and all(data[:4] == b"\x89PNG" for data in report.images.values())


def test_no_results_is_a_user_error() -> None:
    with pytest.raises(DataError, match="no results"):
        build_report([])
