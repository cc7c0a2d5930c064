"""Generation that crosses ``original_max_position_embeddings`` (the LongRoPE short→long switch) keeps the images."""

from __future__ import annotations

import torch

from phi3v_core.config import tiny_config
from phi3v_core.model import Phi3VForCausalLM, image_token_count

NEW_TOKENS = 6


def _prompt() -> dict:
    ids = [1, 32010, 29871, 13] + [-1] * image_token_count(1, 1) + [1, 29871, 13] + list(range(100, 110)) + [32007]
    torch.manual_seed(1)
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": torch.randn(1, 2, 3, 336, 336),
        "image_sizes": [(336, 336)],
    }


def _greedy_without_cache(model: Phi3VForCausalLM, batch: dict) -> torch.Tensor:
    ids = batch["input_ids"]
    for _ in range(NEW_TOKENS):
        logits = model(
            input_ids=ids, pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], use_cache=False
        ).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


def test_generation_past_the_longrope_switch_keeps_image_features() -> None:
    batch = _prompt()
    prompt_len = batch["input_ids"].shape[1]
    # The switch falls in the middle of the generated tokens: the cache is rebuilt once, with the long factors.
    config = tiny_config(attn_implementation="eager", original_max_position_embeddings=prompt_len + 2)
    assert config.rope_parameters["rope_type"] == "longrope"
    assert config.rope_parameters["original_max_position_embeddings"] == prompt_len + 2
    torch.manual_seed(0)
    model = Phi3VForCausalLM(config).eval()
    with torch.no_grad():
        cached = model.generate(
            **batch, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[], min_new_tokens=NEW_TOKENS
        )
        reference = _greedy_without_cache(model, batch)
        blank = _greedy_without_cache(model, {**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])})
    assert cached.shape[1] == prompt_len + NEW_TOKENS
    assert torch.equal(cached, reference)
    # The image matters to this model: a blank image gives other tokens, so equality above is not vacuous.
    assert not torch.equal(reference, blank)
