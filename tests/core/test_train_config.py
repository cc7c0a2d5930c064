"""TrainConfig validation (every problem at once, on simulated machines) and the generated DeepSpeed config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from phi3v_core.errors import ConfigError
from phi3v_core.training import (
    Machine,
    TrainConfig,
    build_training_arguments,
    deepspeed_config,
    zero2_buffer_bytes,
)

CPU = Machine(cuda=False)
A100 = Machine(cuda=True, capability=(8, 0), device_count=1, flash_attn=True)
V100 = Machine(cuda=True, capability=(7, 0), device_count=1, flash_attn=True)


def test_defaults_are_valid_on_cpu_and_follow_the_recipe(tmp_path: Path) -> None:
    cfg = TrainConfig(output_dir=str(tmp_path / "run"))
    assert cfg.problems(CPU) == []
    assert (cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps, cfg.global_batch) == (4e-5, 0.01, 50, 16)
    assert (cfg.lora_rank, cfg.lora_alpha_ratio, cfg.lora_dropout, cfg.lora_lm_head) == (64, 2.0, 0.0, True)
    assert (cfg.adam_beta2, cfg.adam_epsilon, cfg.max_grad_norm, cfg.gradient_checkpointing) == (0.95, 1e-7, 1.0, True)


@pytest.mark.parametrize(
    ("changes", "env", "fragment"),
    [
        ({"attn": "flash_attention_2", "precision": "fp32"}, A100, "flash_attention_2 needs bf16 or fp16"),
        ({"attn": "flash_attention_2"}, CPU, "flash_attention_2 needs a CUDA GPU"),
        (
            {"attn": "flash_attention_2", "precision": "fp16"},
            V100,
            "compute capability >= 8.0 (Ampere); this GPU is 7.0",
        ),
        (
            {"attn": "flash_attention_2"},
            Machine(cuda=True, capability=(9, 0), device_count=1),
            "pip install flash-attn",
        ),
        ({"precision": "bf16"}, V100, "precision bf16 needs compute capability >= 8.0"),
        ({"precision": "fp16"}, CPU, "precision fp16 needs a CUDA GPU"),
        ({"method": "qlora"}, Machine(bitsandbytes=False), "needs bitsandbytes"),
        ({"method": "full"}, Machine(world_size=2, deepspeed=False), "deepspeed is enabled but not installed"),
        ({"method": "lora", "deepspeed": True}, CPU, "deepspeed is for full/frozen_vision"),
        ({"method": "full", "freeze_vision": True}, CPU, "pass method='frozen_vision'"),
        ({"method": "no-such-method"}, CPU, "unknown method 'no-such-method'"),
        ({"precision": "fp8"}, CPU, "unknown precision 'fp8'"),
        ({"attn": "xformers"}, CPU, "unknown attn 'xformers'"),
        ({"global_batch": 6, "micro_batch": 4}, CPU, "global_batch 6 is not divisible by micro_batch 4"),
        ({"global_batch": 16, "micro_batch": 3}, Machine(world_size=2), "× 2 process(es) = 6"),
        ({}, Machine(cuda=True, capability=(9, 0), device_count=4), "torchrun --nproc_per_node=4"),
        ({"num_crops": 17}, CPU, "num_crops 17 is out of range"),
        ({"max_steps": 0}, CPU, "max_steps must be -1 (epochs) or >= 1"),
        ({"lora_dropout": 1.0}, CPU, "lora_dropout must be in [0, 1)"),
        ({"model": "no-such-preset"}, CPU, "neither a preset"),
        ({"resume": "/nonexistent/checkpoint-3"}, CPU, "does not exist or is incomplete"),
    ],
)
def test_each_impossible_combination_is_rejected_with_its_reason(
    changes: dict, env: Machine, fragment: str, tmp_path: Path
) -> None:
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), **changes)
    problems = cfg.problems(env)
    assert any(fragment in p for p in problems), problems


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    cfg = TrainConfig(
        output_dir=str(tmp_path),
        attn="flash_attention_2",
        precision="fp32",
        global_batch=5,
        micro_batch=2,
        lora_rank=0,
    )
    with pytest.raises(ConfigError) as err:
        cfg.validate(CPU)
    message = str(err.value)
    assert message.startswith("5 problems:")
    for fragment in ("needs bf16 or fp16", "needs a CUDA GPU", "pip install flash-attn", "global_batch 5", "lora_rank"):
        assert fragment in message


def test_a_weightless_checkpoint_folder_is_refused(ckpt35: Path, tmp_path: Path) -> None:
    problems = TrainConfig(model=str(ckpt35), output_dir=str(tmp_path)).problems(CPU)
    assert any("has no weight files" in p and "preset" in p for p in problems)


def test_a_folder_of_another_model_is_refused_by_the_api_as_by_the_command(tmp_path: Path) -> None:
    """The model folder is judged in one place (``TrainConfig.problems``): its model type and weight headers."""
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"\x00\x01")
    problems = TrainConfig(model=str(folder), output_dir=str(tmp_path / "run")).problems(CPU)
    assert f"model {folder}: config.json has model_type 'llama', not 'phi3_v'" in problems[0], problems


def test_checkpoints_of_an_earlier_run_need_resume(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-2").mkdir()
    assert any("resume='latest'" in p for p in TrainConfig(output_dir=str(tmp_path)).problems(CPU))
    assert TrainConfig(output_dir=str(tmp_path), resume="latest").problems(CPU) == []


def test_gradient_accumulation_makes_up_the_global_batch() -> None:
    cfg = TrainConfig(global_batch=64, micro_batch=2)
    assert cfg.gradient_accumulation_steps(world_size=8) == 4
    assert cfg.gradient_accumulation_steps(world_size=1) == 32


def test_deepspeed_is_automatic_for_distributed_full_finetuning_only() -> None:
    assert TrainConfig(method="full").uses_deepspeed(world_size=2)
    assert TrainConfig(method="frozen_vision").uses_deepspeed(world_size=4)
    assert not TrainConfig(method="full").uses_deepspeed(world_size=1)
    assert not TrainConfig(method="lora").uses_deepspeed(world_size=8)
    assert TrainConfig(method="full", deepspeed=True).uses_deepspeed(world_size=1)


def test_deepspeed_config_is_zero2_with_our_bucket_sizes() -> None:
    ds = deepspeed_config(TrainConfig(method="full", zero_reduce_bucket_size=123, zero_allgather_bucket_size=456))
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] and zero["reduce_scatter"] and zero["contiguous_gradients"]
    assert (zero["reduce_bucket_size"], zero["allgather_bucket_size"]) == (123, 456)
    assert ds["fp16"]["loss_scale"] == 0 and ds["fp16"]["initial_scale_power"] == 16  # dynamic, as the recipe
    assert ds["bf16"]["enabled"] == "auto" and ds["train_batch_size"] == "auto"
    assert "optimizer" not in ds and "scheduler" not in ds  # the Trainer's AdamW + linear schedule
    json.dumps(ds)  # serialisable as-is
    # The default buckets cost ~0.9 GB instead of the recipe's ~9 GB.
    assert zero2_buffer_bytes(TrainConfig()) == pytest.approx(0.9e9)
    assert zero2_buffer_bytes(TrainConfig(zero_reduce_bucket_size=int(5e8), zero_allgather_bucket_size=int(5e8))) == 9e9


def test_training_arguments_carry_the_recipe_settings(tmp_path: Path) -> None:
    cfg = TrainConfig(output_dir=str(tmp_path), global_batch=8, micro_batch=2, save_steps=5, precision="bf16")
    args = build_training_arguments(cfg, CPU)
    assert (args.gradient_accumulation_steps, args.per_device_train_batch_size) == (4, 2)
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.max_grad_norm) == (0.9, 0.95, 1e-7, 1.0)
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert args.bf16 and not args.fp16 and args.save_strategy == "steps" and args.save_steps == 5
    assert args.remove_unused_columns is False and args.ddp_find_unused_parameters is False
    assert args.deepspeed is None and args.logging_nan_inf_filter is False


def test_config_round_trips_through_json_and_rejects_unknown_fields(tmp_path: Path) -> None:
    cfg = TrainConfig(method="qlora", lora_rank=8, extra={"data": "x"})
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_json(path) == cfg
    path.write_text(json.dumps({"method": "lora", "lora_rnak": 8, "batch": 2}))
    with pytest.raises(ConfigError, match="unknown TrainConfig field.*batch, lora_rnak"):
        TrainConfig.from_json(path)
    path.write_text('{"method": "lora",\n "x": }')
    with pytest.raises(ConfigError, match=r"cfg.json:2: invalid JSON"):
        TrainConfig.from_json(path)


def test_old_name_per_device_batch_still_loads(tmp_path: Path) -> None:
    """``micro_batch`` was ``per_device_batch``: old run.json files keep loading; the constructor takes the new name
    only."""
    with pytest.raises(TypeError, match="per_device_batch"):
        TrainConfig(per_device_batch=4, global_batch=8)  # type: ignore[call-arg]
    cfg = TrainConfig(micro_batch=4, global_batch=8)
    assert "per_device_batch" not in cfg.to_dict() and cfg.to_dict()["micro_batch"] == 4
    assert dataclasses.replace(cfg, micro_batch=2).micro_batch == 2
    old_file = tmp_path / "run.json"
    old_file.write_text(json.dumps({"per_device_batch": 2, "global_batch": 4}))
    assert TrainConfig.from_json(old_file).micro_batch == 2
    with pytest.raises(ConfigError, match=r"both 'per_device_batch' \(deprecated\) and 'micro_batch'"):
        TrainConfig.from_dict({"per_device_batch": 1, "micro_batch": 1}, where="run.json")


def test_the_trainer_settings_are_judged_by_the_config_itself(tmp_path: Path) -> None:
    """A user's DeepSpeed config is read by ``problems()`` (the API refuses it as ``phi3v-finetune --deepspeed``)."""
    bad = tmp_path / "ds.json"
    bad.write_text("[1]")
    cfg = TrainConfig(method="full", deepspeed=True, deepspeed_config_file=str(bad), offload="optimizer",
                      output_dir=str(tmp_path / "run"))
    problems = cfg.problems(CPU)
    assert f"deepspeed_config_file {bad}: a DeepSpeed config is a JSON object, not list" in problems
    assert f"deepspeed_config_file {bad} replaces the ZeRO-2 config that offload optimizer builds; drop one of them" in problems
    missing = TrainConfig(deepspeed_config_file=str(tmp_path / "none.json"), output_dir=str(tmp_path / "run"))
    assert any("none.json: cannot read it" in p for p in missing.problems(CPU))


def test_the_config_and_the_package_names_load_without_torch() -> None:
    # A command validates its settings before the training stack (seconds to import) is loaded: importing the config,
    # and the package's light names, must not import torch or transformers (judged by sys.modules, never by time).
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import phi3v_core.training.config\n"
        "from phi3v_core.training import Machine, TrainConfig, deepspeed_config\n"
        "TrainConfig(num_crops=0).problems(Machine.unprobed())\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'deepspeed') if m in sys.modules),"
        " callable(deepspeed_config))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "[] True\n", done.stdout + done.stderr


def test_the_package_still_gives_every_public_name() -> None:
    import phi3v_core.training as training
    from phi3v_core.training.api import train
    from phi3v_core.training.config import DTYPES

    assert all(getattr(training, name) is not None for name in training.__all__)
    assert training.train is train and callable(training.deepspeed_config)  # the function, not its submodule
    assert TrainConfig(precision="fp16").compute_dtype is DTYPES["fp16"] and str(DTYPES["bf16"]) == "torch.bfloat16"
    with pytest.raises(AttributeError):
        training.no_such_name  # noqa: B018


def test_the_unprobed_machine_judges_everything_but_the_gpu(tmp_path: Path) -> None:
    # Machine.unprobed(): what is known before torch is imported. The GPU checks wait for the probed machine; every
    # other one (ranges, names, the flash/fp32 pairing) answers already, in the same words.
    cfg = TrainConfig(
        precision="fp16", attn="flash_attention_2", optim="paged_adamw_8bit", kernels="liger", num_crops=0,
        micro_batch=0, output_dir=str(tmp_path / "run"),
    )
    unprobed = Machine.unprobed()
    assert not unprobed.probed and Machine().probed
    first = cfg.problems(dataclasses.replace(unprobed, bitsandbytes=True, flash_attn=True))
    on_cpu = cfg.problems(Machine(cuda=False, flash_attn=True))
    gpu_only = [p for p in on_cpu if "CUDA" in p or "GPU" in p]
    assert len(gpu_only) == 4, on_cpu  # fp16, flash attention, paged optimizer, liger: all need CUDA
    assert sorted(first) == sorted(p for p in on_cpu if p not in gpu_only)
    assert any("num_crops 0 is out of range" in p for p in first) and any("micro_batch" in p for p in first)
    fp32 = TrainConfig(precision="fp32", attn="flash_attention_2", output_dir=str(tmp_path / "run"))
    assert any("needs bf16 or fp16" in p for p in fp32.problems(unprobed))


def test_a_cpu_build_of_torch_is_known_without_importing_it(tmp_path: Path) -> None:
    # Only a file that states both cuda and hip as None counts: a CUDA or ROCm build, or a file this does not
    # recognise, leaves CUDA to Machine.detect.
    from phi3v_core.software import torch_is_cpu_build

    def build(text: str) -> bool:
        (tmp_path / "version.py").write_text(text)
        return torch_is_cpu_build(tmp_path)

    assert build("cuda: Optional[str] = None\nhip: Optional[str] = None\n")
    assert build("cuda = None\nhip = None\n")
    assert not build("cuda: Optional[str] = '12.8'\nhip: Optional[str] = None\n")
    assert not build("cuda: Optional[str] = None\nhip: Optional[str] = '6.3.42131'\n")
    assert not build("cuda: Optional[str] = None\n")  # hip unstated: unsure
    assert not build("cuda = get_cuda()\nhip = None\n")
    assert not torch_is_cpu_build(tmp_path / "missing")
    if torch_is_cpu_build():  # this machine: the torch-free reading is what detect() finds
        assert Machine.without_torch() == Machine.detect()
    else:
        assert not Machine.without_torch().probed
