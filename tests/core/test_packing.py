"""Packing equals not packing: per-sample losses and every gradient of a packed batch are those of its samples alone.

fp32 on CPU, sdpa and eager, the four methods, multi-image and text-only samples, checkpointing on and off, and rows
longer than ``original_max_position_embeddings`` whose samples are each shorter (LongRoPE's short factors).
The reference trains each sample alone (batch of one, no padding) with the packed batch's ``num_items_in_batch``,
and sums the gradients: what the Trainer's accumulation would give.
"""

from __future__ import annotations

import pytest
import torch

from phi3v_core.config import tiny_config
from phi3v_core.errors import DataError
from phi3v_core.first_fit import first_fit_decreasing, pack_rows
from phi3v_core.methods import MethodOptions, get_method
from phi3v_core.model import Phi3VForCausalLM, image_token_count
from phi3v_core.processing import Phi3VDataCollator
from phi3v_core.processing.packing import PackInfo, PackingCollator
from planner.validate import MID_SIZE

TOLERANCE = 1e-6
BASE = Phi3VDataCollator(pad_token_id=32000, padding_side="right")


def example(images: list[tuple[int, int]], text: int, answer: int | None, seed: int, num_crops: int = 2) -> dict:
    """One encoded example with placeholder runs per image; labels on the last ``answer`` tokens (None: all)."""
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = [1, 32010, 29871, 13]
    for k, (h, w) in enumerate(images, start=1):
        ids += [-k] * image_token_count(h // 336, w // 336) + [1, 29871, 13]
    ids += torch.randint(100, 30000, (text,), generator=gen).tolist() + [32007, 32000]
    input_ids = torch.tensor(ids)
    labels = input_ids.clone() if answer is None else torch.full_like(input_ids, -100)
    if answer is not None:
        labels[-answer:] = input_ids[-answer:]
    labels[input_ids < 0] = -100
    out: dict = {"input_ids": input_ids, "labels": labels, "image_sizes": list(images)}
    if images:
        pixels = torch.randn(len(images), num_crops + 1, 3, 336, 336, generator=gen)
        for i, (h, w) in enumerate(images):
            pixels[i, 1 + (h // 336) * (w // 336) :] = 0
        out["pixel_values"] = pixels
    return out


def samples() -> list[dict]:
    """Mixed lengths: one 1×2 image (~480 tokens), two images (~670), text only (42, labelled throughout), one 2×1."""
    return [
        example([(336, 672)], text=10, answer=5, seed=1),
        example([(336, 336), (336, 336)], text=30, answer=7, seed=2),
        example([], text=40, answer=None, seed=3),
        example([(672, 336)], text=20, answer=4, seed=4),
    ]


def build(method: str, attn: str, size: str = "tiny", checkpointing: bool = False, **config) -> torch.nn.Module:
    """A fp32 model prepared for ``method`` (LoRA on lm_head too), adapters randomised so that all get gradients."""
    cfg = tiny_config(attn_implementation=attn, **config)
    if size == "mid":
        values = cfg.to_dict()
        for key, value in MID_SIZE.items():
            values[key] = {**values[key], **value} if isinstance(value, dict) else value
        cfg = type(cfg).from_dict(values)
    torch.manual_seed(0)
    model, _ = get_method(method).prepare(
        Phi3VForCausalLM(cfg), MethodOptions(lora_rank=4, lora_lm_head=True, compute_dtype=torch.float32)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def supervised_count(batch: dict) -> int:
    """The Trainer's ``num_items_in_batch`` rule: labels ≠ -100 after the causal shift."""
    return int((batch["labels"][..., 1:] != -100).sum())


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def per_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy per row position (0 where no label)."""
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    return torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )


def unpacked(model: torch.nn.Module, examples: list[dict], items: int, per_sample: bool) -> tuple[list[float], float, dict]:
    """Each sample alone: its summed loss (when ``per_sample``), the total loss and the summed gradients."""
    model.zero_grad(set_to_none=True)
    sums, total = [], 0.0
    for ex in examples:
        batch = BASE([ex])
        loss = model(**batch, num_items_in_batch=torch.tensor(items)).loss
        loss.backward()
        total += float(loss)
        if per_sample:
            with torch.no_grad():
                sums.append(float(per_token_loss(_all_logits(model, batch), batch["labels"]).sum()))
    return sums, total, grads_of(model)


def packed(model: torch.nn.Module, batch: dict, items: int, per_sample: bool) -> tuple[list[float], float, dict]:
    """The packed batch: per-sample summed losses cut out of the rows (when ``per_sample``), its loss and gradients."""
    model.zero_grad(set_to_none=True)
    loss = model(**batch, num_items_in_batch=torch.tensor(items)).loss
    loss.backward()
    sums = []
    if per_sample:
        with torch.no_grad():
            losses = per_token_loss(_all_logits(model, batch), batch["labels"])
        for row, lengths in enumerate(batch["packing"].rows):
            start = 0
            for length in lengths:
                sums.append(float(losses[row, start : start + length].sum()))
                start += length
    return sums, float(loss), grads_of(model)


def _all_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    core.supervised_logits = False
    try:
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    finally:
        core.supervised_logits = True


def assert_packing_exact(
    model: torch.nn.Module, collator: PackingCollator, examples: list[dict], per_sample: bool = True
) -> dict:
    """Packed vs each sample alone: per-sample losses (cut from full logits), the loss and every gradient."""
    batch = collator(examples)
    items = supervised_count(batch)
    assert items == sum(supervised_count(BASE([ex])) for ex in examples)
    lengths = [BASE([e])["input_ids"].shape[1] for e in examples]
    order = [i for row in pack_rows(lengths, _budget(collator, examples))[0] for i in row]
    ref_losses, ref_total, ref_grads = unpacked(model, examples, items, per_sample)
    got_losses, got_total, got_grads = packed(model, batch, items, per_sample)
    assert abs(got_total - ref_total) <= TOLERANCE * max(1.0, abs(ref_total))
    for got, index in zip(got_losses, order):
        assert abs(got - ref_losses[index]) <= TOLERANCE * max(1.0, abs(ref_losses[index])), (index, got, ref_losses[index])
    assert ref_grads.keys() == got_grads.keys() and ref_grads
    for name, grad in ref_grads.items():
        diff = (grad - got_grads[name]).abs().max().item()
        assert diff <= TOLERANCE, f"{name}: {diff}"
    return batch


def _budget(collator: PackingCollator, examples: list[dict]) -> int:
    return collator.pack_tokens or max(BASE([e])["input_ids"].shape[1] for e in examples)


CASES = [(m, a, False) for m in ("full", "frozen_vision", "lora", "qlora") for a in ("sdpa", "eager")]
CASES += [("full", "sdpa", True), ("lora", "eager", True), ("qlora", "sdpa", True)]


@pytest.mark.parametrize(("method", "attn", "checkpointing"), CASES)
def test_packed_equals_unpacked_tiny(method: str, attn: str, checkpointing: bool) -> None:
    model = build(method, attn, checkpointing=checkpointing)
    # Per-sample losses (a full-logits pass each) on the plain model; the methods differ in their gradients.
    per_sample = method == "full" and not checkpointing
    batch = assert_packing_exact(model, PackingCollator(BASE, pack_tokens=1100), samples(), per_sample)
    assert len(batch["packing"].rows) == 2 and batch["input_ids"].shape[0] == 2  # several samples per row


@pytest.mark.parametrize(("method", "attn"), [("full", "sdpa"), ("lora", "eager")])
def test_packed_equals_unpacked_mid_size(method: str, attn: str) -> None:
    model = build(method, attn, size="mid", checkpointing=True)
    assert_packing_exact(model, PackingCollator(BASE, pack_tokens=1100), samples(), per_sample=False)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rows_past_original_max_positions_use_each_samples_factors(attn: str) -> None:
    """Switch at 640 tokens: the 2-image sample (> 640) uses the long factors, the others (< 640) the short ones, in
    rows of 710 and 976 tokens: as each alone, not as the row's length would choose."""
    model = build("full", attn, original_max_position_embeddings=640)
    batch = assert_packing_exact(model, PackingCollator(BASE, pack_tokens=1100), samples())
    rows = batch["packing"].rows
    assert all(sum(row) > 640 for row in rows)
    assert any(all(length < 640 for length in row) for row in rows)
    assert any(length > 640 for row in rows for length in row)


def test_long_rope_choice_differs_from_the_rows_length() -> None:
    """The test above can fail: with transformers' per-batch rule the short samples would get the long factors."""
    model = build("full", "sdpa", original_max_position_embeddings=640)
    batch = PackingCollator(BASE, pack_tokens=1100)(samples())
    rotary = model.model.rotary_emb
    x = torch.zeros(1, 1, 4)
    per_batch = rotary(x, batch["position_ids"])[0]
    rotary.long_tokens = batch["packing"].long_rope_tokens(640)
    try:
        per_sample = rotary(x, batch["position_ids"])[0]
    finally:
        rotary.long_tokens = None
    assert not torch.equal(per_batch, per_sample)


def test_first_fit_decreasing_and_pack_info() -> None:
    assert first_fit_decreasing([5, 9, 3, 4, 6], 10) == [[1], [4, 3], [0, 2]]
    info = PackInfo(rows=((9,), (6, 4), (5, 3)), width=10)
    assert (info.samples, info.real_tokens, info.computed_tokens) == (5, 27, 30)
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([11], 10)


def test_collator_layout_images_in_row_order_and_boundaries() -> None:
    examples = samples()
    batch = PackingCollator(BASE, pack_tokens=1100)(examples)
    assert "attention_mask" not in batch
    # Rows: [2 images + text-only], [2×1, 1×2]: images follow the row-major order of their samples.
    assert batch["image_sizes"] == [(336, 336), (336, 336), (672, 336), (336, 672)]
    positions = batch["position_ids"]
    assert (positions == 0).sum() == 4 + 1  # four samples and the padding at the end of the shorter row
    # Each sample's first label is ignored (text-only sample: labelled from its first token on when alone).
    assert batch["labels"][0, batch["packing"].rows[0][0]] == -100


def test_default_budget_is_the_longest_sample_and_too_long_is_refused() -> None:
    examples = samples()
    batch = PackingCollator(BASE)(examples)
    longest = max(BASE([e])["input_ids"].shape[1] for e in examples)
    assert batch["packing"].width == longest
    with pytest.raises(DataError, match="--pack_tokens"):
        PackingCollator(BASE, pack_tokens=100)(examples)


def test_flattened_rows_carry_flash_attention_lengths() -> None:
    examples = samples()
    batch = PackingCollator(BASE, flatten=True)(examples)
    lengths = [BASE([e])["input_ids"].shape[1] for e in examples]
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["cu_seq_lens_q"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert batch["max_length_q"] == max(lengths)


def test_training_collator_and_step_meter_count_packed_samples() -> None:
    """The Trainer path: the packed batch's samples and real tokens are metered, padding as computed only."""
    from phi3v_core.training.callbacks import StepMeter
    from phi3v_core.training.collate import training_collator

    examples = samples()
    batch = training_collator(packing=True, pack_tokens=1100, supervised_logits_only=True)(examples)
    meter = StepMeter()
    meter.add(batch)
    lengths = [BASE([e])["input_ids"].shape[1] for e in examples]
    assert (meter.samples, meter.tokens, meter.computed_tokens) == (4, sum(lengths), batch["input_ids"].numel())
    assert meter.computed_tokens < len(lengths) * max(lengths)  # less than padding computes
    flat = training_collator(packing=True, attn="flash_attention_2")(examples)
    assert flat["input_ids"].shape[0] == 1


def test_packing_never_computes_more_tokens_than_padding() -> None:
    """Three equal samples under a budget of two: first fit makes rows [a, b] and [c], both 2L wide (4L computed
    tokens, padding computes 3L), so the collator keeps one sample per row; the planner's token count agrees."""
    from planner.packing import token_sums

    example = samples()[0]
    length = int(BASE([example])["input_ids"].shape[1])
    batch = PackingCollator(BASE, pack_tokens=2 * length)([example] * 3)
    assert batch["packing"].rows == ((length,),) * 3 and batch["packing"].width == length
    assert batch["input_ids"].shape == (3, length)
    sums = token_sums([length] * 3, 3, "sdpa", 2 * length, shuffles=0)
    assert sums.packed == sums.padded == 3 * length
    # equal tokens either way (four equal samples in two rows of two) is not worth sdpa's wider rows either
    assert len(PackingCollator(BASE, pack_tokens=2 * length)([example] * 4)["packing"].rows) == 4
    # mixed lengths still pack (the equality tests' batch: four samples in two rows)
    assert len(PackingCollator(BASE, pack_tokens=1100)(samples())["packing"].rows) == 2
