"""The planner never recommends a layout that cannot apply its updates (update retention under 50 %)."""

from __future__ import annotations

import pytest

from phi3v_core.retention import RETENTION_FLOOR
from planner.recommend import COMMON_GPUS, PlanRequest, plan, survey


@pytest.mark.parametrize("task", ["docvqa", "nlvr2", "hateful_memes"])
def test_no_chosen_layout_loses_its_updates(task: str) -> None:
    for result in survey(PlanRequest(task=task, methods=("full", "frozen_vision", "lora")), gpus=COMMON_GPUS):
        for m in result.methods:
            assert all(0.0 <= lay.update_retention <= 1.0 for lay in m.layouts)
            chosen = [lay for lay in m.layouts if lay.chosen]
            assert all(lay.update_retention >= RETENTION_FLOOR for lay in chosen), (result.hardware.gpu.key, m.method)


def test_a_card_where_only_bf16_weights_fit_says_why_it_passes_them_over() -> None:
    # one 48 GB card: 8-bit AdamW on bf16 weights fits, fp32 master weights do not; 5e-6 keeps 8 % in bf16
    full = plan(PlanRequest(gpu="L40S", count=1, methods=("full",), host_ram_gib=512)).method("full")
    bf16 = [lay for lay in full.layouts if lay.optim == "adamw_8bit"]
    assert any(lay.fits for lay in bf16) and all(lay.update_retention < RETENTION_FLOOR for lay in bf16)
    assert full.fits and full.offload == "optimizer"  # fp32 partitions on the host keep every step
    assert any("not recommended although it fits: adamw_8bit" in r and "5e-06" in r for r in full.reasons)


def test_text_output_shows_retention_per_layout_and_for_the_recommendation(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from planner.cli import main

    monkeypatch.setenv("COLUMNS", "250")  # rich draws its boxes to this width: no wrapped cells
    assert main(["--gpu", "H100-SXM", "--count", "1", "--method", "full"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "optimizer adamw_8bit_fp32_master, update retention 100%" in out
    assert "retention: share of trained weights one step at the recipe's learning rate changes" in out
    assert "8% (lost)" in out  # the bf16-weights rows
