"""The bench's FLOP replay (FlopCounterMode on the real model) and the planner's analytic FLOPs agree within 3 %.

Two independent counts of one training sample: ``bench.flop_count.trace_step_flops`` runs the real step on fake tensors,
``planner.speed.flops_per_sample`` multiplies out the shapes. MFU (bench) and the speed model (planner) both divide by
these numbers, so a drift in either shows up here. Compared with logits at every position (the recipe's computation,
``Phi3VForCausalLM.supervised_logits = False`` / ``TrainSetup(logits="full")``), they agree within 2 % (LoRA's adapters
are the largest gap); what supervised-only logits save must then be the same in both counts. (With supervised-only
logits the tiny model's total shrinks ~4x, so the same absolute residual would be a larger share.)
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.config import BenchConfig
from bench.flop_count import step_micro_batches, trace_step_flops
from phi3v_core.constants import CROP_SIZE
from phi3v_core.methods import METHOD_NAMES, get_method
from phi3v_core.model import Phi3VForCausalLM
from phi3v_core.processing import Phi3VProcessor
from phi3v_core.training.workload import build_workload, to_train_config
from planner.estimate import SampleShape
from planner.shapes import load_shape
from planner.speed import flops_per_sample
from planner.train_setup import TrainSetup


# every registered method a meta build runs as itself (QLoRA is traced as LoRA: the same count)
@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if get_method(m).trace_name == m])
def test_bench_flop_replay_matches_the_planners_analytic_flops(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = BenchConfig(method=method, attn="sdpa", precision="bf16", model="tiny", num_crops=4, global_batch=1,
                      micro_batch=1, release="t")
    train_cfg = to_train_config(cfg, "unused", 1)
    workload = build_workload(cfg, Phi3VProcessor.tiny(num_crops=cfg.num_crops), 1)
    batches = step_micro_batches(train_cfg, workload.dataset, 1, 1)
    supervised_replay = trace_step_flops(train_cfg, batches, with_recompute=False).model_flops
    monkeypatch.setattr(Phi3VForCausalLM, "supervised_logits", False)
    replayed = trace_step_flops(train_cfg, batches, with_recompute=False).model_flops

    height, width = (int(v) for v in batches[0]["image_sizes"][0])
    rows, cols = height // CROP_SIZE, width // CROP_SIZE
    sample = SampleShape(seq_len=workload.tokens_per_sample, vision_crops=rows * cols + 1,  # HD crops + the global view
                         image_tokens=workload.image_tokens_per_sample, images=1,
                         supervised_tokens=workload.supervised_tokens_per_sample)  # training's logits are these only
    setup = TrainSetup(method=method, attn="sdpa", precision="bf16", gradient_checkpointing=False)
    analytic_full = flops_per_sample(load_shape("tiny"), sample, replace(setup, logits="full")).total
    assert analytic_full == pytest.approx(replayed, rel=0.03), (method, analytic_full, replayed)
    analytic = flops_per_sample(load_shape("tiny"), sample, setup).total
    saved_replay, saved_analytic = replayed - supervised_replay, analytic_full - analytic
    assert saved_replay > 0.5 * replayed  # the tiny model's count is mostly lm_head over every position
    assert saved_analytic == pytest.approx(saved_replay, rel=0.01), (method, saved_analytic, saved_replay)
