"""QLoRA's "before" evaluation runs the same nf4 base that training (and so "after") runs."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from phi3v_core.training import Machine, TrainConfig, train
from phi3v_core.training.api import build_model
from phi3v_core.training.evaluate import baseline_model, keep_training_kernels
from phi3v_core.training.synthetic import SyntheticDataset

CPU = Machine(cuda=False, world_size=1)


def _config(tmp_path: Path, method: str) -> TrainConfig:
    return TrainConfig(
        model="tiny", method=method, precision="fp32", num_crops=1, micro_batch=1, global_batch=1, max_steps=1,
        warmup_steps=0, learning_rate=1e-3, lora_rank=8, output_dir=str(tmp_path / "run"), dataloader_num_workers=0,
        disable_tqdm=True, save_final=False, seed=0,
    )


def _quantized(model: nn.Module) -> dict[str, torch.Tensor]:
    """Packed nf4 weights by module name, PEFT prefixes and ``base_layer`` removed."""
    return {
        name.replace("base_model.model.", "").replace(".base_layer", ""): module.weight.data.clone()
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    keep_training_kernels(model)  # as evaluate() does
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.fixture(scope="module")
def batch() -> dict:
    from phi3v_core.processing import PAD_TOKEN_ID, Phi3VDataCollator

    data = SyntheticDataset(num_examples=1, num_crops=1, seed=0)
    return Phi3VDataCollator(pad_token_id=PAD_TOKEN_ID, padding_side="right")([data[0]])


def test_qlora_before_and_after_share_the_quantized_base(tmp_path: Path, batch: dict) -> None:
    cfg = _config(tmp_path, "qlora")
    before = baseline_model(cfg, CPU)
    before_weights = _quantized(before)
    assert len(before_weights) > 10  # the base really is nf4, not the 16/32-bit weights

    result = train(cfg, SyntheticDataset(num_examples=2, num_crops=1, seed=0), env=CPU)
    after_weights = _quantized(result.model)
    assert before_weights.keys() == after_weights.keys()
    assert all(torch.equal(before_weights[name], after_weights[name]) for name in before_weights)

    # The zero-initialised adapters add nothing: "before" is the quantized base's own output ...
    result.model.eval()
    with result.model.disable_adapter():
        after_base = _logits(result.model, batch)
    assert torch.allclose(_logits(before, batch), after_base, atol=1e-5)
    # ... and the base build_model gives is that same nf4 base (QLoRA presets are built quantized, never in 16-bit).
    base = _quantized(build_model(cfg, CPU))
    assert base.keys() == before_weights.keys()
    assert all(torch.equal(base[name], before_weights[name]) for name in base)


def test_lora_before_is_the_plain_base(tmp_path: Path) -> None:
    model = baseline_model(_config(tmp_path, "lora"), CPU)
    assert not _quantized(model)
    assert not any("lora_" in name for name, _ in model.named_parameters())
