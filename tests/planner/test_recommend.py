"""plan(): which methods fit, the recommendation, the launch command and the Azure quota."""

from __future__ import annotations

import json
import os
import shlex
import subprocess

import pytest

from phi3v_core.errors import ConfigError
from phi3v_core.methods import METHOD_NAMES
from planner.hardware import qlora_unsupported_reason
from planner.recommend import PlanRequest, plan, survey
from tests.safety_helpers import HANG_GUARD_S


def test_eight_a100s_run_the_recipe():
    result = plan(PlanRequest(gpu="A100-80GB", count=8, dataset_size=39_463))
    assert result.recommended == "full"
    best = result.best
    assert (best.precision, best.attn, best.zero_stage) == ("bf16", "flash_attention_2", 2)
    assert best.global_batch == 64 and best.micro_batch * best.grad_accum * 8 == 64
    # checkpointing is chosen by memory: an 80 GB card holds ZeRO-2 full fine-tuning without recompute
    assert not best.gradient_checkpointing and best.fits_without_checkpointing
    assert "--gradient_checkpointing off" in best.command and best.speedup_vs_checkpointing > 1.2
    assert best.command.startswith("torchrun --nproc_per_node=8 -m phi3v_core.cli.finetune --model_name_or_path ")
    assert "--task docvqa --method full --bf16 --use_flash_attention --batch_size 64" in best.command
    assert "--learning_rate 5e-06 --num_train_epochs 2" in best.command  # Phi-3CookBook FineTuning_Vision.md DocVQA full
    assert best.speed.epoch_s == pytest.approx(39_463 / best.speed.samples_per_s)
    assert all(m.fits for m in result.methods)
    assert any("LoRA also fits" in w for w in result.why)


def test_one_a100_holds_full_fine_tuning_only_with_8bit_adamw_on_fp32_master_weights():
    result = plan(PlanRequest(gpu="A100-80GB", count=1))
    full = result.method("full")
    plain = [lay for lay in full.layouts if lay.optim == "adamw" and lay.offload == "none"]
    assert plain and not any(lay.fits for lay in plain)  # fp32 master + AdamW: 16 B per parameter
    # bf16 weights fit in less, but keep only 8 % of the steps at lr 5e-6: 8-bit states on fp32 weights instead
    assert full.fits and full.optim == "adamw_8bit_fp32_master" and full.offload == "none"
    assert any("8-bit AdamW" in r and "fp32 master" in r and "trade-off" in r for r in full.reasons)
    assert any("not recommended" in r and "adamw_8bit (bf16 weights, update retention 8%)" in r for r in full.reasons)
    assert any(lay.optim == "adamw_8bit" and lay.fits and lay.update_retention < 0.5 for lay in full.layouts)
    assert "--optim adamw_8bit_fp32_master" in full.command
    lora = result.method("lora")
    assert lora.command.startswith("phi3v-finetune --model_name_or_path ")
    assert "--task docvqa --method lora --bf16 --use_flash_attention" in lora.command
    assert "--lora_rank 32 --lora_alpha_ratio 0.5" in lora.command


def test_t4_gets_fp16_sdpa_and_small_micro_batches():
    result = plan(PlanRequest(gpu="T4", methods=("lora", "qlora")))
    lora = result.method("lora")
    assert (lora.precision, lora.attn) == ("fp16", "sdpa")
    assert lora.fits and lora.memory.required <= 16 * 2**30
    assert any("no native bf16" in r for r in lora.reasons)
    assert "--precision fp16 --attn sdpa" in lora.command


def test_multi_node_command_and_azure_quota():
    result = plan(PlanRequest(gpu="A100-80GB", nodes=2, cloud="azure"))
    assert result.hardware.world_size == 16  # 8 GPUs per NDm A100 v4 VM
    azure = result.azure
    assert azure["vm_size"] == "Standard_ND96amsr_A100_v4"
    assert (azure["vms"], azure["vcpu_quota"]) == (2, 192)
    assert result.hardware.inter_node_gbs == 200
    command = result.best.command
    assert "--nproc_per_node=8 --nnodes=2 --node_rank=$NODE_RANK" in command
    assert shlex.split(command.split(" -m ")[1])[0] == "phi3v_core.cli.finetune"


def test_h200_sku_without_vcpu_count_says_so():
    result = plan(PlanRequest(gpu="H200", cloud="azure"))
    assert result.azure["vcpu_quota"] is None and "not in the table" in result.azure["quota_note"]


def test_qlora_support_follows_bitsandbytes_nf4_minimum():
    # bitsandbytes documents NF4 at compute capability 6.0+: a V100 (7.0) runs QLoRA, in fp16.
    result = plan(PlanRequest(gpu="V100-32GB", count=8, methods=("qlora",)))
    qlora = result.method("qlora")
    assert qlora.supported and qlora.fits and qlora.precision == "fp16"
    assert qlora_unsupported_reason((7, 0)) is None and qlora_unsupported_reason((6, 0)) is None
    reason = qlora_unsupported_reason((5, 2))
    assert reason is not None and "6.0 or newer" in reason and "5.2" in reason


def test_uneven_global_batch_is_rounded_and_said():
    result = plan(PlanRequest(gpu="A100-80GB", count=6, global_batch=64, methods=("lora",)))
    lora = result.method("lora")
    assert lora.global_batch % 6 == 0 and lora.global_batch >= 64
    assert any("does not split" in r for r in lora.reasons)


def test_crops_change_the_plan():
    many = plan(PlanRequest(gpu="T4", num_crops=16, methods=("lora",))).method("lora")
    few = plan(PlanRequest(gpu="T4", num_crops=4, methods=("lora",))).method("lora")
    # fewer crops: shorter sequences, so a larger micro-batch fits, and each sample costs fewer FLOPs
    assert few.micro_batch > many.micro_batch
    assert few.speed.samples_per_s > many.speed.samples_per_s


def test_plan_is_json_serialisable():
    result = plan(PlanRequest(gpu="L40S", count=4, nodes=2, task="ucf101", dataset_size=300))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["workload"]["images"] == 8 and data["request"]["task"] == "ucf101"
    assert {m["method"] for m in data["methods"]} == set(METHOD_NAMES)


def test_survey_covers_common_gpus():
    plans = survey(PlanRequest(methods=("lora",)))
    assert [p.hardware.gpu.key for p in plans][:2] == ["T4", "V100-32GB"]
    assert all(p.method("lora").fits for p in plans)


def test_bad_request_lists_every_problem():
    with pytest.raises(ConfigError) as info:
        plan(PlanRequest(gpu="A100", nodes=0, num_crops=32, task="coco"))
    message = str(info.value)
    assert "4 problems" in message
    for part in ("--task 'coco'", "--nodes 0", "--num_crops 32", "ambiguous"):
        assert part in message


def test_no_gpu_and_none_named(fake_nvml):
    with pytest.raises(ConfigError, match="no GPU detected"):
        plan(PlanRequest(), nvml=fake_nvml("ampere", fail_init=True))


@pytest.mark.parametrize("gpu", ["T4", "L40S", "A100-80GB"])
def test_nothing_above_95_percent_of_the_card_is_recommended(gpu):
    """Issue #10: fits = predicted reserved peak (allocated × fitted allocator overhead + context) <= 95 % of the card."""
    result = plan(PlanRequest(gpu=gpu, count=1))
    assert result.best is not None
    for m in result.methods:
        reserved = m.memory.allocated * (1 + 0.286) + m.memory.context
        assert m.memory.reserved == pytest.approx(reserved, rel=0.01)
        if m.fits:
            assert m.peak_gib <= 0.95 * m.capacity_bytes / 2**30, (gpu, m.method, m.peak_gib)
            assert m.margin_gib >= 0.05 * m.capacity_bytes / 2**30
            assert "margin" in m.reasons[0]
        elif m.supported:
            assert m.peak_gib > 0.95 * m.capacity_bytes / 2**30 or m.micro_batch == 1
    data = result.to_dict()
    assert data["headroom_fraction"] == 0.05
    assert all("margin_gib" in m for m in data["methods"])


def test_launch_command_names_the_model_folder_or_fails_clearly():
    given = plan(PlanRequest(gpu="T4", methods=("lora",), model_path="/models/Phi 3.5")).best.command
    assert "--model_name_or_path '/models/Phi 3.5' --task docvqa" in given
    placeholder = plan(PlanRequest(gpu="T4", methods=("lora",))).best.command
    assert '"${PHI3V_MODEL:?set PHI3V_MODEL or pass --model_name_or_path' in placeholder
    result = subprocess.run(
        ["bash", "-c", placeholder.replace("phi3v-finetune", "true", 1)],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode != 0 and "set PHI3V_MODEL or pass --model_name_or_path" in result.stderr


def test_time_and_cost_per_run_use_the_tasks_real_dataset_size():
    result = plan(PlanRequest(gpu="A100-80GB", cloud="azure", task="hateful_memes", price_per_gpu_hour=2.5))
    best = result.best
    assert best.speed.epoch_s == pytest.approx(8000 / best.speed.samples_per_s)  # the_cauldron train[500:]
    assert best.run_s == pytest.approx(best.speed.epoch_s * best.hyperparameters["epochs"])
    assert best.cost_usd == pytest.approx(best.run_s / 3600 * 2.5 * 8)  # 8 GPUs of one VM at the user's price
    assert any("8,000 samples" in w and "--price-per-gpu-hour" in w for w in result.why)


def test_no_cost_without_a_user_price():
    # No price table is shipped: without --price-per-gpu-hour there is no cost, on Azure or elsewhere.
    assert plan(PlanRequest(gpu="A100-80GB", cloud="azure", task="hateful_memes")).best.cost_usd is None


def test_deadline_gives_the_fewest_nodes_that_meet_it():
    one = plan(PlanRequest(gpu="A100-80GB", cloud="azure", methods=("full",)))
    hours = one.best.run_s / 3600 * 0.6  # one node is too slow; more nodes are needed
    result = plan(PlanRequest(gpu="A100-80GB", cloud="azure", methods=("full",), deadline_hours=hours))
    nodes = result.deadline["nodes"]
    assert nodes is not None and nodes >= 2 and result.deadline["run_s"] <= hours * 3600
    fewer = plan(PlanRequest(gpu="A100-80GB", cloud="azure", methods=("full",), nodes=nodes - 1))
    assert fewer.best.run_s > hours * 3600
    impossible = plan(PlanRequest(gpu="T4", methods=("lora",), deadline_hours=0.001))
    assert impossible.deadline["nodes"] is None and "not met" in impossible.deadline["reason"]


@pytest.mark.parametrize("gpu", ["H100-SXM", "A100-80GB"])
def test_lora_on_an_80gb_card_runs_without_recompute(gpu):
    lora = plan(PlanRequest(gpu=gpu, methods=("lora",))).method("lora")
    assert lora.fits and not lora.gradient_checkpointing
    assert "--gradient_checkpointing off" in lora.command
    # the speed model's recompute: checkpointing adds one forward, ~1.46x the hardware FLOPs for LoRA on a page
    assert 1.3 < lora.speedup_vs_checkpointing < 1.6
    assert any("gradient checkpointing off" in r and "x the speed" in r for r in lora.reasons)
    chosen = [lay for lay in lora.layouts if lay.chosen]
    assert len(chosen) == 1 and not chosen[0].gradient_checkpointing


@pytest.mark.parametrize("gpu", ["RTX 4090", "RTX 6000 Ada", "L40S"])
def test_full_fine_tuning_fits_one_24_to_48_gb_card(gpu):
    result = plan(PlanRequest(gpu=gpu, count=1, methods=("full",)))
    full = result.method("full")
    assert full.fits and result.recommended == "full"
    assert (full.optim, full.offload) != ("adamw", "none")  # plain AdamW (99.6 GiB) never fits these
    if full.offload == "optimizer":
        # 16 B per parameter of host RAM: fp32 master, fp32 grads, Adam m and v (4.15 B parameters)
        assert full.host_bytes == pytest.approx(16 * result.shape.param_counts().trainable("full", 0), rel=1e-6)
        assert any("host RAM" in r and "CPU Adam" in r for r in full.reasons)
        assert "--offload optimizer" in full.command
    else:
        assert "--optim adamw_8bit" in full.command


def test_offload_is_refused_when_the_host_lacks_the_ram():
    full = plan(PlanRequest(gpu="RTX 4090", count=1, methods=("full",), host_ram_gib=32)).method("full")
    assert not full.fits
    assert all(not lay.fits for lay in full.layouts if lay.offload == "optimizer")


def test_layouts_are_in_the_json():
    data = json.loads(json.dumps(plan(PlanRequest(gpu="L40S", methods=("full", "lora"))).to_dict()))
    full = data["methods"][0]
    options = {(lay["gradient_checkpointing"], lay["optim"], lay["offload"]) for lay in full["layouts"]}
    assert options == {
        (gc, o, off) for gc in (True, False)
        for o, off in (("adamw", "none"), ("adamw_8bit_fp32_master", "none"), ("adamw_8bit", "none"), ("adamw", "optimizer"))
    }  # fmt: skip
    assert sum(lay["chosen"] for lay in full["layouts"]) == 1
    # every layout carries its update retention at the recipe's lr (5e-6): only bf16 weights lose the steps
    retention = {lay["optim"]: lay["update_retention"] for lay in full["layouts"]}
    assert retention == {"adamw": 1.0, "adamw_8bit_fp32_master": 1.0, "adamw_8bit": pytest.approx(0.078, abs=0.001)}
    chosen = next(lay for lay in full["layouts"] if lay["chosen"])
    assert chosen["update_retention"] >= 0.5 and full["update_retention"] == chosen["update_retention"]
    lora = data["methods"][1]
    assert {lay["optim"] for lay in lora["layouts"]} == {"adamw"}
