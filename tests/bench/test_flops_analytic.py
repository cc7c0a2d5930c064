"""The analytic FLOP count (``phi3v_core.flops``, ``phi3v-bench run``'s default) against the fake-tensor replay.

``bench.flop_count.trace_step_flops`` runs the real step on fake tensors under ``FlopCounterMode`` (``--flops trace``);
``bench.flop_count.analytic_step_flops`` multiplies out the shapes. Pinned within 1 % for every method, both
checkpointing settings (one replay gives both: ``model_flops`` is counted with checkpointing off, ``hardware_flops``
as configured) and both logits modes, on the tiny model with two micro-batches of different lengths. (On this
torch they agree to the FLOP: the count follows ``FlopCounterMode``'s rules, checkpointing's early stop included.)
"""

from __future__ import annotations

import dataclasses

import pytest

from bench.config import BenchConfig
from bench.flop_count import analytic_step_flops, step_micro_batches, trace_step_flops
from phi3v_core.config import get_config
from phi3v_core.flops import ModelDims, TrainableParts, micro_batch_shape, step_flops
from phi3v_core.model import Phi3VForCausalLM
from phi3v_core.processing import Phi3VProcessor
from phi3v_core.training.workload import build_workload, to_train_config

CASES = [
    # (method, logits, extra TrainConfig fields, attention)
    ("full", "supervised", {}, "sdpa"),
    ("full", "full", {}, "sdpa"),
    ("frozen_vision", "supervised", {}, "sdpa"),
    ("frozen_vision", "full", {}, "eager"),
    ("lora", "supervised", {}, "sdpa"),
    ("lora", "full", {}, "sdpa"),
    ("lora", "supervised", {"freeze_vision": True, "lora_lm_head": False, "lora_rank": 8}, "sdpa"),
    ("qlora", "supervised", {}, "sdpa"),
    ("qlora", "full", {"freeze_vision": True}, "sdpa"),
    ("dora", "supervised", {}, "sdpa"),  # a method outside the recipe: its registry entry drives the count
]


def _step(method: str, attn: str, extra: dict, micro_batch: int = 1) -> tuple[object, list[dict]]:
    cfg = BenchConfig(method=method, attn=attn, precision="bf16", model="tiny", num_crops=4, global_batch=2,
                      micro_batch=micro_batch, release="t")
    train_cfg = dataclasses.replace(to_train_config(cfg, "unused", 1), **extra)
    workload = build_workload(cfg, Phi3VProcessor.tiny(num_crops=cfg.num_crops), cfg.global_batch)
    return train_cfg, step_micro_batches(train_cfg, workload.dataset, cfg.micro_batch, cfg.grad_accum)


@pytest.mark.parametrize(("method", "logits", "extra", "attn"), CASES)
def test_analytic_flops_match_the_fake_tensor_replay(
    method: str, logits: str, extra: dict, attn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Phi3VForCausalLM, "supervised_logits", logits == "supervised")
    train_cfg, batches = _step(method, attn, extra)
    assert len({tuple(b["input_ids"].shape) for b in batches}) == 2  # two lengths: both shapes are counted
    traced = trace_step_flops(train_cfg, batches)  # model: checkpointing off; hardware: on (the run's setting)
    counted = analytic_step_flops(train_cfg, batches)
    assert train_cfg.gradient_checkpointing and traced.hardware_flops > traced.model_flops
    assert counted.model_flops == pytest.approx(traced.model_flops, rel=0.01), (counted, traced)
    assert counted.hardware_flops == pytest.approx(traced.hardware_flops, rel=0.01), (counted, traced)
    assert counted.source == "analytic" and counted.traced_attn is None


def test_analytic_flops_of_padded_micro_batches_match_the_replay() -> None:
    """Two samples of different lengths in one micro-batch: the padded length is what runs."""
    train_cfg, batches = _step("lora", "sdpa", {}, micro_batch=2)
    assert batches[0]["input_ids"].shape[0] == 2
    traced = trace_step_flops(train_cfg, batches)
    counted = analytic_step_flops(train_cfg, batches)
    assert counted.model_flops == pytest.approx(traced.model_flops, rel=0.01)
    assert counted.hardware_flops == pytest.approx(traced.hardware_flops, rel=0.01)


def test_the_count_is_per_layer_times_depth() -> None:
    """Full-size Phi-3.5-vision (no trace: the count is arithmetic): each decoder layer adds the same FLOPs."""
    config = get_config("phi-3.5-vision")
    dims = ModelDims.from_config(config)
    shape = micro_batch_shape_of(dims)
    parts = TrainableParts.for_method("lora")

    def count(layers: int) -> tuple[int, int]:
        result = step_flops(dataclasses.replace(dims, layers=layers), parts, [shape], checkpointing=True)
        return result.model_flops, result.hardware_flops

    per_layer = [tuple(b - a for a, b in zip(count(n), count(n + 1))) for n in (2, 10, 31)]
    assert len(set(per_layer)) == 1 and all(v > 0 for v in per_layer[0])
    # LoRA trains no base weight: about 2 x forward of the base plus the adapters; checkpointing adds a forward.
    model, hardware = count(dims.layers)
    assert 1.2 < hardware / model < 1.5


def micro_batch_shape_of(dims: ModelDims):  # noqa: ANN201
    """A DocVQA-like sample of the full-size model: 16 crops as a 4 x 4 grid, 2,400 tokens, 20 supervised."""
    import torch

    seq = 2400
    labels = torch.full((1, seq), -100)
    labels[0, -20:] = 1
    batch = {"input_ids": torch.zeros(1, seq, dtype=torch.long), "labels": labels,
             "pixel_values": torch.zeros(1, 17, 3, 336, 336), "image_sizes": [(1344, 1344)]}
    return micro_batch_shape(batch, dims, "supervised")


def test_analytic_is_the_default_and_trace_stays_selectable() -> None:
    from bench.cli import build_parser, config_from_args
    from bench.config import DeviceDescription

    assert BenchConfig().flops == "analytic"
    args = build_parser().parse_args(["run", "--flops", "trace"])
    assert config_from_args(args, DeviceDescription())[0].flops == "trace"
    assert any("flops" in p for p in BenchConfig(flops="guess", release="t").problems())
