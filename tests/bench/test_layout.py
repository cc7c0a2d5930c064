"""phi3v-bench run measures what phi3v-plan recommends: on a GPU its layout for the card and method by default.

A fake NVML reports one H100 (the planner detects it); the bench's config is compared with the planner's own plan
for the same request, never with hard-coded numbers.
"""

from __future__ import annotations

import sys

import pytest

from bench.cli import build_parser, config_from_args, main
from bench.config import BenchConfig, DeviceDescription
from bench.layout import RECIPE_LAYOUT, layout_label
from bench.results import BenchResult
from planner.recommend import PlanRequest, plan
from tests.planner.conftest import FakeDevice, FakeNVML
from tests.safety_helpers import expect_user_error

H100 = DeviceDescription("NVIDIA H100 80GB HBM3", (9, 0), False)


@pytest.fixture
def one_h100(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([FakeDevice("NVIDIA H100 80GB HBM3", 80 * 2**30, (9, 0))]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def _config(*flags: str, device: DeviceDescription = H100) -> tuple[BenchConfig, list[str]]:
    return config_from_args(build_parser().parse_args(["run", *flags]), device)


@pytest.mark.usefixtures("one_h100")
@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_gpu_run_defaults_to_the_planners_layout(method):
    cfg, reasons = _config("--method", method)
    planned = plan(PlanRequest(methods=(method,), global_batch=cfg.global_batch, num_crops=cfg.num_crops)).method(method)
    assert planned.fits
    assert cfg.layout == "plan"
    assert (cfg.micro_batch, cfg.gradient_checkpointing, cfg.optim, cfg.offload) == (
        planned.micro_batch, planned.gradient_checkpointing, planned.optim, planned.offload)
    card = "\n".join(reasons)
    assert f"layout plan: phi3v-plan's layout for {method} on 1x H100" in card and "s per step" in card
    assert layout_label(cfg) in card  # printed as measured


@pytest.mark.usefixtures("one_h100")
def test_recipe_layout_and_single_flags_override():
    recipe, reasons = _config("--method", "lora", "--layout", "recipe")
    assert recipe.layout == "recipe"
    assert {k: getattr(recipe, k) for k in RECIPE_LAYOUT} == RECIPE_LAYOUT
    mixed, reasons = _config("--method", "lora", "--gradient-checkpointing", "--micro-batch", "4")
    assert mixed.layout == "plan" and mixed.gradient_checkpointing and mixed.micro_batch == 4
    assert any("given on the command line" in r and "gradient_checkpointing True" in r for r in reasons)
    tiny, reasons = _config("--method", "lora", "--model", "tiny")
    assert tiny.layout == "recipe" and any("tiny model has no phi3v-plan layout" in r for r in reasons)


def test_cpu_keeps_its_defaults_and_refuses_layout_plan(tmp_path, capsys):
    cfg, reasons = _config("--method", "lora", device=DeviceDescription())
    assert cfg.layout == "recipe" and cfg.micro_batch == 2 and cfg.gradient_checkpointing  # the tiny protocol
    assert any("planner plans GPUs only" in r for r in reasons)
    expect_user_error(main, ["run", "--layout", "plan", "--out", str(tmp_path)],
                      "--layout plan needs a CUDA GPU", tmp_path, capsys)


def test_the_layout_is_recorded_in_the_result_and_old_results_read_as_recipe():
    config = BenchConfig(release="t", layout="plan", micro_batch=2, gradient_checkpointing=False)
    result = BenchResult.failure(config, "oom", "CUDA out of memory")  # a failed run records its layout too
    data = result.to_dict()
    assert data["config"]["layout"] == "plan"
    assert BenchResult.from_dict(data).config.layout == "plan"
    del data["config"]["layout"]  # written before the choice existed: the seed's layout was measured
    assert BenchResult.from_dict(data).config.layout == "recipe"
    assert layout_label(result.config) == "plan: micro-batch 2 × 4, checkpointing off, adamw"


@pytest.mark.gpu(seconds=2)  # the planner and the bench's config, no model
def test_on_this_gpu_the_default_run_is_the_plans_layout():
    """On a real GPU (no model built): the default run's layout is phi3v-plan's for this card and method."""
    cfg, _reasons = _config("--method", "lora", device=DeviceDescription.detect())
    planned = plan(PlanRequest(methods=("lora",), global_batch=cfg.global_batch, num_crops=cfg.num_crops)).method("lora")
    assert cfg.layout == ("plan" if planned.fits else "recipe")
    if planned.fits:
        assert (cfg.micro_batch, cfg.gradient_checkpointing) == (planned.micro_batch, planned.gradient_checkpointing)
