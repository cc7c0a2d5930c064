"""phi3v-finetune: the CookBook's fine-tuning scripts as one command (microsoft/Phi-3CookBook, code/03.Finetuning/vision_finetuning/).

It takes the recipe's flags, so a CookBook command runs by changing the script name, plus our own (``--task``,
``--method``, ``--preset``, ``--synthetic``, ...). The flow is the recipe's: evaluate the fresh model
(``eval_before.json``), fine-tune, evaluate again (``eval_after.json``), print both.

This module parses flags and prints; :mod:`phi3v_core.cli.finetune_config` resolves and validates them (presets,
precedence, ranges, folders) and :mod:`phi3v_core.training.run` runs (distributed set-up, output-folder lock, eval
before/after). Bad input ends in one ``error: ...`` line and exit code 1 (:mod:`phi3v_core.cli.common`). Under
``torchrun`` every rank trains and evaluates its shard; rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from phi3v_core.cli.common import (
    bounded_float,
    bounded_int,
    command_parser,
    handle_errors,
    keep_working_without_stdout,
    strict_json,
)
from phi3v_core.cli.common import console as make_console
from phi3v_core.cli.finetune_config import (
    MODEL_ENV,
    OUR_DEFAULTS,
    RECIPE_DEFAULTS,
    RECIPE_PRESETS,
    TASK_NAMES,
    build_config,
)
from phi3v_core.cli.finetune_hf import add_trainer_flags
from phi3v_core.cli.finetune_levers import add_lever_flags
from phi3v_core.cli.vocabulary import DEFAULT_SEED, add_shared, plural
from phi3v_core.constants import (
    ATTN_NAMES,
    MODEL_PRESET_NAMES,
    OFFLOAD_NAMES,
    OPTIM_NAMES,
    PRECISION_NAMES,
)
from phi3v_core.errors import raise_all
from phi3v_core.methods import METHOD_NAMES, get_method
from phi3v_core.software import quiet_known_notices
from phi3v_core.towers import CHECKPOINTING_CHOICES

__all__ = [
    "OUR_DEFAULTS",
    "RECIPE_DEFAULTS",
    "RECIPE_PRESETS",
    "build_config",
    "build_parser",
    "main",
]

_EPILOG = """examples:
  # the acceptance smoke run: DocVQA twin, LoRA, 5 steps, tiny random model, CPU
  phi3v-finetune --task docvqa --synthetic 32 --use_lora --max_steps 5

  # a CookBook command with only the script name changed (checkpoint downloaded to a local folder first)
  torchrun --nproc_per_node=2 -m phi3v_core.cli.finetune --model_name_or_path ./Phi-3.5-vision-instruct \\
      --data_dir ./docvqa --use_lora --bf16 --use_flash_attention --batch_size 64 --output_dir ./out

  # the recipe's recommended hyper-parameters (CookBook fine-tuning guide), overriding one of them
  phi3v-finetune --preset hateful_memes-lora --data_dir ./memes --learning_rate 1e-4 --bf16
  phi3v-finetune --list-presets

  # custom jsonl data, our flags
  phi3v-finetune --task jsonl --data_dir ./my_data --method frozen_vision --precision bf16 --json

notes:
  --model_name_or_path defaults to $PHI3V_MODEL, else "tiny" (a randomly initialised small model: it checks the
  pipeline, its metrics say nothing about Phi-3.5-vision). Hub ids are not downloaded: pass a local folder.
  Without --bf16 the recipe trains in fp16 on GPUs; on a CPU the default becomes fp32 (fp16 AMP needs CUDA).
  The recipe's attention is eager without --use_flash_attention; ours is sdpa (same math, faster): --attn eager.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: the recipe's flags (same names and meaning) and ours."""
    parser = command_parser(
        "phi3v-finetune", "Fine-tune Phi-3(.5)-vision like the Phi-3 CookBook recipe: eval before, train, eval after.",
        _EPILOG,
    )
    _add_recipe_flags(parser.add_argument_group("recipe flags (as in the CookBook scripts)"))
    ours = parser.add_argument_group("our flags")
    _add_task_flags(ours)
    _add_run_flags(ours)
    _add_memory_flags(parser)
    add_trainer_flags(parser.add_argument_group("Hugging Face Trainer flags (TrainingArguments names)"))
    add_lever_flags(parser)
    return parser


def _add_recipe_flags(recipe: argparse._ArgumentGroup) -> None:
    """The CookBook fine-tuning scripts' flags, with their names and meaning."""
    add_shared(
        recipe,
        "model",
        dest="model_name_or_path",
        default=None,
        metavar="PATH",
        help=f"local checkpoint folder or a preset ({', '.join(MODEL_PRESET_NAMES)}); default ${MODEL_ENV} or tiny",
    )
    recipe.add_argument("--full_train", action="store_true", help="docvqa: train on the Cauldron DocVQA train set")
    add_shared(recipe, "data_dir", default=None, metavar="DIR", help="jsonl folder (*_train.jsonl, *_val.jsonl, images/)")
    recipe.add_argument("--use_flash_attention", action="store_true", help="attention flash_attention_2 (implies bf16)")
    recipe.add_argument("--bf16", action="store_true", help="bf16 mixed precision (recipe default without it: fp16)")
    recipe.add_argument("--use_lora", action="store_true", help="LoRA (method lora)")
    recipe.add_argument("--use_qlora", action="store_true", help="QLoRA, 4-bit base (method qlora; implies --use_lora)")
    add_shared(recipe, "output_dir", default=None, help="run folder (default: ./output/); one run per folder")
    add_shared(
        recipe,
        "overwrite",
        dest="overwrite_output_dir",
        action="store_true",
        help="replace the run in --output_dir (the old run is deleted only once the new one finished)",
    )
    add_shared(
        recipe, "global_batch", dest="batch_size", type=bounded_int(1, 65536), default=None,
        help="global batch per optimizer step (default: 16)",
    )
    add_shared(
        recipe, "micro_batch", dest="batch_size_per_gpu", type=bounded_int(1, 4096), default=None,
        help="micro-batch per process (default: 1)",
    )
    add_shared(
        recipe,
        "num_crops", type=bounded_int(-(10**6), 10**6), default=None, help="HD crops per image, 1..16 (default: task's, 16; ucf101 4)"
    )
    recipe.add_argument("--num_train_epochs", type=bounded_float(0, 10_000, low_open=True), default=None, help="epochs (default: 1)")
    add_shared(recipe, "learning_rate", type=bounded_float(0, 1, low_open=True), default=None, help="peak AdamW learning rate (default: 4e-5)")
    recipe.add_argument("--wd", type=bounded_float(0, 10), default=None, help="weight decay (default: 0.01)")
    recipe.add_argument(
        "--no-tqdm", "--no_tqdm", dest="tqdm", action="store_false", help="no progress bars (training and eval)"
    )
    recipe.add_argument("--lora_rank", type=bounded_int(1, 65536), default=None, help="LoRA rank (default: 64)")
    recipe.add_argument(
        "--lora_alpha_ratio", type=bounded_float(0, 1024, low_open=True), default=None, help="LoRA alpha = round(rank × ratio) (default: 2)"
    )
    recipe.add_argument("--lora_dropout", type=bounded_float(0, 0.99), default=None, help="LoRA dropout (default: 0)")
    recipe.add_argument(
        "--freeze_vision_model",
        action="store_true",
        help="full: method frozen_vision; LoRA/QLoRA: no adapters on CLIP and the projector",
    )


def _add_task_flags(ours: argparse._ArgumentGroup) -> None:
    """Our flags that choose what is trained: task, method, attention, precision, presets, data size."""
    add_shared(ours, "task", default=None, metavar="{" + ",".join(TASK_NAMES) + "}", help="task (default: docvqa)")
    add_shared(ours, "method", default=None, metavar="{" + ",".join(METHOD_NAMES) + "}", help="fine-tuning method")
    add_shared(
        ours, "attn", default=None, metavar="{" + ",".join(ATTN_NAMES) + "}", help="attention (default: sdpa)"
    )
    add_shared(
        ours,
        "precision",
        default=None,
        metavar="{" + ",".join(PRECISION_NAMES) + "}",
        help="mixed precision (default: bf16 with --bf16/--use_flash_attention, else fp16 on GPU, fp32 on CPU)",
    )
    ours.add_argument("--preset", default=None, metavar="NAME", help="recommended hyper-parameters (--list-presets)")
    ours.add_argument("--list-presets", "--list_presets", action="store_true", help="show the presets and exit")
    ours.add_argument(
        "--synthetic", type=bounded_int(1, 100_000), default=None, metavar="N", help="train on N records of the task's offline twin"
    )
    ours.add_argument(
        "--eval_limit",
        type=bounded_int(1, 10**7),
        default=None,
        metavar="N",
        help="evaluate at most N questions (default: all; with --synthetic N: min(N//4, 16), at least 1)",
    )


def _add_run_flags(ours: argparse._ArgumentGroup) -> None:
    """Our flags for the schedule, checkpoints, evaluation and output."""
    add_shared(ours, "max_steps", type=bounded_int(1, 10**8, also=(-1,)), default=None, help="optimizer steps; -1 = epochs (default)")
    ours.add_argument("--warmup_steps", type=bounded_int(0, 10**8), default=None, help="linear warmup steps (default: 50, as the recipe)")
    ours.add_argument(
        "--save_steps", type=bounded_int(0, 10**8), default=None, help="resumable checkpoint every N steps (0 = final only)"
    )
    ours.add_argument(
        "--resume_from_checkpoint",
        "--resume",
        dest="resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CKPT",
        help="continue from the newest checkpoint in --output_dir, or from CKPT",
    )
    add_shared(
        ours, "seed", type=bounded_int(0, 2**32 - 1), default=None,
        help=f"seed for init, data order and the twin (default: {DEFAULT_SEED})",
    )
    add_shared(ours, "skip_bad", action="store_true", help="skip records with unreadable images")
    ours.add_argument(
        "--no-eval", "--no_eval", dest="evaluate", action="store_false", help="skip eval before and after"
    )
    ours.add_argument("--max_new_tokens", type=bounded_int(1, 131072), default=None, help="generation budget in eval (default: 64)")
    ours.add_argument("--eval_batch_size", type=bounded_int(1, 4096), default=None, help="prompts per generate call (default: 8)")
    ours.add_argument("--dataloader_num_workers", "--num_workers", dest="num_workers", type=bounded_int(0, 256), default=None, help="DataLoader workers (default: 4 on GPU, 0 on CPU)")
    add_shared(
        ours,
        "max_length",
        type=bounded_int(16, 10**7),
        default=None,
        metavar="TOKENS",
        help="longest training sequence (default: the model context); longer records are an error, never truncated",
    )
    add_shared(ours, "json", action="store_true", help="print one JSON object on stdout (logs go to stderr)")
    add_shared(ours, "force", action="store_true",
                      help="train even where phi3v-plan's memory model predicts the run does not fit this machine")


def _add_memory_flags(parser: argparse.ArgumentParser) -> None:
    """Checkpointing, optimizer and offload: what phi3v-plan chooses by memory (its command carries them)."""
    group = parser.add_argument_group("memory layout (phi3v-plan chooses these)")
    add_shared(
        group,
        "gradient_checkpointing",
        choices=CHECKPOINTING_CHOICES,
        default="on",
        help="recompute activations in backward: both towers (on, the recipe's default), llm (decoder only), "
        "vision (CLIP only) or off (faster where memory allows)",
    )
    add_shared(
        group,
        "optim",
        choices=OPTIM_NAMES,
        default="adamw",
        help="adamw (default); adamw_8bit: bitsandbytes 8-bit AdamW, bf16 weights for full/frozen_vision; "
        "adamw_8bit_fp32_master: the same on fp32 weights (keeps small updates)",
    )
    group.add_argument(
        "--allow_low_retention",
        action="store_true",
        help="train even where a step changes under 50%% of the weights (bf16 weights at a small learning rate)",
    )
    add_shared(
        group,
        "offload",
        choices=OFFLOAD_NAMES,
        default="none",
        help="optimizer: DeepSpeed ZeRO-2 keeps fp32 master weights and Adam states in host RAM (CPU Adam)",
    )
    group.add_argument(
        "--packing",
        action="store_true",
        help="pack each micro-batch's samples, with their images, into rows (same losses and gradients, less padding)",
    )
    group.add_argument(
        "--pack_tokens",
        "--pack-tokens",
        type=bounded_int(1, 10**7),
        default=None,
        metavar="N",
        help="tokens per packed row (implies --packing; default: the micro-batch's longest sample)",
    )


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool) -> Iterator[None]:
    # --json: the Trainer prints its logs on stdout; keep stdout for the one JSON object.
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _print_plan(cfg: Any, task: Any) -> None:
    console = make_console()
    train = cfg.train
    lora = (
        f", LoRA r={train.lora_rank} α={round(train.lora_rank * train.lora_alpha_ratio)}"
        if get_method(train.method).uses_lora
        else ""
    )
    console.print(
        f"[bold]phi3v-finetune[/] task {task.name} ({task.origin}: {len(task.train)} train, "
        f"{len(task.eval_items())} eval) · model {train.model} · {train.method}{lora} · {train.precision} · "
        f"attn {train.attn} · num_crops {task.num_crops} · batch {train.global_batch} "
        f"({train.micro_batch}/process) · lr {train.learning_rate:g} · "
        + (plural(train.max_steps, "step") if train.max_steps > 0 else plural(float(train.num_train_epochs), "epoch"))
        + (f" · preset {cfg.preset}" if cfg.preset else "")
    )
    for note in cfg.notes:
        console.print(f"note: {note}", style="yellow")
    if task.skipped:
        console.print(f"note: skipped unreadable records: {task.skipped}", style="yellow")


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    label = "ANLS" if summary["metric"] == "anls" else "accuracy"
    before, after = summary["eval_before"], summary["eval_after"]
    table = Table(title=f"{summary['task']} · {summary['method']} · {plural(summary['train']['global_step'], 'step')}")
    if before and after:
        for column in ("", "before", "after", "change"):
            table.add_column(column, justify="right" if column else "left")
        b, a = 100 * before["score"], 100 * after["score"]
        table.add_row(f"{label} (×100)", f"{b:.2f}", f"{a:.2f}", f"{a - b:+.2f}")
        table.add_row("questions", str(before["num_samples"]), str(after["num_samples"]), "")
        table.add_row("train loss", "", f"{summary['train']['train_loss']:.4f}", "")
    else:
        table.add_column("")
        table.add_column("value", justify="right")
        table.add_row("train loss", f"{summary['train']['train_loss']:.4f}")
    console = make_console()
    console.print(table)
    if before and after:
        console.print(f"wrote {before['file']} and {after['file']}")
    saved = summary["train"].get("saved_to")
    if saved:
        console.print(f"model saved to {saved}")
    if summary.get("advice"):
        console.print(f"advice: {summary['advice']}", highlight=False)


@handle_errors
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``phi3v-finetune``.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        Exit code 0 (errors exit 1 through :func:`~phi3v_core.cli.common.handle_errors`).
    """
    # printed before every message of this command (one-line errors included), they say nothing about the run
    quiet_known_notices()
    keep_working_without_stdout()  # the product is the run folder: `| head -1` must not lose it
    args, bad_values = build_parser().parse_collecting(argv)  # reported with every other problem, at once
    if args.list_presets:
        raise_all(bad_values)
        _print_presets(args.json)
        return 0
    cfg = build_config(args, flag_problems=bad_values)
    from phi3v_core.training.run import is_main_process, run

    with _stdout_to_stderr(cfg.json):
        summary = run(cfg, on_plan=None if cfg.json else _print_plan)
    if not is_main_process():
        return 0
    if cfg.json:
        print(strict_json(summary, indent=2))
    elif summary.get("status") == "complete":
        print(f"phi3v-finetune: {summary['message']} (step {summary['global_step']})")
    else:
        _print_summary(summary)
    return 0


def _describe_values(values: dict[str, Any]) -> str:
    parts = [
        f"lr {values['learning_rate']:.0e}".replace("e-0", "e-"),
        f"batch {values['batch_size']}",
        f"{values['num_train_epochs']:g} ep",
    ]
    parts.append(f"crops {values['num_crops']}")
    if "lora_rank" in values:
        rank = values["lora_rank"]
        parts.append(f"r{rank}/α{round(rank * values['lora_alpha_ratio'])}")
    return ", ".join(parts)


def _print_presets(as_json: bool) -> None:
    if as_json:
        payload = {
            name: {"task": p.task, "method": p.method, **p.values, "source": p.source, "published": p.published}
            for name, p in RECIPE_PRESETS.items()
        }
        print(strict_json(payload, indent=2))
        return
    from rich.table import Table

    table = Table(title="phi3v-finetune presets (explicit flags override them)")
    table.add_column("preset", no_wrap=True)
    table.add_column("hyper-parameters")
    table.add_column("published")
    for name, p in RECIPE_PRESETS.items():
        table.add_row(name, _describe_values(p.values), p.published)
    console = make_console()
    console.print(table)
    for task, source in {p.task: p.source for p in RECIPE_PRESETS.values()}.items():
        console.print(f"{task}: {source}")


if __name__ == "__main__":
    sys.exit(main())
