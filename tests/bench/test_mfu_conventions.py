"""MFU with its convention stated: counted, 6N and 4N+6Nt FLOPs (the latter two with causal attention) stored
per step, and every printed MFU names its convention."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from bench.config import BenchConfig
from bench.flop_count import attention_step_flops, count_step_flops, step_micro_batches
from bench.results import BenchResult
from bench.run_view import print_summary
from bench.worker import processor_for, to_train_config
from phi3v_core.mfu import causal_attention_flops, frozen_base_flops, mfu_label, six_n_flops
from phi3v_core.training.workload import build_workload
from tests.bench.factories import make_result


def test_conventions_by_hand() -> None:
    # 10 parameters, 3 of them trainable, 7 tokens
    assert six_n_flops(10, 7) == 6 * 10 * 7
    assert frozen_base_flops(10, 3, 7) == (4 * 7 + 6 * 3) * 7
    assert frozen_base_flops(10, 10, 7) == six_n_flops(10, 7)  # full fine-tuning: the two agree
    # causal: s(s+1)/2 pairs counted once, 12 FLOPs per pair and width unit (fwd 2 products × 2, bwd 2× fwd)
    assert causal_attention_flops(layers=2, width=4, seq_lens=[3]) == 12 * 2 * 4 * 6
    assert causal_attention_flops(2, 4, [3, 3]) == 2 * causal_attention_flops(2, 4, [3])
    with pytest.raises(ValueError, match="unknown MFU convention"):
        mfu_label("7N")


def test_the_step_count_carries_causal_attention_of_the_real_sequences() -> None:
    cfg = BenchConfig(method="lora", attn="sdpa", model="tiny", num_crops=1, global_batch=2, micro_batch=1, release="t")
    train_cfg = to_train_config(cfg, "unused", 1)
    batches = step_micro_batches(train_cfg, build_workload(cfg, processor_for(cfg), 2).dataset, 1, 2)
    flops, _ = count_step_flops(train_cfg, batches, "analytic", None)
    from phi3v_core.config import get_config

    c = get_config("tiny")
    lengths = [int(b["attention_mask"].sum()) for b in batches]
    width = c.num_attention_heads * (c.hidden_size // c.num_attention_heads)
    assert flops.attention_flops == attention_step_flops(train_cfg, batches)
    assert flops.attention_flops == causal_attention_flops(c.num_hidden_layers, width, lengths) > 0


def test_summary_stores_both_conventions_and_run_names_them() -> None:
    result = make_result()  # LoRA: 4.15 B parameters, 100 M trainable, 2443 tokens per sample
    result.metrics.attention_flops_per_step = 3e15
    s = BenchResult.from_dict(result.to_dict()).summary
    tokens = result.metrics.tokens_per_step
    assert s.flops_6n_per_step == pytest.approx(6 * 4_150_000_000 * tokens + 3e15)
    assert s.flops_frozen_base_per_step == pytest.approx((4 * 4_050_000_000 + 6 * 100_000_000) * tokens + 3e15)
    peak = 8 * 312e12 * s.step_time_median_s
    assert s.mfu_6n == pytest.approx(s.flops_6n_per_step / peak)
    assert s.mfu_frozen_base == pytest.approx(s.flops_frozen_base_per_step / peak)
    assert s.mfu_frozen_base < s.mfu_6n  # a frozen base has no weight gradients
    out = io.StringIO()
    print_summary(Console(file=out, width=80), result.config, result)
    text = out.getvalue()
    for label in ("MFU [counted]", "MFU [6N]", "MFU [4N+6Nt]"):
        assert label in text
    assert "4·N_frozen + 6·N_trainable per token" in text


def test_old_results_have_no_convention_figures_rather_than_wrong_ones() -> None:
    s = make_result().summary  # no attention count stored
    assert s.mfu is not None and s.mfu_6n is None and s.mfu_frozen_base is None


def test_planner_names_its_mfu_convention(capsys, monkeypatch) -> None:
    import json

    from planner.cli import main

    monkeypatch.setenv("COLUMNS", "250")
    assert main(["--gpu", "H100-SXM", "--method", "lora", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert all(m["speed"]["mfu_convention"] == "counted" for m in data["methods"] if m.get("speed"))
    assert main(["--gpu", "H100-SXM", "--method", "lora"]) == 0
    assert "[counted]" in capsys.readouterr().out
