"""Packing with flash-attention-2 (GPU only): one flattened row, variable-length attention per sample.

bf16, so "equal" means within bf16 rounding of the same computation: the tolerance is far below what attention
across samples or a wrong LongRoPE choice would change (the CPU tests check exact equality with sdpa and eager).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from phi3v_core.config import tiny_config
from phi3v_core.model import Phi3VForCausalLM
from phi3v_core.processing.packing import PackingCollator
from tests.core.test_packing import BASE, per_token_loss, samples


def _ampere_or_newer() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def _cuda(batch: dict) -> dict:
    out = {k: (v.to("cuda") if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    if "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(torch.bfloat16)
    return out


@pytest.mark.gpu(seconds=4)  # the tiny model (a few MiB): five forward passes
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
@pytest.mark.skipif(not _ampere_or_newer(), reason="flash-attention-2 needs compute capability 8.0")
def test_flash_attention_packed_row_equals_samples_alone() -> None:
    torch.manual_seed(0)
    config = tiny_config(attn_implementation="flash_attention_2", original_max_position_embeddings=640)
    model = Phi3VForCausalLM(config).to("cuda", torch.bfloat16).eval()
    model.supervised_logits = False
    examples = samples()
    batch = PackingCollator(BASE, flatten=True)(examples)
    assert batch["input_ids"].shape[0] == 1 and sum(batch["packing"].rows[0]) > 640  # a row past the switch
    with torch.no_grad():
        logits = model(**{k: v for k, v in _cuda(batch).items() if k != "labels"}).logits
        packed_losses = per_token_loss(logits.float(), batch["labels"].cuda())[0]
        start = 0
        for example in examples:
            alone = _cuda(BASE([example]))
            alone.pop("attention_mask")
            alone_logits = model(**{k: v for k, v in alone.items() if k != "labels"}).logits.float()
            length = alone_logits.shape[1]
            diff = (alone_logits[0] - logits[0, start : start + length].float()).abs().max().item()
            assert diff < 5e-2, diff
            alone_loss = per_token_loss(alone_logits, alone["labels"])[0, 1:].sum()
            packed_loss = packed_losses[start + 1 : start + length].sum()
            assert torch.allclose(alone_loss, packed_loss, rtol=1e-2), (alone_loss, packed_loss)
            start += length
