"""The planner says why a slower layout ranks first (issue #24 §2): full + offload on an RTX 4090 (62 GiB of host RAM,
~10 h) ranks above LoRA (~7.4 h, no host RAM) for its published ANLS, and the plan says so with both times."""

from __future__ import annotations

from planner.recommend import PlanRequest, plan


def test_full_with_offload_ranks_first_only_with_its_reason_and_both_times() -> None:
    result = plan(PlanRequest(gpu="RTX 4090"))  # what-if card: host RAM unknown, so the offload is offered
    full, lora = result.method("full"), result.method("lora")
    assert result.recommended == "full" and full.offload == "optimizer"
    assert lora.run_s < full.run_s  # the slower one ranks first ...
    reason = next(line for line in result.why if "ranks first" in line)
    assert "for its published ANLS, not for speed" in reason  # ... and the plan says why
    assert "h" in reason and "GiB of host RAM" in reason and "--method lora" in reason


def test_a_host_too_small_for_the_offload_recommends_lora() -> None:
    result = plan(PlanRequest(gpu="RTX 4090", host_ram_gib=32))
    assert result.recommended == "lora" and not result.method("full").fits
