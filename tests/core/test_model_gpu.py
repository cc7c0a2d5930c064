"""GPU-only model checks (skipped without CUDA): flash-attention-2 in both towers, bf16 parity with sdpa."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from phi3v_core.config import tiny_config
from phi3v_core.model import Phi3VForCausalLM
from tests.core.test_model import make_batch

pytestmark = pytest.mark.gpu(seconds=5)  # the tiny model: CUDA start-up and a few MiB


def _ampere_or_newer() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
@pytest.mark.skipif(not _ampere_or_newer(), reason="flash-attention-2 and native bf16 need compute capability 8.0")
def test_flash_attention_matches_sdpa_in_bf16() -> None:
    """Tiny model, both towers on flash-attention-2 vs sdpa in bf16.

    Runs on an H100 80 GB and an A100 40 GB (compute capability >= 8.0; the tiny model needs a few MiB); skipped on
    a V100 32 GB, which has neither flash-attention-2 nor native bf16 (phi3v-plan picks sdpa + fp16 there).
    """
    torch.manual_seed(0)
    sdpa = Phi3VForCausalLM(tiny_config(attn_implementation="sdpa")).to("cuda", torch.bfloat16).eval()
    flash = Phi3VForCausalLM(tiny_config(attn_implementation="flash_attention_2")).to("cuda", torch.bfloat16).eval()
    flash.load_state_dict(sdpa.state_dict())
    clip_config = flash.model.vision_embed_tokens.img_processor.vision_model.config
    assert clip_config._attn_implementation == "flash_attention_2"
    batch = make_batch([[(336, 672)]], num_crops=2)
    batch = {k: (v.to("cuda") if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        diff = (sdpa(**batch).logits - flash(**batch).logits).abs().max().item()
    assert diff < 5e-2


def test_cuda_training_step_in_the_cards_16bit_dtype() -> None:
    """One forward/backward of the tiny model in the 16-bit dtype phi3v-plan picks for this card.

    bf16 on compute capability >= 8.0 (H100, A100), fp16 below (V100: no native bf16). A few MiB on any card.
    """
    dtype = torch.bfloat16 if _ampere_or_newer() else torch.float16
    model = Phi3VForCausalLM(tiny_config()).to("cuda", dtype)
    batch = make_batch([[(672, 672)], [(336, 336)]], num_crops=4)
    batch = {k: (v.to("cuda") if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
