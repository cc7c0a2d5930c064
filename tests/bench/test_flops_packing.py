"""FLOPs of packed rows (issue #25): the model count charges each sample its own tokens and attention square, as if
trained alone; the hardware count charges what the kernels run (whole rows with sdpa/eager, samples with FA2)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bench.flop_count import analytic_step_flops, attention_step_flops
from phi3v_core.config import get_config
from phi3v_core.flops import MicroBatchShape, ModelDims, TrainableParts, micro_batch_shape, step_flops
from phi3v_core.mfu import causal_attention_flops
from phi3v_core.processing.packing import PackInfo
from phi3v_core.training.collate import training_collator

#: Four samples packed into two rows of 350 tokens; padded, they are four rows of 300.
LENGTHS = (300, 50, 200, 100)
ROWS = ((300, 50), (200, 100))


def _dims() -> ModelDims:
    return ModelDims.from_config(get_config("tiny"))


def _sample(length: int) -> MicroBatchShape:
    """One sample alone: one crop, its image tokens and 5 supervised positions (the same for every sample)."""
    return MicroBatchShape(rows=1, seq_len=length, crops=1, image_tokens=150, head_positions=5)


def _packed() -> MicroBatchShape:
    n = len(LENGTHS)
    return MicroBatchShape(rows=2, seq_len=350, crops=n, image_tokens=150 * n, head_positions=5 * n, samples=LENGTHS)


@pytest.mark.parametrize("method", ["full", "lora", "frozen_vision"])
def test_packed_model_flops_are_the_sum_of_the_samples_alone(method: str) -> None:
    dims, parts = _dims(), TrainableParts.for_method(method)
    packed = step_flops(dims, parts, [_packed()], checkpointing=False)
    alone = [step_flops(dims, parts, [_sample(n)], checkpointing=False).model_flops for n in LENGTHS]
    assert packed.model_flops == sum(alone)
    # checkpointing changes the hardware count only
    assert step_flops(dims, parts, [_packed()], checkpointing=True).model_flops == sum(alone)


def test_packed_and_padded_counts_on_a_known_length_list() -> None:
    dims, parts = _dims(), TrainableParts.for_method("full")  # every weight trains: 6 FLOPs per weight and token
    width = dims.heads * dims.head_dim
    qkv = (dims.heads + 2 * dims.kv_heads) * dims.head_dim
    per_token = 6 * dims.layers * (dims.hidden * qkv + width * dims.hidden + dims.hidden * 3 * dims.intermediate)
    per_square = 12 * dims.layers * width  # QKᵀ and AV forward (2 × 2 per pair and unit) and backward (twice that)

    packed = step_flops(dims, parts, [_packed()], checkpointing=False, attn="sdpa")
    n = len(LENGTHS)
    padded_shape = MicroBatchShape(rows=n, seq_len=300, crops=n, image_tokens=150 * n, head_positions=5 * n)
    padded = step_flops(dims, parts, [padded_shape], checkpointing=False)
    # padded: four rows of 300, padding included, one square per row, in both counts
    assert padded.model_flops == padded.hardware_flops
    pad_tokens = n * 300 - sum(LENGTHS)
    squares = n * 300**2 - sum(s * s for s in LENGTHS)
    assert padded.model_flops - packed.model_flops == per_token * pad_tokens + per_square * squares
    # sdpa runs the dense block-diagonal mask: 700 positions, a 350² square per row, the same as two padded rows of 350
    tail = 2 * 350 - sum(LENGTHS)
    row_squares = 2 * 350**2 - sum(s * s for s in LENGTHS)
    assert packed.hardware_flops - packed.model_flops == per_token * tail + per_square * row_squares
    as_rows = MicroBatchShape(rows=2, seq_len=350, crops=n, image_tokens=150 * n, head_positions=5 * n)
    assert packed.hardware_flops == step_flops(dims, parts, [as_rows], checkpointing=False).model_flops
    # flash-attention-2: one flattened row without a tail runs only the samples' squares
    flat = MicroBatchShape(rows=1, seq_len=650, crops=n, image_tokens=150 * n, head_positions=5 * n, samples=LENGTHS)
    fa2 = step_flops(dims, parts, [flat], checkpointing=False, attn="flash_attention_2")
    assert fa2.hardware_flops == fa2.model_flops == packed.model_flops


def test_micro_batch_shape_reads_the_samples_of_a_packed_batch() -> None:
    dims = _dims()
    batch = {"input_ids": torch.zeros(2, 350, dtype=torch.long), "packing": PackInfo(rows=ROWS, width=350)}
    assert micro_batch_shape(batch, dims, "full").samples == LENGTHS
    assert micro_batch_shape({"input_ids": torch.zeros(2, 350, dtype=torch.long)}, dims, "full").samples == ()
    # the 6N conventions' causal attention: per sample, not per row
    c = get_config("tiny")
    expected = causal_attention_flops(c.num_hidden_layers, c.num_attention_heads * dims.head_dim, LENGTHS)
    assert attention_step_flops(SimpleNamespace(model="tiny"), [batch]) == expected


def test_collated_packed_step_counts_its_samples_as_if_alone() -> None:
    """Real examples with images through the training collators: the packed micro-batch's model FLOPs equal the sum
    of each example collated alone, and sdpa's hardware count is larger (the rows' tails and whole-row squares)."""
    from phi3v_core.processing import Phi3VProcessor
    from phi3v_core.training.synthetic import SyntheticDataset

    processor = Phi3VProcessor.tiny(num_crops=1)
    examples = [
        SyntheticDataset(num_examples=1, processor=processor, image_size=size, images_per_example=k, seed=k)[0]
        for size, k in (((336, 336), 1), ((672, 336), 2), ((336, 336), 1))
    ]
    cfg = SimpleNamespace(model="tiny", method="lora", lora_rank=8, lora_lm_head=True, freeze_vision=False,
                          gradient_checkpointing=False, attn="sdpa")
    # one row of all three (1,509 computed tokens against 3 × 713 padded); two rows would not beat padding
    packed_batch = training_collator(packing=True, pack_tokens=sum(len(e["input_ids"]) for e in examples))(examples)
    assert len(packed_batch["packing"].rows) < len(examples)  # something was packed
    packed = analytic_step_flops(cfg, [packed_batch])
    alone = sum(analytic_step_flops(cfg, [training_collator()([e])]).model_flops for e in examples)
    assert packed.model_flops == alone
    assert packed.hardware_flops > packed.model_flops
