"""DoRA, the fifth method: its registry entry, its prepare on the tiny model, and that planner, bench and selfcheck
read it from the registry alone (predicted, measured, checked, listed as "not in the recipe")."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from phi3v_core.config import get_config
from phi3v_core.methods import LORA, METHOD_NAMES, NOT_IN_RECIPE, MethodOptions, get_method
from phi3v_core.methods.dora import DORA
from phi3v_core.model import Phi3VForCausalLM
from planner.estimate import SampleShape, estimate_memory, model_state_bytes
from planner.shapes import ModelShape, load_shape
from planner.trace import build_batch, measure_step
from planner.train_setup import TrainSetup

RANK = 4


@pytest.fixture
def tiny() -> Phi3VForCausalLM:
    torch.manual_seed(0)
    return Phi3VForCausalLM(get_config("tiny", attn_implementation="sdpa"))


def test_registry_entry() -> None:
    dora = get_method("dora")
    assert "dora" in METHOD_NAMES and dora.adapter is DORA and dora.uses_lora
    assert not (dora.trains_base or dora.trains_vision or dora.quantized or dora.supports_deepspeed)
    assert dora.recipe_label == NOT_IN_RECIPE and dora.preset_name == "lora" and dora.trace_name == "dora"
    # per adapted Linear(10, 7) at rank 2: LoRA's A and B plus 7 magnitudes; 2 output-wide saves per token
    assert DORA.params(2, 10, 7) == LORA.params(2, 10, 7) + 7 == 41
    assert DORA.saved_per_token(2, 7) == 2 + 14
    assert DORA.flops_per_forward(2, 10, 7) == 2 * 2 * 10 * 17 and LORA.flops_per_forward(2, 10, 7) == 0


def test_dora_starts_at_the_base_model_and_trains_adapters_and_magnitudes(tiny: Phi3VForCausalLM) -> None:
    shape = ModelShape.preset("tiny")
    batch = build_batch(shape, SampleShape.from_images(shape, 1, image_size=(336, 336), text_tokens=40))
    tiny.eval()
    with torch.no_grad():
        base_logits = tiny(**batch).logits
    model, report = get_method("dora").prepare(tiny, MethodOptions(lora_rank=RANK))
    config = model.peft_config["default"]
    assert config.use_dora and config.r == RANK
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    magnitudes = {n for n in names if "lora_magnitude_vector" in n}
    assert len(magnitudes) == len(report.lora_targets) and names == magnitudes | {
        n for n in names if ".lora_A." in n or ".lora_B." in n
    }
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in magnitudes)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base_logits, rtol=1e-4, atol=1e-4)  # B = 0, m = ||W||
    model.train()
    model(**batch).loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert any("magnitude" in note for note in report.notes)


def test_planner_states_add_16_bytes_per_magnitude_and_dora_costs_more_than_lora() -> None:
    shape = load_shape("phi-3.5-vision")
    workload = SampleShape.from_images(shape, num_crops=16, text_tokens=64)
    lora, dora = TrainSetup(method="lora", lora_rank=64), TrainSetup(method="dora", lora_rank=64)
    magnitudes = sum(n * fan_out for n, _fan_in, fan_out in shape.adapted_linears())
    lora_states, dora_states = model_state_bytes(shape, lora), model_state_bytes(shape, dora)
    extra = sum(dora_states.values()) - sum(lora_states.values())
    assert extra == pytest.approx(16 * magnitudes)  # fp32 weight, gradient, Adam m and v
    assert estimate_memory(shape, dora, workload).allocated > estimate_memory(shape, lora, workload).allocated + extra


@pytest.mark.parametrize("checkpointing", [True, False])
def test_dora_prediction_matches_memtracker(checkpointing: bool) -> None:
    """The closed form with DoRA's terms against torch's MemTracker on a real CPU step of the registry's DoRA."""
    config = get_config("tiny")
    shape = ModelShape.from_config(config, "tiny")
    torch.manual_seed(0)
    model, _ = get_method("dora").prepare(Phi3VForCausalLM(config), MethodOptions(lora_rank=RANK))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    workload = SampleShape.from_images(shape, num_crops=1, image_size=(336, 336), text_tokens=40, answer_tokens=32)
    setup = TrainSetup(method="dora", precision="fp32", attn="sdpa", gradient_checkpointing=checkpointing,
                       lora_rank=RANK, optimizer_foreach=False, zero_stage=0)
    measured = measure_step(model, build_batch(shape, workload), setup)["peak"]["Total"]
    predicted = estimate_memory(shape, setup, workload).allocated
    assert abs(predicted / measured - 1) <= 0.10, (measured, predicted)


def test_the_planner_predicts_dora_and_never_recommends_it_over_the_recipe() -> None:
    from planner.recommend import PlanRequest, plan

    result = plan(PlanRequest(gpu="A100-80GB", count=1))
    dora, lora = result.method("dora"), result.method("lora")
    assert dora.fits and dora.speed and dora.speed.samples_per_s < lora.speed.samples_per_s
    assert dora.micro_batch <= lora.micro_batch  # more memory per sample
    assert result.recommended != "dora"
    assert dora.hyperparameters["learning_rate"] == lora.hyperparameters["learning_rate"]
    assert dora.hyperparameters["source"].startswith("dora is not in the recipe: lora's settings")
    assert "--method dora" in dora.command and "--lora_rank" in dora.command


def test_the_planner_table_lists_dora_as_not_in_the_recipe(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from planner.cli import main

    monkeypatch.setenv("COLUMNS", "250")  # one line per table row

    assert main(["--gpu", "A100-80GB", "--count", "1"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split("│")[1:2] and "dora" in line.split("│")[1])
    assert NOT_IN_RECIPE in row


def test_bench_sweeps_checks_and_reports_dora() -> None:
    from bench.config import BenchConfig, DeviceDescription
    from bench.matrix import build_cells
    from bench.reference import load_reference_speed
    from bench.report import seed_match
    from bench.selfcheck import selfcheck_lr
    from bench.selfcheck_plan import plan_checks
    from tests.bench.factories import gpu_env, make_result

    assert {c.method for c in build_cells("quick")} >= {"dora"}
    assert ("dora", "sdpa") in [(p.config.method, p.config.attn) for p in plan_checks(DeviceDescription())]
    assert selfcheck_lr("dora") == selfcheck_lr("lora")
    ref = load_reference_speed()
    cfg = BenchConfig(method="dora", model="phi-3.5-vision", gpus=8, global_batch=64, attn="flash_attention_2")
    result = make_result(cfg, env=gpu_env("NVIDIA A100-SXM4-80GB", 8))
    assert seed_match(ref, "8xA100-80GB", result) == (None, "dora is not in the recipe")


def test_bench_flop_replay_of_dora_matches_the_planner() -> None:
    """The bench counts DoRA's step on the real model (its prepare, fake tensors); the planner from its terms."""
    from bench.config import BenchConfig
    from bench.flop_count import step_micro_batches, trace_step_flops
    from phi3v_core.processing import Phi3VProcessor
    from phi3v_core.training.workload import build_workload, to_train_config
    from planner.speed import flops_per_sample

    flops = {}
    for method in ("lora", "dora"):
        cfg = BenchConfig(method=method, attn="sdpa", precision="bf16", model="tiny", num_crops=4, global_batch=1,
                          micro_batch=1, release="t")
        train_cfg = to_train_config(cfg, "unused", 1)
        workload = build_workload(cfg, Phi3VProcessor.tiny(num_crops=cfg.num_crops), 1)
        batches = step_micro_batches(train_cfg, workload.dataset, 1, 1)
        flops[method] = trace_step_flops(train_cfg, batches, with_recompute=False).model_flops
    setup = TrainSetup(method="dora", attn="sdpa", precision="bf16", gradient_checkpointing=False)
    shape = load_shape("tiny")
    lora_setup = dataclasses.replace(setup, method="lora")
    sample = SampleShape.from_images(shape, num_crops=4, text_tokens=64)
    planned = flops_per_sample(shape, sample, setup).total - flops_per_sample(shape, sample, lora_setup).total
    # DoRA's extra work does not depend on the tokens: the planner's term is the replay's difference
    assert planned == pytest.approx(flops["dora"] - flops["lora"], rel=0.02)
