"""Full fine-tuning on one card: bitsandbytes 8-bit AdamW and DeepSpeed ZeRO-Offload, configured and run on CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback

from phi3v_core.errors import ConfigError
from phi3v_core.training import Machine, TrainConfig, build_training_arguments, deepspeed_config, train
from phi3v_core.training.synthetic import SyntheticDataset
from planner.estimate import host_memory_bytes, model_state_bytes
from planner.shapes import load_shape
from planner.train_setup import TrainSetup

CPU = Machine(cuda=False)


def test_optimizer_and_offload_choices_are_validated_at_once() -> None:
    problems = TrainConfig(method="lora", optim="adam", offload="optimizer").problems(CPU)
    assert any("optim 'adam' is unknown" in p for p in problems)
    assert any("offload optimizer is DeepSpeed ZeRO-2's" in p and "lora" in p for p in problems)
    paged = TrainConfig(method="full", optim="paged_adamw_8bit").problems(CPU)
    assert any("needs a GPU" in p for p in paged)
    both = TrainConfig(method="full", optim="adamw_8bit", offload="optimizer").problems(CPU)
    assert any("CPU Adam" in p for p in both)
    with pytest.raises(ConfigError, match="needs bitsandbytes"):
        TrainConfig(method="full", optim="adamw_8bit").validate(Machine(bitsandbytes=False))


def test_8bit_adamw_maps_to_bitsandbytes_with_bf16_weights(tmp_path: Path) -> None:
    cfg = TrainConfig(method="full", optim="adamw_8bit", precision="bf16", output_dir=str(tmp_path))
    assert build_training_arguments(cfg, CPU).optim == "adamw_bnb_8bit"
    assert cfg.sixteen_bit_weights and str(cfg.method_options().base_dtype) == "torch.bfloat16"
    # fp16 keeps fp32 master weights (the loss scaler cannot unscale fp16 gradients); plain AdamW keeps them too
    assert not TrainConfig(method="full", optim="adamw_8bit", precision="fp16").sixteen_bit_weights
    assert TrainConfig(method="full").method_options().base_dtype is None
    assert build_training_arguments(TrainConfig(output_dir=str(tmp_path)), CPU).optim == "adamw_torch"


def test_offload_turns_deepspeed_on_with_cpu_adam() -> None:
    cfg = TrainConfig(method="full", offload="optimizer")
    assert cfg.uses_deepspeed(world_size=1)
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == "auto"
    assert "offload_optimizer" not in deepspeed_config(TrainConfig(method="full"))["zero_optimization"]
    json.dumps(ds)


@pytest.fixture(scope="session")
def cpu_adam() -> Any:
    """DeepSpeed's CPU Adam, JIT-built once per test session (torch's extension cache keeps it between sessions)."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    return CPUAdamBuilder().load()


class _OptimizerBytes(TrainerCallback):
    """Bytes of the optimizer's state tensors and of the trained weights after the first step."""

    def __init__(self) -> None:
        self.states = 0
        self.weights_dtype = None

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kw: Any) -> None:
        if self.states:
            return
        inner = getattr(optimizer, "optimizer", optimizer)
        zero = inner if hasattr(inner, "single_partition_of_fp32_groups") else None
        adam = zero.optimizer if zero is not None else inner
        for values in adam.state.values():
            self.states += sum(v.numel() * v.element_size() for v in values.values() if hasattr(v, "numel"))
        if zero is not None:  # fp32 master partition and its fp32 gradient: host memory under offload
            for flat in zero.single_partition_of_fp32_groups:
                self.states += flat.numel() * 4 * (1 + (flat.grad is not None))
        self.weights_dtype = next(p for p in model.parameters() if p.requires_grad).dtype


def _run(tmp_path: Path, **overrides: Any) -> tuple[Any, _OptimizerBytes]:
    meter = _OptimizerBytes()
    cfg = TrainConfig(
        model="tiny", method="full", precision="bf16", num_crops=1, micro_batch=1, global_batch=1, max_steps=2,
        warmup_steps=0, learning_rate=1e-3, output_dir=str(tmp_path / "run"), dataloader_num_workers=0,
        disable_tqdm=True, save_final=False, seed=0, **overrides,
    )  # fmt: skip
    result = train(cfg, SyntheticDataset(num_examples=4, num_crops=1, seed=0), callbacks=[meter])
    return result, meter


def test_8bit_adamw_trains_full_fine_tuning_in_bf16(tmp_path: Path) -> None:
    result, meter = _run(tmp_path, optim="adamw_8bit")
    assert result.global_step == 2 and all(0 < v < 100 for v in result.losses.values())
    assert str(meter.weights_dtype) == "torch.bfloat16"
    shape = load_shape("tiny")
    predicted = model_state_bytes(shape, TrainSetup(method="full", optim="adamw_8bit", zero_stage=0))
    trainable = shape.param_counts().trainable("full", 0)
    print(f"8-bit AdamW states: measured {meter.states / 2**20:.2f} MiB, predicted "
          f"{predicted['optimizer_states'] / 2**20:.2f} MiB, plain AdamW {8 * trainable / 2**20:.2f} MiB")  # fmt: skip
    # bitsandbytes also keeps 32-bit states for tensors under 4096 elements (a few on the tiny model)
    assert meter.states == pytest.approx(predicted["optimizer_states"], rel=0.10)
    assert meter.states < 8 * trainable


def test_offloaded_optimizer_trains_with_deepspeed_cpu_adam(tmp_path: Path, cpu_adam: Any) -> None:
    result, meter = _run(tmp_path, offload="optimizer")
    assert result.global_step == 2 and all(0 < v < 100 for v in result.losses.values())
    predicted = host_memory_bytes(load_shape("tiny"), TrainSetup(method="full", offload_optimizer=True))
    print(f"offloaded optimizer host bytes: measured {meter.states / 2**20:.2f} MiB, predicted {predicted / 2**20:.2f} MiB")
    assert meter.states == pytest.approx(predicted, rel=0.10)
