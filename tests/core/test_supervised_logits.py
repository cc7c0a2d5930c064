"""Supervised-only logits in training: the same loss and gradients as the full computation, for every method."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import phi3v_core.model.modeling as modeling
from phi3v_core.config import tiny_config
from phi3v_core.methods import MethodOptions, get_method
from phi3v_core.model import Phi3VForCausalLM
from planner.validate import MID_SIZE
from tests.core.test_model import make_batch

TOLERANCE = 1e-6


def build(size: str, method: str, seed: int = 0) -> Phi3VForCausalLM:
    """A fp32 model of ``size`` prepared for ``method`` (LoRA on lm_head), adapters randomised so all get gradients."""
    config = tiny_config(attn_implementation="eager")
    if size == "mid":
        values = config.to_dict()
        for key, value in MID_SIZE.items():
            values[key] = {**values[key], **value} if isinstance(value, dict) else value
        config = type(config).from_dict(values)
    torch.manual_seed(seed)
    model = Phi3VForCausalLM(config)
    options = MethodOptions(lora_rank=8, lora_lm_head=True, compute_dtype=torch.float32)
    model, _report = get_method(method).prepare(model, options)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: then A would get no gradient to compare
                param.normal_(std=0.02)
    return model.train()


def batch(answer: int = 4) -> dict:
    """Two right-padded samples of different length; only each sample's last ``answer`` text tokens are labels."""
    out = make_batch([[(336, 672)], [(672, 336)]], num_crops=2, text_len=10)
    labels = torch.full_like(out["labels"], -100)
    for row in range(labels.shape[0]):
        last = int(out["attention_mask"][row].sum())
        labels[row, last - answer : last] = out["input_ids"][row, last - answer : last]
    out["labels"] = labels
    return out


def loss_and_grads(model: torch.nn.Module, inputs: dict, supervised: bool, **extra) -> tuple[float, dict]:
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    core.supervised_logits = supervised
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = model(**inputs, **extra)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.item(), grads, out


def assert_same(full: tuple, supervised: tuple) -> None:
    assert abs(full[0] - supervised[0]) <= TOLERANCE * max(1.0, abs(full[0]))
    assert full[1].keys() == supervised[1].keys()
    for name, grad in full[1].items():
        diff = (grad - supervised[1][name]).abs().max().item()
        assert diff <= TOLERANCE, f"{name}: {diff}"


#: Every method on the tiny model; the mid size (wider layers, 16 heads) for the two forms of the head: the plain
#: ``lm_head`` with every gradient (full) and the PEFT-wrapped one (LoRA). frozen_vision's gradients are a subset of
#: full's; QLoRA leaves ``lm_head`` un-quantized (``QLORA_SKIP``), so its head is LoRA's (its 4-bit base: on tiny).
CASES = [(method, "tiny") for method in ("full", "frozen_vision", "lora", "qlora")] + [("full", "mid"), ("lora", "mid")]


@pytest.mark.parametrize(("method", "size"), CASES)
def test_loss_and_gradients_equal_the_full_logits(size: str, method: str) -> None:
    model = build(size, method)
    inputs = batch()
    full = loss_and_grads(model, inputs, supervised=False)
    supervised = loss_and_grads(model, inputs, supervised=True)
    assert supervised[2].logits is None and full[2].logits is not None
    assert len(full[1]) > 0
    if method in ("lora", "qlora"):
        assert any("lm_head.lora_A" in n for n in supervised[1])  # LoRA on lm_head trains through the module call
    assert_same(full, supervised)


def test_gradient_accumulation_normalisation_and_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """``num_items_in_batch`` (Trainer's accumulation) divides the sum; several recomputed chunks change nothing."""
    model = build("tiny", "lora")
    inputs = batch(answer=7)
    items = torch.tensor(23)
    full = loss_and_grads(model, inputs, supervised=False, num_items_in_batch=items)
    monkeypatch.setattr(modeling, "LOSS_CHUNK_TOKENS", 3)  # 14 positions → 5 chunks
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    supervised = loss_and_grads(model, inputs, supervised=True, num_items_in_batch=items)
    assert_same(full, supervised)


def test_no_label_gives_nan_like_the_full_mean() -> None:
    model = build("tiny", "full")
    inputs = batch()
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    core = model
    core.supervised_logits = True
    loss = model(**inputs).loss
    assert torch.isnan(loss)
    loss.backward()  # still connected to the graph


def test_evaluation_and_calls_without_labels_return_all_logits() -> None:
    model = build("tiny", "full").eval()
    inputs = batch()
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape and out.loss is not None
    inputs.pop("labels")
    out = model.train()(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape and out.loss is None


def test_flop_replay_counts_lm_head_at_supervised_positions_only() -> None:
    """Under the bench's fake-tensor FLOP replay (real host labels) the head runs over the labelled positions."""
    inputs = batch()
    positions = int((inputs["labels"][:, 1:] != -100).sum())
    tokens = inputs["input_ids"].numel()
    counted = {}
    for supervised in (False, True):
        with torch.device("meta"):
            model = Phi3VForCausalLM(tiny_config(attn_implementation="eager"))
        model.supervised_logits = supervised
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            counter = FlopCounterMode(display=False)
            with counter:
                model(**inputs).loss.backward()
        counted[supervised] = counter.get_total_flops()
    head = model.config.hidden_size * model.config.vocab_size
    assert counted[False] - counted[True] == 6 * head * (tokens - positions)
