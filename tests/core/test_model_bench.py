"""pytest-benchmark cases of the model's forward pass and training step on the CPU (tiny model, one 2×2-crop image
at num_crops 4). Disabled by default (run once as plain tests); see README "Micro-benchmarks". The full-size
comparison with Microsoft's reference code cannot live here (its code is not part of the project): README "Forward
and training step against the reference" says how it was measured."""

from __future__ import annotations

import pytest
import torch

from phi3v_core.config import tiny_config
from phi3v_core.model import Phi3VForCausalLM
from tests.core.test_model import make_batch


@pytest.fixture(scope="module")
def model_and_batch() -> tuple[Phi3VForCausalLM, dict]:
    torch.manual_seed(0)
    model = Phi3VForCausalLM(tiny_config(attn_implementation="sdpa"))
    return model, make_batch([[(672, 672)]], num_crops=4, text_len=40)


def _rate(benchmark) -> None:  # noqa: ANN001 - pytest-benchmark fixture
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["samples_per_s"] = 1 / stats.stats.mean


def test_bench_model_forward(benchmark, model_and_batch) -> None:  # noqa: ANN001 - pytest-benchmark fixture
    model, batch = model_and_batch
    model.eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs).logits

    logits = benchmark(forward)
    assert logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    _rate(benchmark)


def test_bench_model_training_step(benchmark, model_and_batch) -> None:  # noqa: ANN001 - pytest-benchmark fixture
    """Forward and backward of every parameter (supervised-only logits, the training default)."""
    model, batch = model_and_batch
    model.train()

    def train_step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss

    loss = benchmark(train_step)
    assert torch.isfinite(loss)
    projector = model.model.vision_embed_tokens.img_projection[0].weight
    assert projector.grad is not None and projector.grad.abs().sum() > 0
    _rate(benchmark)
