"""``--kernels liger`` on a GPU (skipped without CUDA or liger-kernel): loss and gradients against the unpatched
model within bf16 tolerance, and the memory and time difference of one training step (printed and recorded as
test properties, never asserted: no test depends on speed)."""

from __future__ import annotations

import copy
import importlib.util
import time

import pytest
import torch
from transformers.models.phi3 import modeling_phi3

from phi3v_core.config import tiny_config
from phi3v_core.kernels import apply_kernels
from phi3v_core.model import Phi3VForCausalLM
from tests.core.test_model import make_batch

pytestmark = [
    pytest.mark.gpu(seconds=4),  # tiny model, two steps each; Triton compiles four small kernels (~1 s each) on first use
    pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed"),
]


def _step(model: Phi3VForCausalLM, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], float, int]:
    """One forward + backward under bf16 autocast: loss, gradients, seconds, peak allocated bytes."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch, num_items_in_batch=int((batch["labels"][:, 1:] != -100).sum())).loss
    loss.backward()
    torch.cuda.synchronize()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().float(), grads, time.perf_counter() - start, torch.cuda.max_memory_allocated()


def test_liger_matches_the_unpatched_model_in_bf16(monkeypatch: pytest.MonkeyPatch,
                                                   record_property: pytest.RecordProperty) -> None:
    monkeypatch.setattr(modeling_phi3, "apply_rotary_pos_emb", modeling_phi3.apply_rotary_pos_emb)  # process-wide
    torch.manual_seed(0)
    plain = Phi3VForCausalLM(tiny_config(attn_implementation="sdpa")).to("cuda").train()  # fp32 master weights
    liger = copy.deepcopy(plain)
    patch = apply_kernels(liger, "liger")
    assert patch.fused_loss and patch.rope and patch.replaced
    batch = make_batch([[(336, 672)], [(672, 336)]], num_crops=2, text_len=24)
    batch = {k: (v.to("cuda") if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    for model in (plain, liger):
        _step(model, batch)  # warm-up: Triton compiles, cuBLAS picks its kernels
    loss_a, grads_a, seconds_a, peak_a = _step(plain, batch)
    loss_b, grads_b, seconds_b, peak_b = _step(liger, batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=2e-2, atol=2e-2)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:  # relative to each gradient's scale: bf16 keeps ~3 significant digits
        scale = grads_a[name].abs().max().clamp(min=1e-6)
        assert ((grads_b[name] - grads_a[name]).abs().max() / scale).item() < 5e-2, name
    record_property("liger_peak_bytes_vs_plain", f"{peak_b} vs {peak_a}")
    record_property("liger_step_s_vs_plain", f"{seconds_b:.4f} vs {seconds_a:.4f}")
    print(f"liger: peak {peak_b / 2**20:.1f} MiB vs {peak_a / 2**20:.1f} MiB, step {seconds_b * 1e3:.1f} ms vs "
          f"{seconds_a * 1e3:.1f} ms (tiny model, one H100-class GPU)")
