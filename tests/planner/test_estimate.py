"""The memory model: the recipe's published peaks, DeepSpeed's formulas, and basic monotonicity."""

from __future__ import annotations

import dataclasses

import pytest

from planner.calibration import calibration_report, calibration_summary, fit_cache_fraction, load_calibration
from planner.estimate import SampleShape, estimate_memory, model_state_bytes
from planner.layouts import fits_with_headroom
from planner.memory_types import GIB
from planner.shapes import ModelShape
from planner.speed import reference_shape
from planner.train_setup import TrainSetup

PHI3V = ModelShape.preset("phi-3-vision")  # the published table was measured on Phi-3-vision v1 (same shapes)
P = PHI3V.param_counts().total


@pytest.fixture(scope="module")
def report():
    return {r["row"]: r for r in calibration_report(load_calibration(), PHI3V)}


@pytest.mark.parametrize(
    ("row", "published"),
    [
        ("8xA100-80GB x1 full FA2", 36),
        ("8xA100-80GB x2 full FA2", 29),
        ("8xA100-80GB x4 full FA2", 26),
        ("8xA100-80GB x1 lora FA2", 16),
        ("8xA100-80GB x1 qlora FA2", 10),
    ],
)
def test_flash_memory_rows_within_10_percent_when_held_out(report, row, published):
    """Phi-3CookBook fine-tuning guide: ~36/~29/~26 GB full FT on 1/2/4 nodes, LoRA ~16, QLoRA ~10 (8xA100, FA2).

    Each row is judged as a prediction: the allocator overhead fitted on the OTHER four flash rows (leave-one-out),
    so the row's own number never sets the constant it is judged with.
    """
    calibration = load_calibration()
    loo = fit_cache_fraction(calibration, PHI3V, leave_out=row)
    assert loo != pytest.approx(fit_cache_fraction(calibration, PHI3V), abs=1e-6)  # the row did weigh in the fit
    assert report[row]["published_gb"] == published and report[row]["memory_role"] == "fitted"
    anchor = next(r for r in calibration.rows if r.label == row)
    overheads = dataclasses.replace(calibration.overheads, cache_fraction=loo)
    est = estimate_memory(reference_shape(PHI3V, anchor.method), anchor.setup(), anchor.sample_shape(PHI3V), overheads)
    error = 100 * (est.reserved / GIB / published - 1)
    assert report[row]["memory_held_out_error_pct"] == pytest.approx(error, abs=0.06)
    assert abs(error) <= 10, report[row]


def test_held_out_memory_line_counts_only_predictions(report):
    """``--calibration``'s memory line: flash rows leave-one-out, no-flash rows as they are, card-sized peaks apart."""
    rows = list(report.values())
    summary = calibration_summary(rows, [])
    judged = [r for r in rows if r["memory_held_out_error_pct"] is not None]
    assert summary["held_out_memory_rows"] == len(judged) == 9
    assert not any(r["suspect"] or r["memory_saturated"] for r in judged)
    errors = sorted(abs(r["memory_held_out_error_pct"]) for r in judged)
    assert summary["held_out_memory_error_median_pct"] == errors[4]
    assert summary["held_out_memory_error_max_pct"] == errors[-1]
    assert summary["saturated_memory_rows"] == 3 and summary["saturated_memory_rows_consistent"] == 3
    assert len(summary["excluded_rows"]) == 3 and all("frozen_vision" in r for r in summary["excluded_rows"])


def test_held_out_memory_rows_within_10_percent_or_say_what_is_not_modelled(report):
    """Every row the allocator overhead was not fitted on: within 10 %, saturated at the card, or named."""
    held = [r for r in report.values() if r["memory_role"] == "held_out"]
    assert len(held) >= 6
    for r in held:
        if r["memory_note"].startswith("saturated"):
            assert r["memory_ok"], r
        elif abs(r["memory_error_pct"]) > 10:
            assert not r["memory_ok"] and r["memory_note"].startswith("not modelled"), r
        else:
            assert r["memory_ok"], r
    # the flash-attention model itself carries over to the V100 rows it was not fitted on
    assert all(r["memory_ok"] for r in held if r["row"].startswith("8xV100"))


#: The CookBook guide's peak memory of the 8xA100 rows without flash attention (GB per GPU).
PUBLISHED_EAGER_GB = {"8xA100-80GB x1 full no FA": 42.0, "8xA100-80GB x1 lora no FA": 50.0,
                      "8xA100-80GB x1 qlora no FA": 32.0}
#: What the memory model leaves unexplained on those rows today (published minus predicted, GB).
UNMODELLED_EAGER_GB = {"8xA100-80GB x1 full no FA": 4.5, "8xA100-80GB x1 lora no FA": 21.0,
                       "8xA100-80GB x1 qlora no FA": 18.9}


def test_eager_misses_name_the_unmodelled_term_and_its_size(report):
    """issue #10: a missed row says precisely what is not modelled and by how much, with the tensors checked."""
    misses = [r for r in report.values() if r["memory_role"] == "held_out" and not r["memory_ok"]]
    assert {r["row"] for r in misses} <= {
        "8xA100-80GB x1 full no FA",
        "8xA100-80GB x1 lora no FA",
        "8xA100-80GB x1 qlora no FA",
    }
    for r in misses:
        assert r["memory_unmodelled_term"] == "elastic reserve", r
        # golden sizes (published 42 / 50 / 32 GB in the CookBook guide's table; today's predictions 37.5 / 29.0 /
        # 13.1 GB): a change of the memory model moves them and fails here
        assert r["published_gb"] == PUBLISHED_EAGER_GB[r["row"]], r
        assert r["memory_unmodelled_gb"] == pytest.approx(UNMODELLED_EAGER_GB[r["row"]], abs=0.3), r
        assert f"{r['memory_unmodelled_gb']:+.1f} GB" in r["memory_note"]
        # the tensors are accounted for: the real model traced with the row's settings agrees with the closed form
        assert r["traced_allocated_gib"] == pytest.approx(r["allocated_gib"], rel=0.05), r
    lora = report["8xA100-80GB x1 lora no FA"]
    # not fragmentation of the step's own allocations either: the eager replay reserves about what the flash one does
    assert lora["replayed_reserved_ratio"] < 1.5 < lora["published_gb"] / lora["allocated_gib"]
    # the same settings on the 32 GB card are predicted right: same tensors, 20 GB less retained
    assert "8xV100-32GB peak at 30 GB" in lora["memory_note"] and report["8xV100-32GB x1 lora no FA"]["memory_ok"]
    for r in report.values():
        if r["memory_ok"]:
            assert r["memory_unmodelled_gb"] == 0 and not r["memory_unmodelled_term"]


def test_recorded_trace_evidence_matches_the_closed_form():
    """The recorded real-model traces (calibration.json) still agree with today's closed form on their sample."""
    calibration = load_calibration()
    evidence = calibration.constants["memory_trace_evidence"]["rows"]
    workload = SampleShape.from_images(PHI3V, 16, (1008, 1680), text_tokens=66)
    assert workload.seq_len == 2443  # the recipe's mean sample
    rows = {row.label: row for row in calibration.rows}
    assert len(evidence) == 6
    for label, recorded in evidence.items():
        closed = estimate_memory(PHI3V, rows[label].setup(), workload).allocated / GIB
        assert closed == pytest.approx(recorded["closed_form_allocated_gib"], abs=0.01), label
        assert recorded["traced_allocated_gib"] == pytest.approx(closed, rel=0.05), label


def test_v100_full_fits_its_card_but_fills_it(report):
    # The published "~32" is the whole 32 GB card: the model must fit (it ran) and the cache grows to the cap.
    shape = PHI3V
    calibration = load_calibration()
    row = next(r for r in calibration.rows if r.label == "8xV100-32GB x1 full no FA")
    est = estimate_memory(shape, row.setup(), row.sample_shape(shape), calibration.overheads)
    assert est.required <= 32 * GIB  # tensors + context fit the card: the recipe ran it
    assert est.expected_peak(32 * GIB) == pytest.approx(32 * GIB)
    # the planner's one fit rule (reserved peak within 95 % of the card) does not recommend it, as the README says
    assert not fits_with_headroom(est, 32 * GIB, calibration)


def test_cache_fraction_is_the_documented_fit():
    calibration = load_calibration()
    assert fit_cache_fraction(calibration, PHI3V) == pytest.approx(calibration.overheads.cache_fraction, abs=0.01)


def test_zero2_model_states_follow_deepspeed():
    # DeepSpeed's estimate_zero2_model_states_mem_needs: 2P + 18P/N on GPU, buckets 4.5 x (5e8 + 5e8) x 2 B = 9 GB with overlap_comm
    for n in (8, 16, 32):
        states = model_state_bytes(PHI3V, TrainSetup(method="full", world_size=n))
        trainable = P - PHI3V.param_counts().vision_dead
        assert states["weights"] == 2 * P
        assert states["gradients"] + states["optimizer_states"] == pytest.approx(18 * trainable / n)
        assert states["deepspeed_buckets"] == pytest.approx(9e9)
    no_overlap = model_state_bytes(PHI3V, TrainSetup(method="full", world_size=8, overlap_comm=False))
    assert no_overlap["deepspeed_buckets"] == pytest.approx(2e9)


def test_single_process_full_keeps_fp32_masters():
    states = model_state_bytes(PHI3V, TrainSetup(method="full", weight_dtype="fp32", zero_stage=0))
    trainable = P - PHI3V.param_counts().vision_dead  # the dead CLIP layer is frozen
    assert states["weights"] == 4 * P
    assert states["gradients"] + states["optimizer_states"] == 12 * trainable


def test_lora_and_qlora_states():
    lora = PHI3V.lora_params(64)
    assert lora == pytest.approx(131e6, rel=0.01)  # ~2 GB of fp32 params, grads and Adam (16 B per trainable parameter)
    states = model_state_bytes(PHI3V, TrainSetup(method="lora", world_size=8))
    assert states["weights"] == 2 * P
    assert states["lora_weights"] + states["gradients"] + states["optimizer_states"] == 16 * lora
    qlora = model_state_bytes(PHI3V, TrainSetup(method="qlora"))
    # nf4 + fp32 absmax per 64 for every Linear except lm_head: ~2.6 GB (bitsandbytes nf4 arithmetic: ~2.7)
    assert qlora["weights"] / 1e9 == pytest.approx(2.63, abs=0.05)


def _docvqa() -> SampleShape:
    return SampleShape.from_images(PHI3V, 16, (1008, 1680), text_tokens=66)


def test_memory_grows_with_micro_batch_and_without_checkpointing():
    base = TrainSetup(method="lora")
    sizes = [estimate_memory(PHI3V, dataclasses.replace(base, micro_batch=mb), _docvqa()).allocated for mb in (1, 2, 4)]
    assert sizes[0] < sizes[1] < sizes[2]
    no_gc = estimate_memory(PHI3V, dataclasses.replace(base, gradient_checkpointing=False), _docvqa())
    assert no_gc.allocated > sizes[0] + 10 * GIB  # ~20 GB of saved activations at 2.4k tokens (EleutherAI's Transformer Math 101 activation formula)


def test_eager_attention_costs_more_than_flash():
    flash = estimate_memory(PHI3V, TrainSetup(method="lora", gradient_checkpointing=False), _docvqa())
    eager = estimate_memory(
        PHI3V, TrainSetup(method="lora", attn="eager", gradient_checkpointing=False), _docvqa()
    )
    # 32 layers x 32 heads x s^2 x (4 + 2) bytes of softmax output alone
    assert eager.allocated - flash.allocated > 32 * 32 * 2443**2 * 6 * 0.9


def test_more_ranks_shard_full_fine_tuning():
    peaks = [estimate_memory(PHI3V, TrainSetup(method="full", world_size=n), _docvqa()).allocated for n in (1, 8, 32)]
    assert peaks[0] > peaks[1] > peaks[2]


def test_invalid_setup_reports_every_problem():
    from phi3v_core.errors import ConfigError

    with pytest.raises(ConfigError, match="3 problems"):
        TrainSetup(method="no-such-method", precision="int8", attn="flex")
    with pytest.raises(ConfigError, match="flash_attention_2 needs bf16 or fp16"):
        TrainSetup(precision="fp32")


def test_8bit_adamw_and_offloaded_optimizer_states_from_first_principles():
    from planner.estimate import ADAM_8BIT_BYTES_PER_PARAM, host_memory_bytes, model_state_bytes
    from planner.shapes import load_shape

    shape = load_shape("phi-3.5-vision")
    trainable = shape.param_counts().trainable("full", 0)
    total = shape.param_counts().total
    eight = model_state_bytes(shape, TrainSetup(method="full", weight_dtype="bf16", zero_stage=0, optim="adamw_8bit"))
    assert ADAM_8BIT_BYTES_PER_PARAM == pytest.approx(2 + 8 / 256)
    embed = shape.param_counts().embed  # the HF Trainer keeps the embedding's states in 32 bits
    assert eight["optimizer_states"] == pytest.approx(ADAM_8BIT_BYTES_PER_PARAM * (trainable - embed) + 8 * embed)
    assert eight["weights"] == 2 * total and eight["gradients"] == 2 * trainable
    offload = TrainSetup(method="full", offload_optimizer=True)
    states = model_state_bytes(shape, offload)
    assert "optimizer_states" not in states and states["weights"] == 2 * total
    assert states["gradients"] == 2 * shape.param_counts().lm_head  # the largest gradient before its bucket
    assert host_memory_bytes(shape, offload) == 16 * trainable
    assert host_memory_bytes(shape, TrainSetup(method="full", offload_optimizer=True, world_size=4)) == 4 * trainable
    assert host_memory_bytes(shape, TrainSetup(method="full")) == 0
    with pytest.raises(Exception, match="offload_optimizer"):
        TrainSetup(method="lora", offload_optimizer=True)
