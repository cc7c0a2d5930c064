"""pytest-benchmark micro-benchmarks of the CPU hot paths: collator and image embedding (the image processor's is in
tests/core/test_bench_processor.py). Disabled by default (run once as plain tests); see README "Micro-benchmarks"."""

from __future__ import annotations

import torch

from phi3v_core.config import tiny_config
from phi3v_core.model import Phi3VForCausalLM
from phi3v_core.processing import Phi3VDataCollator
from tests.core.test_model import make_batch


def test_collator_throughput(benchmark) -> None:  # noqa: ANN001 - pytest-benchmark fixture
    examples = []
    for length in (900, 1200, 2443, 1700):
        ids = torch.randint(3, 30000, (length,))
        ids[5 : 5 + 313] = -1  # one 336×336 image: 313 placeholder tokens
        labels = ids.clone()
        labels[: 5 + 313] = -100
        examples.append({"input_ids": ids, "labels": labels, "pixel_values": torch.zeros(1, 17, 3, 336, 336),
                         "image_sizes": [(336, 336)]})
    collate = Phi3VDataCollator(pad_token_id=32000, padding_side="right")
    batch = benchmark(collate, examples)
    assert batch["input_ids"].shape == (4, 2443)
    assert batch["pixel_values"].shape[0] == 4
    benchmark.extra_info["batches_per_s"] = 1 / benchmark.stats["mean"] if benchmark.stats else None


def test_image_embedding_throughput(benchmark) -> None:  # noqa: ANN001 - pytest-benchmark fixture
    torch.manual_seed(0)
    embed = Phi3VForCausalLM(tiny_config()).model.vision_embed_tokens.eval()
    batch = make_batch([[(672, 1008)]], num_crops=6)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return embed.image_features(batch["pixel_values"], batch["image_sizes"])

    features = benchmark(run)
    assert features.shape[0] == 144 * 6 + 12 * 2 + 157
    benchmark.extra_info["images_per_s"] = 1 / benchmark.stats["mean"] if benchmark.stats else None
