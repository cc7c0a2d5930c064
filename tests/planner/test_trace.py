"""--trace: the real step on fake tensors under MemTracker, its cache, and how it feeds the plan."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from planner.allocator import CachingAllocatorModel, allocation_replay
from planner.estimate import SampleShape, activation_terms, estimate_memory
from planner.memory_types import Overheads
from planner.shapes import load_shape
from planner.trace import (
    apply_trace,
    cache_dir,
    trace_activations,
    trace_key,
)
from planner.train_setup import TrainSetup

MIB = 2**20


def _closed_form_dynamic(shape, setup, workload) -> float:
    """Activations + temporaries at the loss-backward moment in the closed form (what the trace measures)."""
    acts = activation_terms(shape, setup, workload)
    return acts["lm_saved"] + acts["vision_saved"] + acts["logits_loss"] + acts["pixels"]


@pytest.mark.parametrize("logits", ["supervised", "full"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_tiny_trace_is_cached_and_agrees(method, logits):
    shape = load_shape("tiny")
    workload = SampleShape.from_images(shape, 4, (672, 672), text_tokens=40, answer_tokens=32)
    setup = TrainSetup(method=method, precision="bf16", attn="flash_attention_2", world_size=8, logits=logits)
    first = trace_activations("tiny", setup, workload)
    assert not first["cached"] and first["traced_attention"] == "sdpa"
    assert (cache_dir() / f"{first['key']}.json").is_file()
    second = trace_activations("tiny", setup, workload)
    assert second["cached"] and second["dynamic"] == first["dynamic"]
    expected = _closed_form_dynamic(shape, setup, workload)
    if logits == "full":
        assert first["dynamic"] == pytest.approx(expected, rel=0.10)
    else:  # 32 positions: the loss buffers no longer set the peak; compare whole steps, phase by phase
        closed = estimate_memory(shape, setup, workload)
        traced = apply_trace(closed, shape, setup, workload, Overheads.cpu(), first)
        assert traced.allocated == pytest.approx(closed.allocated, rel=0.10)
    if method == "qlora":
        assert any("QLoRA traced as LoRA" in n for n in first["notes"])


def test_qlora_and_lora_traces_are_cached_apart():
    # QLoRA is traced as LoRA, but its stored result carries the 4-bit adjustment: one must not answer for the other
    shape = load_shape("tiny")
    workload = SampleShape.from_images(shape, 4, (672, 672), text_tokens=40)
    lora = TrainSetup(method="lora", precision="bf16", attn="flash_attention_2")
    assert trace_key(shape, lora, workload) != trace_key(shape, dataclasses.replace(lora, method="qlora"), workload)


def test_allocator_model_reuses_splits_and_merges():
    alloc = CachingAllocatorModel()
    alloc.malloc("a", 100 * MIB)
    alloc.free("a")
    alloc.malloc("b", 50 * MIB)  # best fit splits the cached 100 MiB block
    alloc.malloc("c", 50 * MIB)  # ... and serves the remainder
    assert alloc.reserved == 100 * MIB and alloc.allocated == 100 * MIB
    alloc.free("b")
    alloc.free("c")
    alloc.malloc("d", 100 * MIB)  # the halves merged back
    assert alloc.reserved == 100 * MIB
    alloc.malloc("e", 1000)  # small pool: its own 2 MiB segment
    alloc.malloc("f", 3 * MIB)  # under 10 MiB: a 20 MiB segment ...
    alloc.malloc("g", 3 * MIB)  # ... shared by the next one
    assert alloc.reserved == (100 + 2 + 20) * MIB
    assert alloc.allocated == 100 * MIB + 1024 + 6 * MIB  # 1000 B rounds up to 512-byte multiples


def test_allocator_model_long_lived_block_pins_a_freed_large_one():
    # A small tensor carved out of a freed large block keeps that block from serving the next large request.
    alloc = CachingAllocatorModel()
    alloc.malloc("scores", 100 * MIB)
    alloc.free("scores")
    alloc.malloc("grad", 4 * MIB)
    alloc.malloc("scores2", 100 * MIB)
    assert alloc.reserved == 200 * MIB and alloc.peak_allocated == 104 * MIB


def test_allocation_replay_sees_what_memtracker_sees(tmp_path):
    shape = load_shape("tiny")
    workload = SampleShape.from_images(shape, 4, (672, 672), text_tokens=40)
    setup = TrainSetup(method="lora", precision="fp16", weight_dtype="fp32", attn="eager")
    replay = allocation_replay("tiny", setup, [workload], grad_accum=1, steps=2)
    traced = trace_activations("tiny", setup, workload, cache=tmp_path)
    assert replay["peak_allocated"] == pytest.approx(traced["peak"]["Total"], rel=0.02)  # 512-byte rounding
    assert replay["peak_reserved"] >= replay["peak_allocated"] and replay["events"] > 1000


def test_apply_trace_keeps_sharded_states():
    from planner.estimate import estimate_memory
    from planner.memory_types import Overheads

    shape = load_shape("phi-3.5-vision")
    workload = SampleShape.from_images(shape, 16, (1008, 1680), text_tokens=66)
    setup = TrainSetup(method="full", world_size=8)
    closed = estimate_memory(shape, setup, workload)
    fake_trace = {"dynamic": 2 * 2**30, "micro_batch": 1, "dynamic_phase": "backward", "gradient_checkpointing": True}
    traced = apply_trace(closed, shape, setup, workload, Overheads.cpu(), fake_trace)
    names = {i.name for i in traced.items}
    assert {"weights", "optimizer_states", "deepspeed_buckets", "gradients"} <= names
    assert traced.allocated >= closed.phases["optimizer step"]


@pytest.mark.slow
def test_full_size_trace_completes_on_cpu():
    """The exact 4.1 B model, full fine-tuning step (forward, backward, AdamW) on fake tensors (~20-60 s)."""
    shape = load_shape("phi-3.5-vision")
    workload = SampleShape.from_images(shape, 16, (1008, 1680), text_tokens=66)
    setup = TrainSetup(method="full", precision="bf16", attn="flash_attention_2", world_size=8, logits="full")
    result = trace_activations("phi-3.5-vision", setup, workload)
    assert result["peak"]["Parameter"] == 2 * shape.param_counts().total  # bf16 weights, every tensor seen
    assert result["dynamic_phase"] in ("forward", "backward")
    print(
        f"traced {result['dynamic'] / 2**30:.3f} GiB vs closed form {_closed_form_dynamic(shape, setup, workload) / 2**30:.3f} GiB in {result['seconds']} s"
    )
    assert result["dynamic"] == pytest.approx(_closed_form_dynamic(shape, setup, workload), rel=0.10)


@pytest.mark.slow
def test_eager_trace_matches_recorded_evidence(tmp_path):
    """Re-measure the recorded evidence for the recipe's LoRA no-FA row (fp32 weights, fp16 autocast, eager)."""
    import planner
    from planner.calibration import load_calibration
    from planner.estimate import estimate_memory
    from planner.memory_types import Overheads

    shape = load_shape("phi-3-vision")
    workload = SampleShape.from_images(shape, 16, (1008, 1680), text_tokens=66)
    label = "8xA100-80GB x1 lora no FA"
    row = next(r for r in load_calibration().rows if r.label == label)
    setup = row.setup()
    assert (setup.weight_dtype, setup.precision, setup.attn) == ("fp32", "fp16", "eager")
    trace = trace_activations("phi-3-vision", setup, workload, cache=tmp_path)
    closed = estimate_memory(shape, setup, workload)
    traced = apply_trace(closed, shape, setup, workload, Overheads.cpu(), trace).allocated / 2**30
    recorded = json.loads((Path(planner.__file__).parent / "data" / "calibration.json").read_text())
    assert traced == pytest.approx(recorded["memory_trace_evidence"]["rows"][label]["traced_allocated_gib"], rel=0.02)
    assert traced == pytest.approx(closed.allocated / 2**30, rel=0.05)


def _replay_row(model: str, shape, label: str) -> dict:
    """``allocation_replay`` of calibration row ``label`` on ``model``, with the recorded evidence's samples and steps."""
    import planner
    from planner.calibration import load_calibration

    recorded = json.loads((Path(planner.__file__).parent / "data" / "calibration.json").read_text())
    replay_evidence = recorded["memory_trace_evidence"]["allocator_replay"]
    row = next(r for r in load_calibration().rows if r.label == label)
    workloads = [
        SampleShape.from_images(shape, 16, (336 * cols, 336 * rows), text_tokens=66)
        for rows, cols in replay_evidence["grids"]
    ]
    return allocation_replay(
        model, row.setup(), workloads, grad_accum=replay_evidence["grad_accum"], steps=replay_evidence["steps"]
    )


#: ``allocation_replay`` of the LoRA no-FA row on a depth-reduced phi-3-vision (2 of 32 decoder layers, 2 of 24 CLIP
#: layers; widths, vocabulary, samples, 2 x 8 micro-steps as in calibration.json's evidence), recorded 2026-12-07 with
#: torch 2.13.0+cpu / transformers 5.24.0 / peft 0.21.2 by the same code that recorded the full-size evidence. The
#: fixed parts (embeddings, head, projector, pixels) weigh more at this depth, hence the higher ratio than full size.
REDUCED_REPLAY = {"peak_allocated": 5312027648, "peak_reserved": 9045016576, "ratio": 1.7027}


def _reduced_copy(folder: Path, layers: int, vision_layers: int) -> str:
    """A checkpoint folder (config only) of phi-3-vision with ``layers`` decoder and ``vision_layers`` CLIP layers."""
    from phi3v_core.preset_files import official_preset

    folder.mkdir()
    config = official_preset("phi-3-vision")["config"]
    (folder / "config.json").write_text(
        json.dumps({**config, "num_hidden_layers": layers, "vision_config": {"num_hidden_layers": vision_layers}})
    )
    assert load_shape(str(folder)).num_layers == layers
    return str(folder)


def test_allocator_replay_of_reduced_copies_matches_the_recorded_evidence(tmp_path):
    """The allocator replay of the recipe's LoRA no-FA row on depth-reduced copies of the real model (~45 CPU-s).

    The same product path as the full-size evidence (a checkpoint folder read by ``load_shape``/``get_config``, the
    real model on fake tensors, every allocation of 16 micro-steps through the allocator model); only the number of
    identical layers differs. Checked: the 2+2-layer copy reproduces its recorded peaks and reserved/allocated ratio,
    and the allocated peak, linear in the layer counts (identical layers), extrapolated from one more decoder layer
    and one more CLIP layer to 32 + 24 layers, matches the full-size evidence in calibration.json. The reserved peak
    does not extrapolate (cached blocks are reused across identical layers, so it grows less than linearly); the
    full-size ratio is re-measured by the next test when asked for.
    """
    import planner
    from phi3v_core.config import CLIP_VIT_L14_336

    label = "8xA100-80GB x1 lora no FA"
    shape = load_shape("phi-3-vision")
    replays = {
        (layers, vision): _replay_row(_reduced_copy(tmp_path / f"{layers}-{vision}", layers, vision), shape, label)
        for layers, vision in ((2, 2), (3, 2), (2, 3))
    }
    base = replays[2, 2]
    assert base["ratio"] == pytest.approx(REDUCED_REPLAY["ratio"], abs=0.02)
    assert base["peak_allocated"] == pytest.approx(REDUCED_REPLAY["peak_allocated"], rel=0.02)
    assert base["peak_reserved"] == pytest.approx(REDUCED_REPLAY["peak_reserved"], rel=0.02)
    per_layer = replays[3, 2]["peak_allocated"] - base["peak_allocated"]
    per_vision_layer = replays[2, 3]["peak_allocated"] - base["peak_allocated"]
    assert per_layer > 0 and per_vision_layer > 0
    full_size = (
        base["peak_allocated"]
        + (shape.num_layers - 2) * per_layer
        + (CLIP_VIT_L14_336["num_hidden_layers"] - 2) * per_vision_layer
    )
    recorded = json.loads((Path(planner.__file__).parent / "data" / "calibration.json").read_text())
    evidence = recorded["memory_trace_evidence"]["allocator_replay"]["rows"][label]
    assert full_size / 2**30 == pytest.approx(evidence["peak_allocated_gib"], rel=0.02)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("PHI3V_FULL_REPLAY"),
    reason="full-size allocator replay (~6 CPU-min): set PHI3V_FULL_REPLAY=1; the reduced copy is replayed above",
)
def test_eager_allocator_replay_matches_recorded_evidence():
    """Re-run the recorded allocator replay of the recipe's LoRA no-FA row at full size (two optimizer steps)."""
    import planner

    recorded = json.loads((Path(planner.__file__).parent / "data" / "calibration.json").read_text())
    evidence = recorded["memory_trace_evidence"]["allocator_replay"]["rows"]["8xA100-80GB x1 lora no FA"]
    replay = _replay_row("phi-3-vision", load_shape("phi-3-vision"), "8xA100-80GB x1 lora no FA")
    assert replay["ratio"] == pytest.approx(evidence["ratio"], abs=0.02)
    assert replay["peak_allocated"] / 2**30 == pytest.approx(evidence["peak_allocated_gib"], rel=0.02)
