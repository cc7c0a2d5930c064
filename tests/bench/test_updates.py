"""phi3v-bench's measured share of changed weights at the recipe's learning rate.

Every layout the planner may recommend changes at least half of the trained weights; 8-bit AdamW on bf16 weights
at the full fine-tuning rate (5e-6) does not, and the planner passes it over. The numbers come from the real worker
path (``bench.worker.run_rank``: Trainer, optimizer, the :class:`bench.updates.ChangedWeights` callback).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from bench.cli import _print_summary
from bench.config import BenchConfig
from bench.results import BenchResult, Metrics
from bench.runner import _add_repeat
from bench.worker import run_rank
from phi3v_core.config import tiny_config
from phi3v_core.retention import RETENTION_FLOOR
from planner.recommend import PlanRequest, plan

#: A mid-size model of the same structure (~21 M trained parameters, 5x the tiny one): 16 heads of 16 dimensions
#: keep the tiny preset's LongRoPE factors valid.
MID_SIZE = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 16,
            "num_key_value_heads": 16}


def _recommendable(task: str, method: str) -> set[str]:
    """Optimizers the planner may recommend for ``method`` at the task's recipe rate (its layouts that keep their
    updates; the offloaded optimizer steps DeepSpeed's fp32 partitions and is left to the offload tests)."""
    result = plan(PlanRequest(gpu="H100-SXM", count=1, task=task, methods=(method,)))
    layouts = result.method(method).layouts
    return {lay.optim for lay in layouts if lay.offload == "none" and lay.update_retention >= RETENTION_FLOOR}


def _changed(tmp_path: Path, model: str, method: str, optim: str, **extra: Any) -> dict[str, Any]:
    cfg = BenchConfig(method=method, model=model, precision="bf16", num_crops=1, global_batch=1, micro_batch=1,
                      steps=2, warmup=0, repeats=1, release="t", optim=optim, **extra)  # fmt: skip
    tmp_path.mkdir(parents=True, exist_ok=True)
    payload = run_rank(cfg, tmp_path)
    assert payload["status"] == "ok", payload.get("message")
    return payload


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A mid-size checkpoint folder with random weights (N(0, 0.02), as the presets)."""
    from phi3v_core.model import Phi3VForCausalLM

    folder = tmp_path_factory.mktemp("mid")
    Phi3VForCausalLM(tiny_config(**MID_SIZE)).save_pretrained(folder)
    return str(folder)


def test_the_planner_offers_fp32_master_weights_and_passes_over_bf16_at_5e_6() -> None:
    assert _recommendable("docvqa", "full") == {"adamw", "adamw_8bit_fp32_master"}  # lr 5e-6: bf16 keeps 8 %
    assert _recommendable("docvqa", "frozen_vision") == {"adamw", "adamw_8bit_fp32_master", "adamw_8bit"}  # 1e-4: 88 %
    assert _recommendable("docvqa", "lora") == {"adamw"}


@pytest.mark.slow  # six real runs (~1 CPU-minute each on 2 cores); the bf16 test below runs two in the default set
@pytest.mark.parametrize(
    ("method", "optim"),
    [(m, o) for m in ("full", "frozen_vision", "lora") for o in sorted(_recommendable("docvqa", m))],
)
def test_every_recommendable_layout_changes_most_weights_on_the_tiny_model(tmp_path: Path, method: str, optim: str) -> None:
    payload = _changed(tmp_path, "tiny", method, optim)
    change = payload["weight_change"]
    print(f"tiny {method} {optim} lr {payload['learning_rate']:g}: {change['changed_fraction']:.1%} of "
          f"{change['counted']} sampled weights with a gradient changed in {change['steps']} steps")  # fmt: skip
    assert change["gradients_seen"] and change["counted"] > 10_000
    assert change["changed_fraction"] >= RETENTION_FLOOR


def test_bf16_weights_at_the_full_fine_tuning_rate_fail_and_bench_reports_it(tmp_path: Path) -> None:
    payload = _changed(tmp_path, "tiny", "full", "adamw_8bit")
    assert payload["learning_rate"] == 5e-6  # the recipe's DocVQA full fine-tuning rate
    lost = payload["weight_change"]["changed_fraction"]
    kept = _changed(tmp_path / "fp32", "tiny", "full", "adamw_8bit_fp32_master")["weight_change"]["changed_fraction"]
    print(f"tiny full lr 5e-6: bf16 weights {lost:.1%} changed, fp32 master {kept:.1%}")
    assert lost < 0.15 < RETENTION_FLOOR < 0.99 < kept  # the model predicts 8 % per step for |w| ~ N(0, 0.02)
    # the result keeps it and `phi3v-bench run` prints it
    cfg = BenchConfig(method="full", model="tiny", optim="adamw_8bit", release="t")
    result = BenchResult(config=cfg, metrics=Metrics())
    _add_repeat(result.metrics, [{**payload, "step_times_s": [1.0, 1.0], "warmup_times_s": []}])
    assert result.to_dict()["summary"]["changed_weights_fraction"] == pytest.approx(lost)
    assert result.to_dict()["metrics"]["repeats"][0]["weight_change"]["changed_fraction"] == pytest.approx(lost)
    out = io.StringIO()
    _print_summary(Console(file=out, width=200), cfg, result)
    assert f"weights changed ({payload['weight_change']['steps']} steps, lr 5e-06)" in out.getvalue()
    assert f"{lost:.1%}" in out.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize(("optim", "keeps"), [("adamw_8bit_fp32_master", True), ("adamw_8bit", False)])
def test_mid_size_model_full_fine_tuning_at_5e_6(tmp_path: Path, mid_model: str, optim: str, keeps: bool) -> None:
    change = _changed(tmp_path, mid_model, "full", optim)["weight_change"]
    print(f"mid-size full {optim} lr 5e-6: {change['changed_fraction']:.1%} of {change['counted']} changed")
    assert (change["changed_fraction"] >= RETENTION_FLOOR) is keeps


def test_bench_trains_at_the_recipe_rate_unless_told() -> None:
    from bench.cli import build_parser, config_from_args
    from bench.config import DeviceDescription, parse_field_value
    from bench.worker import to_train_config

    assert to_train_config(BenchConfig(method="full", release="t"), "out", 3).learning_rate == 5e-6  # docvqa full
    assert to_train_config(BenchConfig(method="lora", release="t"), "out", 3).learning_rate == 2e-4
    assert to_train_config(BenchConfig(method="full", seq_profile="ucf101", release="t"), "out", 3).learning_rate == 4e-5
    assert to_train_config(BenchConfig(method="full", learning_rate=1e-4, release="t"), "out", 3).learning_rate == 1e-4
    assert parse_field_value("learning_rate", "2e-5") == 2e-5
    assert any("learning_rate must be" in p for p in BenchConfig(learning_rate=0.0, release="t").problems())
    args = build_parser().parse_args(["run", "--learning-rate", "2e-5"])
    assert config_from_args(args, DeviceDescription())[0].learning_rate == 2e-5
    # a protocol field: results at another rate compare with the same cell
    assert BenchConfig(learning_rate=2e-5, release="t").cell_id() == BenchConfig(release="t").cell_id()


@pytest.mark.gpu(seconds=5)  # the tiny model, a few full fine-tuning steps in this process
@pytest.mark.parametrize(("optim", "keeps"), [("adamw_8bit_fp32_master", True), ("adamw_8bit", False)])
def test_bitsandbytes_cuda_kernels_keep_or_lose_the_steps_as_predicted(tmp_path: Path, optim: str, keeps: bool) -> None:
    # Only a GPU can tell: bitsandbytes' CUDA 8-bit AdamW is another kernel than its CPU one (rounding included).
    change = _changed(tmp_path, "tiny", "full", optim)["weight_change"]
    print(f"CUDA tiny full {optim} lr 5e-6: {change['changed_fraction']:.1%} of {change['counted']} changed")
    assert (change["changed_fraction"] >= RETENTION_FLOOR) is keeps
