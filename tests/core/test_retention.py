"""Update retention: the closed form against real rounding, the training config's figure, phi3v-finetune's refusal,
and 8-bit AdamW on fp32 master weights (trains with fp32 weights and 8-bit states, as the planner counts them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from phi3v_core.cli.finetune import build_config, build_parser
from phi3v_core.errors import ConfigError
from phi3v_core.retention import update_retention
from phi3v_core.training import Machine, TrainConfig, build_training_arguments

CPU = Machine(cuda=False, world_size=1)
A100 = Machine(cuda=True, capability=(8, 0), device_count=1, world_size=1, flash_attn=True, bitsandbytes=True)

pytestmark = pytest.mark.usefixtures("finetune_env")


def _measured(learning_rate: float, dtype: torch.dtype) -> float:
    """Share of 10^6 weights ~ N(0, 0.02) that ``w - lr * sign(w)``, rounded to ``dtype``, changes."""
    w = (torch.randn(10**6, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    stepped = (w.float() - learning_rate * torch.sign(w.float())).to(dtype)
    return float((stepped != w).float().mean())


@pytest.mark.parametrize("learning_rate", [5e-6, 2e-5, 1e-4, 2e-4])
@pytest.mark.parametrize(("name", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_closed_form_matches_real_rounding(learning_rate: float, name: str, dtype: torch.dtype) -> None:
    assert update_retention(learning_rate, name) == pytest.approx(_measured(learning_rate, dtype), abs=0.005)


def test_the_issue_numbers() -> None:
    # bf16 weights of |w| ~ 0.02 keep ~92 % unchanged at lr 5e-6 and ~70 % at 2e-5; fp32 and compensation keep all
    assert update_retention(5e-6, "bf16") == pytest.approx(0.078, abs=0.002)
    assert update_retention(2e-5, "bf16") == pytest.approx(0.304, abs=0.002)
    assert update_retention(5e-6, "fp32") == 1.0 and update_retention(5e-6, "bf16", compensated=True) == 1.0
    with pytest.raises(ValueError, match="weight dtype"):
        update_retention(1e-5, "int8")


def test_train_config_knows_where_the_optimizer_writes() -> None:
    bf16 = TrainConfig(method="full", optim="adamw_8bit", precision="bf16", learning_rate=5e-6)
    assert bf16.sixteen_bit_weights and bf16.update_retention() == pytest.approx(0.078, abs=0.002)
    assert bf16.update_retention(world_size=2) == 1.0  # DeepSpeed ZeRO-2 steps its fp32 partitions
    master = TrainConfig(method="full", optim="adamw_8bit_fp32_master", precision="bf16", learning_rate=5e-6)
    assert not master.sixteen_bit_weights and master.update_retention() == 1.0
    assert master.method_options().base_dtype is None  # fp32 weights: the AMP master copy
    assert build_training_arguments(master, CPU).optim == "adamw_bnb_8bit"
    assert TrainConfig(method="lora", optim="adamw_8bit", learning_rate=5e-6).update_retention() == 1.0
    with pytest.raises(ConfigError, match="needs bitsandbytes"):
        master.validate(Machine(bitsandbytes=False))


def _resolve(*flags: str, env: Machine = A100) -> Any:
    return build_config(build_parser().parse_args(["--synthetic", "4", *flags]), env)


def test_finetune_refuses_bf16_weights_that_would_not_learn_unless_allowed() -> None:
    flags = ("--method", "full", "--bf16", "--learning_rate", "5e-6", "--optim", "adamw_8bit")
    with pytest.raises(ConfigError) as refused:
        _resolve(*flags)
    message = str(refused.value)
    assert "changes only 8% of them" in message and "--optim adamw_8bit_fp32_master" in message
    assert "--allow_low_retention" in message
    cfg = _resolve(*flags, "--allow_low_retention")
    assert any("training anyway" in n for n in cfg.notes)
    assert _resolve("--method", "full", "--bf16", "--learning_rate", "5e-6", "--optim", "adamw_8bit_fp32_master").train
    # frozen_vision's rate (1e-4) keeps 88 % even in bf16
    assert _resolve("--method", "frozen_vision", "--bf16", "--learning_rate", "1e-4", "--optim", "adamw_8bit").train


def test_8bit_adamw_on_fp32_master_weights_trains_with_fp32_weights(tmp_path: Path) -> None:
    from phi3v_core.training import train
    from phi3v_core.training.synthetic import SyntheticDataset
    from planner.estimate import model_state_bytes
    from planner.shapes import load_shape
    from planner.train_setup import TrainSetup
    from tests.core.test_optim_offload import _OptimizerBytes

    meter = _OptimizerBytes()
    cfg = TrainConfig(
        model="tiny", method="full", precision="bf16", num_crops=1, micro_batch=1, global_batch=1, max_steps=2,
        warmup_steps=0, learning_rate=5e-6, output_dir=str(tmp_path / "run"), dataloader_num_workers=0,
        disable_tqdm=True, save_final=False, seed=0, optim="adamw_8bit_fp32_master",
    )  # fmt: skip
    result = train(cfg, SyntheticDataset(num_examples=2, num_crops=1, seed=0), callbacks=[meter])
    assert result.global_step == 2 and str(meter.weights_dtype) == "torch.float32"
    # the planner's model of this layout: fp32 weights, 8-bit states (the same states as on bf16 weights)
    predicted = model_state_bytes(load_shape("tiny"), TrainSetup(method="full", optim="adamw_8bit", weight_dtype="fp32", zero_stage=0))
    print(f"8-bit AdamW on fp32 weights: states {meter.states / 2**20:.2f} MiB, predicted {predicted['optimizer_states'] / 2**20:.2f} MiB")
    assert meter.states == pytest.approx(predicted["optimizer_states"], rel=0.10)
