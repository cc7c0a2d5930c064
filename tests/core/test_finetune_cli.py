"""phi3v-finetune: recipe flag semantics, presets, bad-flag messages, and end-to-end runs on the synthetic twins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

from phi3v_core.cli.finetune import RECIPE_PRESETS, build_config, build_parser, main
from phi3v_core.errors import ConfigError
from phi3v_core.training import Machine
from tests.safety_helpers import HANG_GUARD_S

CPU = Machine(cuda=False, world_size=1)
A100 = Machine(cuda=True, capability=(8, 0), device_count=1, world_size=1, flash_attn=True)


def resolve(*flags: str, env: Machine = CPU) -> Any:
    return build_config(build_parser().parse_args(list(flags)), env)


pytestmark = pytest.mark.usefixtures("finetune_env")


# -- recipe semantics --------------------------------------------------------------------------------------------


def test_recipe_defaults_and_our_cpu_fallbacks():
    cfg = resolve("--synthetic", "8")
    train = cfg.train
    assert (cfg.task, train.model, train.method) == ("docvqa", "tiny", "full")  # no --use_lora: full fine-tuning
    assert (train.global_batch, train.micro_batch, train.num_train_epochs) == (16, 1, 1.0)
    assert (train.learning_rate, train.weight_decay, train.warmup_steps) == (4e-5, 0.01, 50)
    assert (train.lora_rank, train.lora_alpha_ratio, train.lora_dropout) == (64, 2.0, 0.0)
    assert train.output_dir == "./output/"
    assert train.precision == "fp32" and cfg.sources["precision"] == "auto"  # fp16 AMP needs a GPU
    assert train.attn == "sdpa" and train.dataloader_num_workers == 0
    assert cfg.synthetic_eval == 2  # min(N // 4, 16)


def test_without_bf16_the_recipe_trains_fp16_on_a_gpu():
    cfg = resolve("--synthetic", "8", env=A100)
    assert cfg.train.precision == "fp16" and cfg.sources["precision"] == "recipe"
    assert cfg.train.dataloader_num_workers == 4


@pytest.mark.parametrize(
    ("flags", "method", "freeze_vision"),
    [
        (["--use_lora"], "lora", False),
        (["--use_qlora"], "qlora", False),  # --use_qlora implies --use_lora
        (["--use_lora", "--use_qlora"], "qlora", False),
        (["--freeze_vision_model"], "frozen_vision", False),  # full fine-tuning with the image path frozen
        (["--use_lora", "--freeze_vision_model"], "lora", True),  # LoRA on the language model only
        (["--method", "qlora", "--use_lora"], "qlora", False),  # qlora is a LoRA method: no conflict
    ],
)
def test_method_flags(flags, method, freeze_vision):
    train = resolve("--synthetic", "8", *flags).train
    assert (train.method, train.freeze_vision) == (method, freeze_vision)


def test_flash_attention_implies_bf16_unless_precision_is_explicit():
    implied = resolve("--synthetic", "8", "--use_flash_attention", env=A100)
    assert (implied.train.attn, implied.train.precision) == ("flash_attention_2", "bf16")
    explicit = resolve("--synthetic", "8", "--use_flash_attention", "--precision", "fp16", env=A100)
    assert (explicit.train.attn, explicit.train.precision) == ("flash_attention_2", "fp16")
    assert resolve("--synthetic", "8", "--bf16").train.precision == "bf16"


def test_synthetic_eval_size_and_eval_limit():
    assert resolve("--synthetic", "2").synthetic_eval == 1
    assert resolve("--synthetic", "32").synthetic_eval == 8
    assert resolve("--synthetic", "1000").synthetic_eval == 16
    assert resolve("--synthetic", "32", "--eval_limit", "3").synthetic_eval == 3


# -- presets --------------------------------------------------------------------------------------------------------


def test_preset_sets_the_recipe_recommendation_and_flags_override_it():
    cfg = resolve("--preset", "docvqa-lora", "--synthetic", "8")
    train = cfg.train
    assert (cfg.task, train.method, train.learning_rate, train.global_batch, train.num_train_epochs) == (
        "docvqa",
        "lora",
        2e-4,
        64,
        2.0,
    )
    assert (train.lora_rank, round(train.lora_rank * train.lora_alpha_ratio), train.num_crops) == (32, 16, 16)
    assert cfg.sources["learning_rate"] == "preset"

    over = resolve("--preset", "docvqa-lora", "--synthetic", "8", "--learning_rate", "1e-4", "--use_qlora").train
    assert (over.learning_rate, over.method, over.lora_rank) == (1e-4, "qlora", 32)


def test_preset_table_matches_the_recipe():
    memes = RECIPE_PRESETS["hateful_memes-lora"].values
    assert (memes["lora_rank"], round(memes["lora_rank"] * memes["lora_alpha_ratio"])) == (128, 256)
    assert RECIPE_PRESETS["docvqa-full"].values["learning_rate"] == 5e-6
    assert (RECIPE_PRESETS["nlvr2-full"].values["learning_rate"], RECIPE_PRESETS["nlvr2-full"].values["num_train_epochs"]) == (
        1e-5,
        3.0,
    )
    assert all(p.values["batch_size"] == 64 and p.source.startswith("Phi-3CookBook FineTuning_Vision.md") for p in RECIPE_PRESETS.values())
    assert all(name == f"{p.task}-{p.method}" for name, p in RECIPE_PRESETS.items())


# -- bad flags: one line, exit 1, nothing written ------------------------------------------------------------------

BAD_FLAGS = [
    (
        ["--task", "docvq", "--synthetic", "4"],
        "error: unknown task 'docvq' (did you mean 'docvqa'?); choose one of docvqa, nlvr2, hateful_memes, ucf101, jsonl",
    ),
    (
        ["--synthetic", "4", "--num_crops", "17"],
        "error: --num_crops 17 is out of range: the recipe asserts num_crops <= 16; pass 1..16 "
        "(16 for single images, 4 for video frames)",
    ),
    (
        ["--synthetic", "4", "--batch_size", "10", "--batch_size_per_gpu", "4"],
        "error: --batch_size 10 is not divisible by --batch_size_per_gpu 4 × 1 process(es) = 4; pass a multiple of 4",
    ),
    (
        ["--synthetic", "4", "--use_lora", "--method", "full"],
        "error: --use_lora conflicts with --method full; drop one of them",
    ),
    (
        ["--synthetic", "4", "--model_name_or_path", "microsoft/Phi-3.5-vision-instruct"],
        "error: --model_name_or_path microsoft/Phi-3.5-vision-instruct is a Hugging Face Hub id and phi3v-finetune "
        "does not download models; download it first (huggingface-cli download microsoft/Phi-3.5-vision-instruct "
        "--local-dir DIR) and pass that local folder, or use a preset (tiny, phi-3.5-vision, phi-3-vision)",
    ),
    (
        ["--task", "ucf101"],
        "error: --task ucf101 needs --data_dir (a folder with *_train.jsonl, *_val.jsonl and images/, "
        "e.g. from phi3v-convert ucf101) or --synthetic N",
    ),
    (
        ["--task", "jsonl"],
        "error: --task jsonl needs --data_dir (a folder with *_train.jsonl, *_val.jsonl and images/)",
    ),
    (
        ["--synthetic", "4", "--bf16", "--precision", "fp32"],
        "error: --bf16 conflicts with --precision fp32; drop one of them",
    ),
    (
        ["--synthetic", "4", "--preset", "docvqa-lora", "--task", "nlvr2"],
        "error: --preset docvqa-lora is for --task docvqa, not nlvr2; drop --task or pick a preset of nlvr2 "
        "(nlvr2-full, nlvr2-frozen_vision)",
    ),
    (
        ["--synthetic", "4", "--wd", "-1"],
        "error: argument --wd: must be a finite number in [0, 10], got -1 (see phi3v-finetune --help)",
    ),
    (
        ["--task", "ucf101", "--num_crops", "0", "--use_qlora", "--method", "lora"],
        # flags that exclude each other first, then the values
        "error: 3 problems: --use_qlora conflicts with --method lora; drop one of them; --task ucf101 needs --data_dir "
        "(a folder with *_train.jsonl, *_val.jsonl and images/, e.g. from phi3v-convert ucf101) or --synthetic N; "
        "--num_crops 0 is out of range: the recipe asserts num_crops <= 16; pass 1..16 "
        "(16 for single images, 4 for video frames)",
    ),
    (
        ["--synthetic", "4", "--batch_size", "x"],
        "error: argument --batch_size: expected an integer, got 'x' (see phi3v-finetune --help)",
    ),
    (["--synthetic", "4", "--use_lor"], "error: unrecognized arguments: --use_lor (see phi3v-finetune --help)"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS, ids=[" ".join(f[0]) for f in BAD_FLAGS])
def test_bad_flags_print_one_line_and_exit_1_without_writing(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main([*flags, "--output_dir", str(out)])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == message
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_fp16_on_cpu_is_refused_with_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--synthetic", "4", "--precision", "fp16", "--output_dir", str(tmp_path / "run")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == (
        "error: --precision fp16 needs a CUDA GPU (fp16 mixed precision with loss scaling does not run on CPU); "
        "use --precision fp32 or --precision bf16"
    )
    assert not (tmp_path / "run").exists()


def test_checkpoint_folder_without_weights_is_refused(ckpt35, tmp_path):
    with pytest.raises(ConfigError, match=r"^--model_name_or_path .*has no weight files"):
        resolve("--synthetic", "4", "--model_name_or_path", str(ckpt35), "--output_dir", str(tmp_path))


# -- end to end -----------------------------------------------------------------------------------------------------

# Lean settings: one image crop, batch 1, 2 steps, 1 eval question, 2 new tokens.
FAST = ["--max_steps", "2", "--batch_size", "1", "--num_crops", "1", "--eval_limit", "1", "--max_new_tokens", "2"]


def run_json(capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, Any]:
    assert main([*flags, "--json", "--no-tqdm"]) == 0
    return json.loads(capsys.readouterr().out)


def test_lora_run_evaluates_before_and_after_and_prints_json(tmp_path, capsys):
    out = tmp_path / "run"
    summary = run_json(capsys, "--task", "docvqa", "--synthetic", "4", "--use_lora", *FAST, "--output_dir", str(out))
    assert (summary["task"], summary["method"], summary["metric"]) == ("docvqa", "lora", "anls")
    assert summary["train"]["global_step"] == 2
    assert summary["settings"]["method"] == {"value": "lora", "from": "flag"}
    for name in ("eval_before", "eval_after"):
        written = json.loads((out / f"{name}.json").read_text())
        assert {"answers_unique", "generated_texts_unique", "anls", "task", "num_samples"} <= set(written)
        assert written["num_samples"] == summary[name]["num_samples"] == 1
        assert 0.0 <= written["anls"] <= 1.0
    assert (out / "adapter_config.json").is_file() and (out / "train_config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("task", ["docvqa", "nlvr2", "hateful_memes", "ucf101"])
def test_every_task_twin_trains_and_evaluates(task, tmp_path, capsys):
    out = tmp_path / task
    summary = run_json(capsys, "--task", task, "--synthetic", "2", "--use_lora", *FAST, "--output_dir", str(out))
    assert summary["task"] == task and summary["train"]["global_step"] == 2
    metric = "anls" if task == "docvqa" else "accuracy"
    assert summary["metric"] == metric
    after = json.loads((out / "eval_after.json").read_text())
    assert after["task"] == task and metric in after and len(after["generated_texts_unique"]) == 1
    assert all(torch.isfinite(torch.tensor(loss)) for loss in summary["train"]["losses"].values())


@pytest.mark.slow  # a fresh interpreter imports torch/transformers/peft: ~10 s on 2 cores
def test_console_script_prints_exactly_one_stderr_line(tmp_path):
    # A fresh process: library import-time logging must not precede the error line.
    proc = subprocess.run(
        [sys.executable, "-m", "phi3v_core.cli.finetune", "--task", "docvq", "--output_dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env={k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "PHI3V_DEBUG")},
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [BAD_FLAGS[0][1]]
    assert proc.stdout == "" and not (tmp_path / "run").exists()


def test_memory_layout_flags_reach_the_train_config():
    cfg = resolve("--synthetic", "4", "--method", "full", "--gradient_checkpointing", "off", "--optim", "adamw_8bit").train
    assert (cfg.gradient_checkpointing, cfg.optim, cfg.offload) == (False, "adamw_8bit", "none")
    cfg = resolve("--synthetic", "4", "--method", "full", "--offload", "optimizer").train
    assert (cfg.gradient_checkpointing, cfg.optim, cfg.offload) == (True, "adamw", "optimizer")


def test_packing_flags_reach_the_train_config():
    assert not resolve("--synthetic", "4").train.packing
    cfg = resolve("--synthetic", "4", "--packing").train
    assert (cfg.packing, cfg.pack_tokens) == (True, None)
    cfg = resolve("--synthetic", "4", "--pack-tokens", "4096").train  # the dashed alias; a budget implies packing
    assert (cfg.packing, cfg.pack_tokens) == (True, 4096)
