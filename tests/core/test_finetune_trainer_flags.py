"""phi3v-finetune takes the TrainingArguments names an HF user types first and passes them to the Trainer."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest

from phi3v_core.cli.finetune import build_config, build_parser, main
from phi3v_core.errors import ConfigError
from phi3v_core.training import Machine
from phi3v_core.training.trainer import build_training_arguments

CPU = Machine(cuda=False, world_size=1)
TWO = Machine(cuda=False, world_size=2)
FAST = ["--max_steps", "2", "--num_crops", "1", "--eval_limit", "1", "--max_new_tokens", "2", "--no-eval"]

pytestmark = pytest.mark.usefixtures("finetune_env")


def resolve(*flags: str, env: Machine = CPU) -> Any:
    return build_config(build_parser().parse_args(list(flags)), env)


def test_trainer_names_reach_the_training_arguments(tmp_path):
    flags = ["--synthetic", "4", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3",
             "--lr_scheduler_type", "cosine", "--logging_steps", "5", "--output_dir", str(tmp_path / "run")]
    two = resolve(*flags, env=TWO)
    assert (two.train.micro_batch, two.train.global_batch) == (2, 2 * 3 * 2)  # per device x accumulation x processes
    cfg = resolve(*flags)
    args = build_training_arguments(cfg.train, CPU)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 3)
    assert (args.lr_scheduler_type.value, args.logging_steps, args.report_to) == ("cosine", 5, [])


def test_accumulation_and_a_disagreeing_batch_size_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"--batch_size 16 disagrees with --per_device_train_batch_size 1 × "
                                          r"--gradient_accumulation_steps 4 × 1 process\(es\) = 4"):
        resolve("--synthetic", "4", "--batch_size", "16", "--gradient_accumulation_steps", "4",
                "--output_dir", str(tmp_path / "run"))


def test_resume_from_checkpoint_is_resume():
    assert build_parser().parse_args(["--resume_from_checkpoint", "ckpt"]).resume == "ckpt"
    assert build_parser().parse_args(["--resume_from_checkpoint"]).resume == "latest"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_the_package_is_refused_clearly(tmp_path):
    with pytest.raises(ConfigError, match=r"--report_to wandb needs the wandb package \(pip install wandb\)"):
        resolve("--synthetic", "4", "--report_to", "wandb", "--output_dir", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_deepspeed_config_is_checked_before_anything_runs(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError) as info:
        resolve("--synthetic", "4", "--deepspeed", str(bad), "--output_dir", str(tmp_path / "run"))
    assert f"--deepspeed {bad}: not JSON" in str(info.value)
    with pytest.raises(ConfigError, match="cannot read it"):
        resolve("--synthetic", "4", "--deepspeed", str(tmp_path / "missing.json"), "--output_dir", str(tmp_path / "r"))
    # `{}` passed validation and failed in accelerate after the run folder was written
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    with pytest.raises(ConfigError, match='no "zero_optimization" section'):
        resolve("--synthetic", "4", "--deepspeed", str(empty), "--output_dir", str(tmp_path / "e"))
    assert not (tmp_path / "e").exists()


def test_a_deepspeed_config_file_is_what_the_trainer_gets(tmp_path):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    cfg = resolve("--synthetic", "4", "--deepspeed", str(config), "--output_dir", str(tmp_path / "run"))
    assert cfg.train.deepspeed and cfg.train.deepspeed_config_file == str(config)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason='needs pip install -e ".[tensorboard]"')
def test_report_to_tensorboard_writes_event_files(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--synthetic", "4", "--use_lora", "--batch_size", "1", *FAST, "--report_to", "tensorboard",
            "--logging_steps", "1", "--output_dir", str(out), "--json", "--no-tqdm"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"]["global_step"] == 2
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert events[0].stat().st_size > 0
