"""phi3v-finetune: the CookBook's fine-tuning scripts as one command (spec/recipe.md §2, §6, §7, §9, §11).

It takes the recipe's flags, so a CookBook command runs by changing the script name, plus our own (``--task``,
``--method``, ``--preset``, ``--synthetic``, ...). The flow is the recipe's: evaluate the fresh model
(``eval_before.json``), fine-tune, evaluate again (``eval_after.json``), print both.

Precedence of every setting: recipe default < ``--preset`` < explicit flag. Where one of our flags contradicts an
explicit recipe flag (``--method full --use_lora``, ``--precision fp16 --bf16``) the command stops with an error;
where it contradicts only what a recipe flag implies (``--use_flash_attention`` implies bf16) our flag wins.

Everything is validated (all problems at once) before a model is built or a file is written; bad input ends in one
``error: ...`` line and exit code 1. Under ``torchrun`` every rank trains and evaluates its shard; rank 0 prints and
writes.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import gc
import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from phi3v_core.errors import ConfigError, cli_errors, raise_all

__all__ = [
    "PRESETS",
    "RECIPE_DEFAULTS",
    "FinetuneConfig",
    "Preset",
    "build_config",
    "build_parser",
    "main",
    "run",
]

TASK_NAMES = ("docvqa", "nlvr2", "hateful_memes", "ucf101", "jsonl")
MODEL_PRESETS = ("tiny", "phi-3.5-vision", "phi-3-vision")
METHOD_NAMES = ("full", "frozen_vision", "lora", "qlora")
PRECISION_NAMES = ("bf16", "fp16", "fp32")
ATTN_NAMES = ("eager", "sdpa", "flash_attention_2")
#: Environment variable that sets the default ``--model_name_or_path`` (e.g. a local checkpoint folder).
MODEL_ENV = "PHI3V_MODEL"

#: The recipe's argparse defaults (spec §2; ``num_crops`` is the task's: 16, UCF-101 4).
RECIPE_DEFAULTS: dict[str, Any] = {
    "batch_size": 16,
    "batch_size_per_gpu": 1,
    "num_train_epochs": 1.0,
    "learning_rate": 4.0e-5,
    "wd": 0.01,
    "lora_rank": 64,
    "lora_alpha_ratio": 2.0,
    "lora_dropout": 0.0,
    "output_dir": "./output/",
}
#: Our flags' defaults (not in the recipe).
OUR_DEFAULTS: dict[str, Any] = {
    "max_steps": -1,
    "warmup_steps": 50,  # the recipe's fixed TrainingArguments value (§6), exposed as a flag
    "save_steps": 0,
    "seed": 42,
    "max_new_tokens": 64,  # the recipe's generation length (§9)
    "eval_batch_size": 8,
}


@dataclass(frozen=True)
class Preset:
    """Recommended hyper-parameters for one task and method, with where they come from.

    Attributes:
        task: Task the numbers were measured on.
        method: Fine-tuning method.
        values: Flag name (argparse dest) → value.
        source: Provenance (recipe section and table).
        published: The result the recipe reports for these settings.
    """

    task: str
    method: str
    values: dict[str, Any]
    source: str
    published: str


_DOCVQA_SRC = "recipe §11 DocVQA table (--full_train, Phi-3-vision v1, batch 64, 2 epochs)"
_MEMES_SRC = "recipe §11 hateful memes table (Phi-3-vision v1, batch 64)"
_NLVR2_SRC = "recipe §11 NLVR2 table (Phi-3.5-vision, 4 GPUs, bf16 + flash attention, batch 64)"

#: ``--preset`` table: the CookBook's recommended settings (spec/recipe.md §11; num_crops 16 from §3).
#: LoRA α is given as ``--lora_alpha_ratio`` (α = round(r × ratio)): r32/α16 → 0.5, r128/α256 → 2.
#: The DocVQA numbers were measured with ``--full_train`` (the Cauldron DocVQA train set); presets only set
#: hyper-parameters, pass ``--full_train`` yourself to reproduce them.
PRESETS: dict[str, Preset] = {
    "docvqa-full": Preset(
        "docvqa",
        "full",
        {"learning_rate": 5e-6, "batch_size": 64, "num_train_epochs": 2.0, "num_crops": 16},
        _DOCVQA_SRC,
        "ANLS 83.65 (bf16), 82.60 (fp16)",
    ),
    "docvqa-frozen_vision": Preset(
        "docvqa",
        "frozen_vision",
        {"learning_rate": 1e-4, "batch_size": 64, "num_train_epochs": 2.0, "num_crops": 16},
        _DOCVQA_SRC,
        "ANLS 79.19 (bf16), 78.74 (fp16)",
    ),
    "docvqa-lora": Preset(
        "docvqa",
        "lora",
        {
            "learning_rate": 2e-4,
            "batch_size": 64,
            "num_train_epochs": 2.0,
            "num_crops": 16,
            "lora_rank": 32,
            "lora_alpha_ratio": 0.5,
        },
        _DOCVQA_SRC,
        "ANLS 82.46 (bf16), 82.34 (fp16)",
    ),
    "docvqa-qlora": Preset(
        "docvqa",
        "qlora",
        {
            "learning_rate": 2e-4,
            "batch_size": 64,
            "num_train_epochs": 2.0,
            "num_crops": 16,
            "lora_rank": 32,
            "lora_alpha_ratio": 0.5,
        },
        _DOCVQA_SRC,
        "ANLS 81.85 (bf16 and fp16)",
    ),
    "hateful_memes-full": Preset(
        "hateful_memes",
        "full",
        {"learning_rate": 5e-5, "batch_size": 64, "num_train_epochs": 2.0, "num_crops": 16},
        _MEMES_SRC,
        "accuracy 86.4 (bf16), 85.4 (fp16)",
    ),
    "hateful_memes-frozen_vision": Preset(
        "hateful_memes",
        "frozen_vision",
        {"learning_rate": 1e-4, "batch_size": 64, "num_train_epochs": 3.0, "num_crops": 16},
        _MEMES_SRC,
        "accuracy 79.4 (bf16), 78.6 (fp16)",
    ),
    "hateful_memes-lora": Preset(
        "hateful_memes",
        "lora",
        {
            "learning_rate": 2e-4,
            "batch_size": 64,
            "num_train_epochs": 2.0,
            "num_crops": 16,
            "lora_rank": 128,
            "lora_alpha_ratio": 2.0,
        },
        _MEMES_SRC,
        "accuracy 86.6 (bf16), 85.2 (fp16)",
    ),
    "hateful_memes-qlora": Preset(
        "hateful_memes",
        "qlora",
        {
            "learning_rate": 2e-4,
            "batch_size": 64,
            "num_train_epochs": 2.0,
            "num_crops": 16,
            "lora_rank": 128,
            "lora_alpha_ratio": 2.0,
        },
        _MEMES_SRC,
        "accuracy 84.0 (bf16), 83.8 (fp16)",
    ),
    "nlvr2-full": Preset(
        "nlvr2",
        "full",
        {"learning_rate": 1e-5, "batch_size": 64, "num_train_epochs": 3.0, "num_crops": 16},
        _NLVR2_SRC,
        "accuracy 89.40",
    ),
    "nlvr2-frozen_vision": Preset(
        "nlvr2",
        "frozen_vision",
        {"learning_rate": 2e-5, "batch_size": 64, "num_train_epochs": 2.0, "num_crops": 16},
        _NLVR2_SRC,
        "accuracy 89.20",
    ),
}

# TrainConfig field → the flag that sets it (to phrase TrainConfig's own validation messages in flag terms).
_FIELD_FLAGS = {
    "model": "--model_name_or_path",
    "method": "--method",
    "precision": "--precision",
    "attn": "--attn",
    "num_crops": "--num_crops",
    "per_device_batch": "--batch_size_per_gpu",
    "global_batch": "--batch_size",
    "max_steps": "--max_steps",
    "num_train_epochs": "--num_train_epochs",
    "learning_rate": "--learning_rate",
    "weight_decay": "--wd",
    "warmup_steps": "--warmup_steps",
    "lora_rank": "--lora_rank",
    "lora_alpha_ratio": "--lora_alpha_ratio",
    "lora_dropout": "--lora_dropout",
    "save_steps": "--save_steps",
    "dataloader_num_workers": "--num_workers",
    "output_dir": "--output_dir",
}
_FIELD_RE = re.compile(r"^(" + "|".join(sorted(_FIELD_FLAGS, key=len, reverse=True)) + r")\b")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_EPILOG = """examples:
  # the acceptance smoke run: DocVQA twin, LoRA, 5 steps, tiny random model, CPU
  phi3v-finetune --task docvqa --synthetic 32 --use_lora --max_steps 5

  # a CookBook command with only the script name changed (checkpoint downloaded to a local folder first)
  torchrun --nproc_per_node=2 -m phi3v_core.cli.finetune --model_name_or_path ./Phi-3.5-vision-instruct \\
      --data_dir ./docvqa --use_lora --bf16 --use_flash_attention --batch_size 64 --output_dir ./out

  # the recipe's recommended hyper-parameters (spec §11), overriding one of them
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


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one ``ConfigError`` line (exit 1) instead of usage + exit 2."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see phi3v-finetune --help)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: the recipe's flags (same names and meaning) and ours."""
    parser = _Parser(
        prog="phi3v-finetune",
        description="Fine-tune Phi-3(.5)-vision like the Phi-3 CookBook recipe: eval before, train, eval after.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a typo such as --use_lor must not silently match a longer flag
    )
    recipe = parser.add_argument_group("recipe flags (as in the CookBook scripts)")
    recipe.add_argument(
        "--model_name_or_path",
        default=None,
        metavar="PATH",
        help=f"local checkpoint folder or a preset ({', '.join(MODEL_PRESETS)}); default ${MODEL_ENV} or tiny",
    )
    recipe.add_argument("--full_train", action="store_true", help="docvqa: train on the Cauldron DocVQA train set")
    recipe.add_argument(
        "--data_dir", default=None, metavar="DIR", help="jsonl folder (*_train.jsonl, *_val.jsonl, images/)"
    )
    recipe.add_argument("--use_flash_attention", action="store_true", help="attention flash_attention_2 (implies bf16)")
    recipe.add_argument("--bf16", action="store_true", help="bf16 mixed precision (recipe default without it: fp16)")
    recipe.add_argument("--use_lora", action="store_true", help="LoRA (method lora)")
    recipe.add_argument("--use_qlora", action="store_true", help="QLoRA, 4-bit base (method qlora; implies --use_lora)")
    recipe.add_argument("--output_dir", default=None, help="run folder (default: ./output/)")
    recipe.add_argument("--batch_size", type=int, default=None, help="global batch per optimizer step (default: 16)")
    recipe.add_argument("--batch_size_per_gpu", type=int, default=None, help="micro-batch per process (default: 1)")
    recipe.add_argument(
        "--num_crops", type=int, default=None, help="HD crops per image, 1..16 (default: task's, 16; ucf101 4)"
    )
    recipe.add_argument("--num_train_epochs", type=float, default=None, help="epochs (default: 1)")
    recipe.add_argument("--learning_rate", type=float, default=None, help="peak AdamW learning rate (default: 4e-5)")
    recipe.add_argument("--wd", type=float, default=None, help="weight decay (default: 0.01)")
    recipe.add_argument(
        "--no-tqdm", "--no_tqdm", dest="tqdm", action="store_false", help="no progress bars (training and eval)"
    )
    recipe.add_argument("--lora_rank", type=int, default=None, help="LoRA rank (default: 64)")
    recipe.add_argument(
        "--lora_alpha_ratio", type=float, default=None, help="LoRA alpha = round(rank × ratio) (default: 2)"
    )
    recipe.add_argument("--lora_dropout", type=float, default=None, help="LoRA dropout (default: 0)")
    recipe.add_argument(
        "--freeze_vision_model",
        action="store_true",
        help="full: method frozen_vision; LoRA/QLoRA: no adapters on CLIP and the projector",
    )

    ours = parser.add_argument_group("our flags")
    ours.add_argument("--task", default=None, metavar="{" + ",".join(TASK_NAMES) + "}", help="task (default: docvqa)")
    ours.add_argument("--method", default=None, metavar="{" + ",".join(METHOD_NAMES) + "}", help="fine-tuning method")
    ours.add_argument(
        "--attn", default=None, metavar="{" + ",".join(ATTN_NAMES) + "}", help="attention (default: sdpa)"
    )
    ours.add_argument(
        "--precision",
        default=None,
        metavar="{" + ",".join(PRECISION_NAMES) + "}",
        help="mixed precision (default: bf16 with --bf16/--use_flash_attention, else fp16 on GPU, fp32 on CPU)",
    )
    ours.add_argument("--preset", default=None, metavar="NAME", help="recommended hyper-parameters (--list-presets)")
    ours.add_argument("--list-presets", "--list_presets", action="store_true", help="show the presets and exit")
    ours.add_argument(
        "--synthetic", type=int, default=None, metavar="N", help="train on N records of the task's offline twin"
    )
    ours.add_argument(
        "--eval_limit",
        type=int,
        default=None,
        metavar="N",
        help="evaluate at most N questions (default: all; with --synthetic N: min(N//4, 16), at least 1)",
    )
    ours.add_argument("--max_steps", type=int, default=None, help="optimizer steps; -1 = epochs (default)")
    ours.add_argument("--warmup_steps", type=int, default=None, help="linear warmup steps (default: 50, as the recipe)")
    ours.add_argument(
        "--save_steps", type=int, default=None, help="resumable checkpoint every N steps (0 = final only)"
    )
    ours.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CKPT",
        help="continue from the newest checkpoint in --output_dir, or from CKPT",
    )
    ours.add_argument("--seed", type=int, default=None, help="seed for init, data order and the twin (default: 42)")
    ours.add_argument(
        "--skip-bad", "--skip_bad", dest="skip_bad", action="store_true", help="skip records with unreadable images"
    )
    ours.add_argument(
        "--no-eval", "--no_eval", dest="evaluate", action="store_false", help="skip eval before and after"
    )
    ours.add_argument("--max_new_tokens", type=int, default=None, help="generation budget in eval (default: 64)")
    ours.add_argument("--eval_batch_size", type=int, default=None, help="prompts per generate call (default: 8)")
    ours.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: 4 on GPU, 0 on CPU)")
    ours.add_argument("--json", action="store_true", help="print one JSON object on stdout (logs go to stderr)")
    return parser


@dataclass
class FinetuneConfig:
    """Everything a run needs, resolved from flags, preset and defaults.

    Attributes:
        task: Task name.
        train: The training helper's :class:`~phi3v_core.training.TrainConfig`.
        data_dir: jsonl folder (``None``: synthetic twin or the recipe's Hub data).
        synthetic: Records of the offline twin to train on.
        synthetic_eval: Eval records of the twin.
        eval_limit: Cap on eval questions.
        full_train: DocVQA ``--full_train``.
        num_crops: Explicit/preset num_crops (``None``: the task's default, chosen when the data is loaded).
        skip_bad: Skip records with unreadable images.
        evaluate: Run eval before and after.
        max_new_tokens: Eval generation budget.
        eval_batch_size: Eval prompts per ``generate``.
        json: JSON output.
        progress: Progress bars.
        preset: ``--preset`` name.
        sources: Setting → where its value came from (``flag``, ``preset``, ``recipe``, ``default``, ``auto``).
        notes: Remarks printed before the run (deviations, implied settings).
    """

    task: str
    train: Any  # TrainConfig (imported lazily so --help stays fast)
    data_dir: str | None = None
    synthetic: int | None = None
    synthetic_eval: int | None = None
    eval_limit: int | None = None
    full_train: bool = False
    num_crops: int | None = None
    skip_bad: bool = False
    evaluate: bool = True
    max_new_tokens: int = 64
    eval_batch_size: int = 8
    json: bool = False
    progress: bool = True
    preset: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _did_you_mean(value: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _resolve_model(value: str, problems: list[str], notes: list[str]) -> str:
    """A preset name, a local folder, or a Hub id found in the local Hugging Face cache (never downloaded)."""
    if value in MODEL_PRESETS or Path(value).expanduser().is_dir():
        return str(Path(value).expanduser()) if value not in MODEL_PRESETS else value
    if _HUB_ID_RE.match(value):
        try:
            from huggingface_hub import snapshot_download

            cached = snapshot_download(value, local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the cache (or hub library unavailable): same advice either way
            cached = None
        if cached:
            notes.append(f"--model_name_or_path {value}: using the local Hugging Face cache {cached}")
            return str(cached)
        problems.append(
            f"--model_name_or_path {value} is a Hugging Face Hub id and phi3v-finetune does not download models; "
            f"download it first (huggingface-cli download {value} --local-dir DIR) and pass that local folder, "
            f"or use a preset ({', '.join(MODEL_PRESETS)})"
        )
        return value
    problems.append(
        f"--model_name_or_path {value}: no such folder; pass a local checkpoint folder (config.json + *.safetensors) "
        f"or a preset ({', '.join(MODEL_PRESETS)})"
    )
    return value


@dataclass
class _Resolver:
    """Resolves one group of settings at a time, collecting problems, notes and where each value came from."""

    args: argparse.Namespace
    env: Any
    preset: Preset | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)  # TrainConfig fields already reported in flag terms

    def pick(self, name: str, default: Any) -> Any:
        """Explicit flag > preset > default, recording the source."""
        value = getattr(self.args, name)
        if value is not None:
            self.sources[name] = "flag"
            return value
        if self.preset is not None and name in self.preset.values:
            self.sources[name] = "preset"
            return self.preset.values[name]
        self.sources[name] = "recipe" if name in RECIPE_DEFAULTS else "default"
        return default

    def resolve_preset(self) -> None:
        name = self.args.preset
        if name is None:
            return
        self.preset = PRESETS.get(name)
        if self.preset is None:
            self.problems.append(
                f"unknown preset {name!r}{_did_you_mean(name, list(PRESETS))}; "
                f"choose one of {', '.join(PRESETS)} (phi3v-finetune --list-presets)"
            )

    def resolve_task(self) -> str:
        args, problems, preset = self.args, self.problems, self.preset
        task = args.task or (preset.task if preset else "docvqa")
        self.sources["task"] = "flag" if args.task else ("preset" if preset else "default")
        if task not in TASK_NAMES:
            problems.append(
                f"unknown task {task!r}{_did_you_mean(task, TASK_NAMES)}; choose one of {', '.join(TASK_NAMES)}"
            )
        if preset and args.task and args.task != preset.task:
            others = ", ".join(n for n, p in PRESETS.items() if p.task == args.task) or "none published"
            problems.append(
                f"--preset {args.preset} is for --task {preset.task}, not {args.task}; drop --task or pick a preset "
                f"of {args.task} ({others})"
            )
        return task

    def check_data(self, task: str) -> None:
        args, problems = self.args, self.problems
        if args.synthetic is not None and args.data_dir is not None:
            problems.append("pass either --synthetic N or --data_dir, not both")
        if args.synthetic is not None and args.synthetic < 1:
            problems.append(f"--synthetic must be >= 1 records (got {args.synthetic})")
        if args.synthetic is not None and task == "jsonl":
            problems.append("--task jsonl has no synthetic twin; pass --data_dir, or --synthetic with another task")
        if args.data_dir is None and args.synthetic is None and task in ("ucf101", "jsonl"):
            hint = ", e.g. from phi3v-convert ucf101" if task == "ucf101" else ""
            twin = " or --synthetic N" if task == "ucf101" else ""
            problems.append(
                f"--task {task} needs --data_dir (a folder with *_train.jsonl, *_val.jsonl and images/{hint}){twin}"
            )
        if args.data_dir is not None and not Path(args.data_dir).expanduser().is_dir():
            problems.append(f"--data_dir {args.data_dir}: no such folder")
        if args.full_train and task in TASK_NAMES and task != "docvqa":
            problems.append(f"--full_train applies to --task docvqa only, not {task}")
        if args.full_train and args.data_dir is not None:
            problems.append(
                "--full_train selects the recipe's Hub train set (the Cauldron DocVQA); drop it with --data_dir"
            )
        hub_data = args.data_dir is None and args.synthetic is None and task in ("docvqa", "nlvr2", "hateful_memes")
        if hub_data and importlib.util.find_spec("datasets") is None:
            problems.append(
                f"--task {task} without --data_dir loads the recipe's Hugging Face dataset, which needs the "
                "'datasets' package (pip install datasets) and a download; or pass --data_dir DIR or --synthetic N"
            )
        for name in ("eval_limit", "max_new_tokens", "eval_batch_size"):
            value = getattr(args, name)
            if value is not None and value < 1:
                problems.append(f"--{name} must be >= 1 (got {value})")

    def resolve_model(self) -> str:
        explicit, from_env = self.args.model_name_or_path, os.environ.get(MODEL_ENV)
        self.sources["model"] = "flag" if explicit else ("env" if from_env else "default")
        before = len(self.problems)
        model = _resolve_model(explicit or from_env or "tiny", self.problems, self.notes)
        if len(self.problems) > before:
            self.reported.add("model")
        if model in MODEL_PRESETS:
            self.notes.append(
                f"model {model!r} is randomly initialised (no weights): the run checks the pipeline; pass "
                "--model_name_or_path FOLDER for Phi-3.5-vision"
            )
        return model

    def resolve_method(self) -> tuple[str, bool]:
        """``(method, freeze_vision)`` from --method, the recipe's --use_lora/--use_qlora/--freeze_vision_model."""
        args, problems = self.args, self.problems
        recipe_method = "qlora" if args.use_qlora else ("lora" if args.use_lora else None)
        if args.method is not None and args.method not in METHOD_NAMES:
            problems.append(
                f"unknown method {args.method!r}{_did_you_mean(args.method, METHOD_NAMES)}; "
                f"choose one of {', '.join(METHOD_NAMES)}"
            )
            self.reported.add("method")
        if args.method is not None:
            if args.use_qlora and args.method != "qlora":
                problems.append(f"--use_qlora conflicts with --method {args.method}; drop one of them")
            elif args.use_lora and args.method not in ("lora", "qlora"):
                problems.append(f"--use_lora conflicts with --method {args.method}; drop one of them")
            if args.freeze_vision_model and args.method == "full":
                problems.append(
                    "--freeze_vision_model conflicts with --method full (full fine-tuning with a frozen image path "
                    "is --method frozen_vision); drop one of them"
                )
        method = args.method or recipe_method or (self.preset.method if self.preset else None) or "full"
        self.sources["method"] = "flag" if (args.method or recipe_method) else ("preset" if self.preset else "recipe")
        if args.freeze_vision_model and method == "full":
            # The recipe's full fine-tuning with --freeze_vision_model is our frozen_vision method.
            method, self.sources["method"] = "frozen_vision", "flag"
        return method, bool(args.freeze_vision_model and method in ("lora", "qlora"))

    def resolve_precision(self) -> str:
        args, env = self.args, self.env
        if args.precision is not None:
            if args.precision not in PRECISION_NAMES:
                self.problems.append(
                    f"unknown precision {args.precision!r}; choose one of {', '.join(PRECISION_NAMES)}"
                )
                self.reported.add("precision")
            elif args.bf16 and args.precision != "bf16":
                self.problems.append(f"--bf16 conflicts with --precision {args.precision}; drop one of them")
            precision, self.sources["precision"] = args.precision, "flag"
        elif args.bf16:
            precision, self.sources["precision"] = "bf16", "flag"
        elif args.use_flash_attention:
            precision, self.sources["precision"] = "bf16", "implied"
            self.notes.append("--use_flash_attention implies bf16 (as the recipe's nlvr2/ucf101 scripts force)")
        elif env.cuda:
            precision, self.sources["precision"] = "fp16", "recipe"
        else:
            precision, self.sources["precision"] = "fp32", "auto"
            self.notes.append(
                "precision fp32: the recipe's default without --bf16 is fp16 mixed precision, which needs a GPU"
            )
        if precision == "fp16" and not env.cuda:
            self.problems.append(
                "--precision fp16 needs a CUDA GPU (fp16 mixed precision with loss scaling does not run on CPU); "
                "use --precision fp32 or --precision bf16"
            )
            self.reported.add("precision")
        return precision

    def resolve_attn(self) -> str:
        args = self.args
        if args.attn is not None:
            if args.attn not in ATTN_NAMES:
                self.problems.append(f"unknown attn {args.attn!r}; choose one of {', '.join(ATTN_NAMES)}")
                self.reported.add("attn")
            elif args.use_flash_attention and args.attn != "flash_attention_2":
                self.problems.append(f"--use_flash_attention conflicts with --attn {args.attn}; drop one of them")
            attn, self.sources["attn"] = args.attn, "flag"
        elif args.use_flash_attention:
            attn, self.sources["attn"] = "flash_attention_2", "flag"
        else:
            attn, self.sources["attn"] = "sdpa", "default"
        if attn == "flash_attention_2" and not self.env.cuda:
            flag = "--attn flash_attention_2" if args.attn else "--use_flash_attention"
            self.problems.append(
                f"{flag} needs a CUDA GPU (Ampere or newer) with flash-attn; drop it here (--attn sdpa is the default)"
            )
            self.reported.add("attn")
        return attn

    def resolve_numbers(self) -> dict[str, Any]:
        values = {name: self.pick(name, default) for name, default in {**RECIPE_DEFAULTS, **OUR_DEFAULTS}.items()}
        num_crops = values["num_crops"] = self.pick("num_crops", None)
        if num_crops is None:
            self.sources["num_crops"] = "task"
        elif not 1 <= num_crops <= 16:
            self.problems.append(
                f"--num_crops {num_crops} is out of range: the recipe asserts num_crops <= 16; pass 1..16 "
                "(16 for single images, 4 for video frames)"
            )
            self.reported.add("num_crops")
        batch, per_gpu, world = values["batch_size"], values["batch_size_per_gpu"], self.env.world_size
        if batch < 1 or per_gpu < 1:
            self.problems.append(f"--batch_size and --batch_size_per_gpu must be >= 1 (got {batch} and {per_gpu})")
            self.reported.update({"global_batch", "per_device_batch"})
        elif batch % (per_gpu * world):
            # The recipe asserts batch_size % (num_gpus * batch_size_per_gpu) == 0: --batch_size is the global batch.
            self.problems.append(
                f"--batch_size {batch} is not divisible by --batch_size_per_gpu {per_gpu} × {world} process(es) = "
                f"{per_gpu * world}; pass a multiple of {per_gpu * world}"
            )
            self.reported.update({"global_batch", "per_device_batch"})
        workers = self.args.num_workers
        values["num_workers"] = workers if workers is not None else (4 if self.env.cuda else 0)
        self.sources["num_workers"] = "flag" if workers is not None else "auto"
        return values

    def add_train_config_problems(self, train_cfg: Any) -> None:
        """The training helper's own checks (environment, model folder, checkpoints), phrased with our flags."""
        for problem in train_cfg.problems(self.env):
            match = _FIELD_RE.match(problem)
            if match and match.group(1) in self.reported:
                continue  # already said in flag terms
            problem = _FIELD_RE.sub(lambda m: _FIELD_FLAGS[m.group(1)], problem, count=1)
            self.problems.append(problem.replace("resume='latest'", "--resume"))


def build_config(args: argparse.Namespace, env: Any = None) -> FinetuneConfig:
    """Map parsed flags onto one typed config and validate everything (all problems at once).

    Nothing is built, loaded or written here.

    Args:
        args: ``build_parser().parse_args(...)``.
        env: :class:`~phi3v_core.training.Environment` (detected when omitted; tests pass fakes).

    Returns:
        The resolved :class:`FinetuneConfig`.

    Raises:
        ConfigError: Every problem with the flags on this machine, in one message.
    """
    from phi3v_core.training import Environment, TrainConfig

    resolver = _Resolver(args, env or Environment.detect())
    resolver.resolve_preset()
    task = resolver.resolve_task()
    resolver.check_data(task)
    model = resolver.resolve_model()
    method, freeze_vision = resolver.resolve_method()
    precision = resolver.resolve_precision()
    attn = resolver.resolve_attn()
    values = resolver.resolve_numbers()

    train_cfg = TrainConfig(
        model=model,
        # Unknown names were reported above; placeholders keep TrainConfig's checks about everything else useful.
        method=method if method in METHOD_NAMES else "full",
        precision=precision if precision in PRECISION_NAMES else "fp32",
        attn=attn if attn in ATTN_NAMES else "sdpa",
        num_crops=values["num_crops"] if values["num_crops"] is not None else (4 if task == "ucf101" else 16),
        per_device_batch=values["batch_size_per_gpu"],
        global_batch=values["batch_size"],
        max_steps=values["max_steps"],
        num_train_epochs=values["num_train_epochs"],
        learning_rate=values["learning_rate"],
        weight_decay=values["wd"],
        warmup_steps=values["warmup_steps"],
        lora_rank=values["lora_rank"],
        lora_alpha_ratio=values["lora_alpha_ratio"],
        lora_dropout=values["lora_dropout"],
        freeze_vision=freeze_vision,
        output_dir=values["output_dir"],
        save_steps=values["save_steps"],
        resume=args.resume,
        seed=values["seed"],
        dataloader_num_workers=values["num_workers"],
        disable_tqdm=not args.tqdm,
        extra={"task": task, "preset": args.preset, "command": "phi3v-finetune"},
    )
    resolver.add_train_config_problems(train_cfg)
    raise_all(dict.fromkeys(resolver.problems))  # dedupe, keep order

    synthetic_eval = None
    if args.synthetic is not None:
        synthetic_eval = args.eval_limit or max(1, min(args.synthetic // 4, 16))
    return FinetuneConfig(
        task=task,
        train=train_cfg,
        data_dir=args.data_dir,
        synthetic=args.synthetic,
        synthetic_eval=synthetic_eval,
        eval_limit=args.eval_limit,
        full_train=args.full_train,
        num_crops=values["num_crops"],
        skip_bad=args.skip_bad,
        evaluate=args.evaluate,
        max_new_tokens=values["max_new_tokens"],
        eval_batch_size=values["eval_batch_size"],
        json=args.json,
        progress=args.tqdm,
        preset=args.preset,
        sources=resolver.sources,
        notes=resolver.notes,
    )


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _device(env: Any) -> Any:
    import torch

    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if env.cuda else torch.device("cpu")


def _load_data(cfg: FinetuneConfig) -> Any:
    from phi3v_core.data import load_task

    return load_task(
        cfg.task,
        data_dir=cfg.data_dir,
        synthetic=cfg.synthetic,
        synthetic_eval=cfg.synthetic_eval,
        full_train=cfg.full_train,
        seed=cfg.train.seed,
        skip_bad=cfg.skip_bad,
        num_crops=cfg.num_crops,
        eval_limit=cfg.eval_limit,
    )


def _build_processor(model: str, num_crops: int) -> Any:
    from phi3v_core.processing import Phi3VProcessor

    if model in MODEL_PRESETS:
        # Random-init presets have no tokenizer files; the offline tiny tokenizer has the official special ids.
        return Phi3VProcessor.tiny(num_crops=num_crops)
    return Phi3VProcessor.from_pretrained(model, num_crops=num_crops)


def _eval_kwargs(cfg: FinetuneConfig, env: Any) -> dict[str, Any]:
    train = cfg.train
    # With fp32 master weights (full / frozen_vision) the model generates under autocast like it trained; on CPU the
    # weights' own dtype is used (CPU autocast is slow and fp16 is unavailable there).
    autocast = train.compute_dtype if env.cuda and train.precision != "fp32" else None
    return {
        "batch_size": cfg.eval_batch_size,
        "max_new_tokens": cfg.max_new_tokens,
        "autocast_dtype": autocast,
        "num_workers": train.dataloader_num_workers,
        "progress": cfg.progress and not cfg.json,
    }


def _evaluate_before(cfg: FinetuneConfig, task: Any, processor: Any, env: Any) -> Any:
    import torch

    from phi3v_core.training.evaluate import EvalResult, baseline_model, evaluate_task

    path = Path(cfg.train.output_dir) / "eval_before.json"
    if cfg.train.resume is not None and path.is_file():
        previous = EvalResult.from_json(path)
        if previous.task == task.name and previous.ids == [item.id for item in task.eval_items()]:
            return previous  # a resumed run keeps its baseline instead of regenerating it
    model = baseline_model(cfg.train, env).to(_device(env))  # QLoRA: the same nf4 base as "after"
    try:
        return evaluate_task(
            model, task, processor, output_file=path, description="eval before", **_eval_kwargs(cfg, env)
        )
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool) -> Iterator[None]:
    # --json: the Trainer prints its logs on stdout; keep stdout for the one JSON object.
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def run(cfg: FinetuneConfig, env: Any = None) -> dict[str, Any]:
    """Load data and processor, evaluate, train, evaluate again; return the summary (every rank).

    Args:
        cfg: A validated :class:`FinetuneConfig` (from :func:`build_config`).
        env: The machine (detected when omitted).

    Returns:
        JSON-ready summary: settings, data, training result and the before/after metrics.
    """
    from phi3v_core.training import Environment, train
    from phi3v_core.training.api import init_distributed
    from phi3v_core.training.evaluate import evaluate_task

    env = env or Environment.detect()
    init_distributed(env.cuda, cfg.train.ddp_timeout)  # before the first eval; the Trainer reuses it
    task = _load_data(cfg)
    cfg.train.num_crops = task.num_crops  # the task's default when --num_crops was not given (validated 1..16)
    cfg.train.extra["data"] = task.origin
    processor = _build_processor(cfg.train.model, task.num_crops)

    from phi3v_core.data import EncodedDataset

    train_dataset = EncodedDataset(task.train, processor)
    if _rank() == 0 and not cfg.json:
        _print_plan(cfg, task)

    before = _evaluate_before(cfg, task, processor, env) if cfg.evaluate else None
    result = train(cfg.train, train_dataset, processor=processor, env=env)
    after = None
    if cfg.evaluate:
        after = evaluate_task(
            result.model,
            task,
            processor,
            output_file=Path(cfg.train.output_dir) / "eval_after.json",
            description="eval after",
            **_eval_kwargs(cfg, env),
        )
    train_summary = result.to_dict()
    train_summary.pop("steps", None)  # per-step timings are the benchmark's business
    return {
        "task": task.name,
        "data": task.origin,
        "train_records": len(task.train),
        "eval_questions": len(task.eval_items()),
        "model": cfg.train.model,
        "method": cfg.train.method,
        "precision": cfg.train.precision,
        "attn": cfg.train.attn,
        "num_crops": task.num_crops,
        "preset": cfg.preset,
        "output_dir": str(cfg.train.output_dir),
        "settings": {name: {"value": _setting_value(cfg, name), "from": src} for name, src in cfg.sources.items()},
        "train": train_summary,
        "metric": task.metric,
        "eval_before": _eval_summary(before, Path(cfg.train.output_dir) / "eval_before.json"),
        "eval_after": _eval_summary(after, Path(cfg.train.output_dir) / "eval_after.json"),
    }


def _setting_value(cfg: FinetuneConfig, name: str) -> Any:
    train = cfg.train
    mapping = {
        "task": cfg.task,
        "model": train.model,
        "method": train.method,
        "precision": train.precision,
        "attn": train.attn,
        "num_crops": train.num_crops,
        "batch_size": train.global_batch,
        "batch_size_per_gpu": train.per_device_batch,
        "num_train_epochs": train.num_train_epochs,
        "learning_rate": train.learning_rate,
        "wd": train.weight_decay,
        "lora_rank": train.lora_rank,
        "lora_alpha_ratio": train.lora_alpha_ratio,
        "lora_dropout": train.lora_dropout,
        "output_dir": train.output_dir,
        "max_steps": train.max_steps,
        "warmup_steps": train.warmup_steps,
        "save_steps": train.save_steps,
        "seed": train.seed,
        "max_new_tokens": cfg.max_new_tokens,
        "eval_batch_size": cfg.eval_batch_size,
        "num_workers": train.dataloader_num_workers,
    }
    return mapping.get(name)


def _eval_summary(result: Any, path: Path) -> dict[str, Any] | None:
    if result is None:
        return None
    return {
        "metric": result.metric,
        "score": result.score,
        "num_samples": result.num_samples,
        "seconds": round(result.seconds, 3),
        "file": str(path),
    }


def _print_plan(cfg: FinetuneConfig, task: Any) -> None:
    from rich.console import Console

    console = Console()
    train = cfg.train
    lora = (
        f", LoRA r={train.lora_rank} α={round(train.lora_rank * train.lora_alpha_ratio)}"
        if "lora" in train.method
        else ""
    )
    console.print(
        f"[bold]phi3v-finetune[/] task {task.name} ({task.origin}: {len(task.train)} train, "
        f"{len(task.eval_items())} eval) · model {train.model} · {train.method}{lora} · {train.precision} · "
        f"attn {train.attn} · num_crops {task.num_crops} · batch {train.global_batch} "
        f"({train.per_device_batch}/process) · lr {train.learning_rate:g} · "
        + (f"{train.max_steps} steps" if train.max_steps > 0 else f"{train.num_train_epochs:g} epoch(s)")
        + (f" · preset {cfg.preset}" if cfg.preset else "")
    )
    for note in cfg.notes:
        console.print(f"note: {note}", style="yellow")
    if task.skipped:
        console.print(f"note: skipped unreadable records: {task.skipped}", style="yellow")


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    label = "ANLS" if summary["metric"] == "anls" else "accuracy"
    before, after = summary["eval_before"], summary["eval_after"]
    table = Table(title=f"{summary['task']} · {summary['method']} · {summary['train']['global_step']} steps")
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
    console = Console()
    console.print(table)
    if before and after:
        console.print(f"wrote {before['file']} and {after['file']}")
    saved = summary["train"].get("saved_to")
    if saved:
        console.print(f"model saved to {saved}")


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``phi3v-finetune``.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        Exit code 0 (errors exit 1 through ``cli_errors``).
    """
    # bitsandbytes logs a warning on import on CPUs with AVX512-BF16 about an optional kernel package; it would be
    # printed before every message of this command (one-line errors included) and says nothing about the run.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    if args.list_presets:
        _print_presets(args.json)
        return 0
    cfg = build_config(args)
    with _stdout_to_stderr(cfg.json):
        summary = run(cfg)
    if _rank() == 0:
        if cfg.json:
            print(json.dumps(summary, indent=2, default=str))
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
            for name, p in PRESETS.items()
        }
        print(json.dumps(payload, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="phi3v-finetune presets (explicit flags override them)")
    table.add_column("preset", no_wrap=True)
    table.add_column("hyper-parameters")
    table.add_column("published")
    for name, p in PRESETS.items():
        table.add_row(name, _describe_values(p.values), p.published)
    console = Console()
    console.print(table)
    for task, source in {p.task: p.source for p in PRESETS.values()}.items():
        console.print(f"{task}: {source}")


if __name__ == "__main__":
    sys.exit(main())
