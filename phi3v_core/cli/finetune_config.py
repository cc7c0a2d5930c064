"""``phi3v-finetune``'s settings: the recipe's defaults, the ``--preset`` table, and flag resolution.

:func:`build_config` maps parsed flags onto one :class:`~phi3v_core.training.run.FinetuneConfig`, then validates it
with :meth:`FinetuneConfig.problems <phi3v_core.training.run.FinetuneConfig.problems>` (every value: ranges, the
model, data and output folders, this machine) together with the bad flag values argparse found and the flags that
exclude each other (:func:`flag_conflicts`): all problems at once, before a model is built, data is read or a file is
written. The mapping here judges no value. The first answer comes before torch is imported: the same validation
against :meth:`Machine.without_torch <phi3v_core.training.machine.Machine.without_torch>` names every problem that does
not depend on the GPU (flag values, conflicts, ranges, names, folders, files, packages), and with a CPU build of torch
those of the CPU too; a configuration clean there is judged against the detected machine (fp16, flash attention or
paged optimizers without CUDA, the GPU's capability) and the sizes of a preset registered at run time.

Precedence of every setting: recipe default < ``--preset`` < explicit flag.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi3v_core import run_checks
from phi3v_core.cli.finetune_hf import trainer_values
from phi3v_core.cli.finetune_levers import LEVER_FIELD_FLAGS, lever_fields
from phi3v_core.cli.vocabulary import DEFAULT_SEED
from phi3v_core.constants import (
    ATTN_NAMES,
    DEFAULT_ATTN,
    MODEL_PRESET_NAMES,
    PRECISION_NAMES,
    RecipePreset,
    load_recipe,
)
from phi3v_core.errors import ConfigError, raise_all
from phi3v_core.run_checks import TASK_NAMES, uses_lora

if TYPE_CHECKING:
    from phi3v_core.training.run import FinetuneConfig

__all__ = [
    "MODEL_ENV",
    "OUR_DEFAULTS",
    "RECIPE_DEFAULTS",
    "RECIPE_PRESETS",
    "TASK_NAMES",
    "build_config",
    "flag_conflicts",
]

#: Environment variable that sets the default ``--model_name_or_path`` (e.g. a local checkpoint folder).
MODEL_ENV = "PHI3V_MODEL"

#: The recipe's argparse defaults (the CookBook scripts' argparse defaults; ``num_crops`` is the task's: 16, UCF-101 4), from ``recipe.json``.
RECIPE_DEFAULTS: dict[str, Any] = load_recipe().recipe_defaults
#: ``--preset`` table: the CookBook's recommended hyper-parameters per task and method (the CookBook fine-tuning guide), from
#: ``recipe.json``. LoRA α is given as ``--lora_alpha_ratio`` (α = round(r × ratio)). The DocVQA numbers were measured
#: with ``--full_train``; presets only set hyper-parameters, pass ``--full_train`` yourself to reproduce them.
RECIPE_PRESETS: dict[str, RecipePreset] = load_recipe().presets
#: Our flags' defaults (not in the recipe).
OUR_DEFAULTS: dict[str, Any] = {
    "max_steps": -1,
    "warmup_steps": 50,  # the recipe's fixed TrainingArguments value, exposed as a flag
    "save_steps": 0,
    "seed": DEFAULT_SEED,
    "max_new_tokens": 64,  # the recipe's generation length (its evaluation loops)
    "eval_batch_size": 8,
}


# TrainConfig field → the flag that sets it (to phrase TrainConfig's own validation messages in flag terms).
_FIELD_FLAGS = {
    "model": "--model_name_or_path",
    "method": "--method",
    "precision": "--precision",
    "attn": "--attn",
    "num_crops": "--num_crops",
    "micro_batch": "--batch_size_per_gpu",
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
    "dataloader_num_workers": "--dataloader_num_workers",
    "output_dir": "--output_dir",
    "optim": "--optim",
    "offload": "--offload",
    "report_to": "--report_to",
    "deepspeed_config_file": "--deepspeed",
    **LEVER_FIELD_FLAGS,
}


def flag_conflicts(args: argparse.Namespace, preset: RecipePreset | None, method: str) -> list[str]:
    """Flags that each hold a valid value but exclude one another: which flags were passed, not what they hold (every
    value is judged by :meth:`FinetuneConfig.problems <phi3v_core.training.run.FinetuneConfig.problems>`).

    Args:
        args: The parsed flags.
        preset: The ``--preset`` (``None``: none, or an unknown name).
        method: The resolved method.
    """
    problems = []
    if args.method is not None:
        if args.use_qlora and args.method != "qlora":
            problems.append(f"--use_qlora conflicts with --method {args.method}; drop one of them")
        elif args.use_lora and not uses_lora(args.method):
            problems.append(f"--use_lora conflicts with --method {args.method}; drop one of them")
        if args.freeze_vision_model and args.method == "full":
            problems.append(
                "--freeze_vision_model conflicts with --method full (full fine-tuning with a frozen image path "
                "is --method frozen_vision); drop one of them"
            )
    if args.bf16 and args.precision in PRECISION_NAMES and args.precision != "bf16":
        problems.append(f"--bf16 conflicts with --precision {args.precision}; drop one of them")
    if args.use_flash_attention and args.attn in ATTN_NAMES and args.attn != "flash_attention_2":
        problems.append(f"--use_flash_attention conflicts with --attn {args.attn}; drop one of them")
    if args.synthetic is not None and args.data_dir is not None:
        problems.append("pass either --synthetic N or --data_dir, not both")
    if args.full_train and args.data_dir is not None:
        problems.append("--full_train selects the recipe's Hub train set (the Cauldron DocVQA); drop it with --data_dir")
    if preset is not None and args.task and args.task != preset.task:
        others = ", ".join(n for n, p in RECIPE_PRESETS.items() if p.task == args.task) or "none published"
        problems.append(
            f"--preset {args.preset} is for --task {preset.task}, not {args.task}; drop --task or pick a preset "
            f"of {args.task} ({others})"
        )
    # A preset's learning rate belongs to its method: --preset docvqa-lora --method full would train full fine-tuning
    # at the LoRA rate (40x too high), unless --learning_rate is given or the task's preset for that method has the
    # same rate (LoRA and QLoRA do).
    rate = preset.values.get("learning_rate") if preset is not None else None
    if rate is not None and args.learning_rate is None and method != preset.method:
        same_task = RECIPE_PRESETS.get(f"{preset.task}-{method}")
        if same_task is None or same_task.values.get("learning_rate") != rate:
            suggestion = f"use --preset {preset.task}-{method}" if same_task else "drop --preset"
            problems.append(
                f"--preset {args.preset} sets the learning rate for --method {preset.method} ({rate}), not for "
                f"--method {method}; {suggestion}, or pass --learning_rate to choose the rate yourself"
            )
    return problems


@dataclass
class _Resolver:
    """Maps the flags one group at a time (explicit flag > preset > default), recording notes and where each value
    came from. Judges nothing: values are FinetuneConfig.problems', conflicts :func:`flag_conflicts`'."""

    args: argparse.Namespace
    env: Any = None  # the Machine (``Machine.without_torch()`` for the first answer, before torch is imported)
    light: bool = False  # the first answer: nothing may import transformers (a run-time preset's context waits)
    preset: RecipePreset | None = None
    notes: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.preset = RECIPE_PRESETS.get(self.args.preset) if self.args.preset else None  # unknown: judged later

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

    def task(self) -> str:
        args, preset = self.args, self.preset
        self.sources["task"] = "flag" if args.task else ("preset" if preset else "default")
        return args.task or (preset.task if preset else "docvqa")

    def model(self) -> str:
        """A preset name, a local folder, or a Hub id found in the local Hugging Face cache (never downloaded)."""
        explicit, from_env = self.args.model_name_or_path, os.environ.get(MODEL_ENV)
        self.sources["model"] = "flag" if explicit else ("env" if from_env else "default")
        value = explicit or from_env or "tiny"
        if value in MODEL_PRESET_NAMES:
            self.notes.append(
                f"model {value!r} is randomly initialised (no weights): the run checks the pipeline; pass "
                "--model_name_or_path FOLDER for Phi-3.5-vision"
            )
            return value
        folder = Path(value).expanduser()
        if folder.is_dir():
            return str(folder)
        if not run_checks.is_hub_id(value):
            return value  # judged by run_checks.model_problems
        try:
            from huggingface_hub import snapshot_download

            cached = snapshot_download(value, local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the cache (or hub library unavailable): judged as a Hub id
            return value
        self.notes.append(f"--model_name_or_path {value}: using the local Hugging Face cache {cached}")
        return str(cached)

    def method(self) -> tuple[str, bool]:
        """``(method, freeze_vision)`` from --method, the recipe's --use_lora/--use_qlora/--freeze_vision_model."""
        args = self.args
        recipe_method = "qlora" if args.use_qlora else ("lora" if args.use_lora else None)
        method = args.method or recipe_method or (self.preset.method if self.preset else None) or "full"
        self.sources["method"] = "flag" if (args.method or recipe_method) else ("preset" if self.preset else "recipe")
        if args.freeze_vision_model and method == "full":
            # The recipe's full fine-tuning with --freeze_vision_model is our frozen_vision method.
            method, self.sources["method"] = "frozen_vision", "flag"
        return method, bool(args.freeze_vision_model and uses_lora(method))

    def precision(self) -> str:
        args = self.args
        if args.precision is not None:
            precision, self.sources["precision"] = args.precision, "flag"
        elif args.bf16:
            precision, self.sources["precision"] = "bf16", "flag"
        elif args.use_flash_attention:
            precision, self.sources["precision"] = "bf16", "implied"
            self.notes.append("--use_flash_attention implies bf16 (as the recipe's nlvr2/ucf101 scripts force)")
        elif self.env.cuda or not self.env.probed:
            # not probed yet: the GPU default (no check of the first answer refuses fp16; the probed one decides)
            precision, self.sources["precision"] = "fp16", "recipe"
        else:
            precision, self.sources["precision"] = "fp32", "auto"
            self.notes.append(
                "precision fp32: the recipe's default without --bf16 is fp16 mixed precision, which needs a GPU"
            )
        return precision

    def attn(self) -> str:
        args = self.args
        self.sources["attn"] = "flag" if (args.attn or args.use_flash_attention) else "default"
        return args.attn or ("flash_attention_2" if args.use_flash_attention else DEFAULT_ATTN)

    def context(self, model: str) -> int | None:
        """The model's context length (None: unknown, or, in the first answer, a preset registered at run time:
        only transformers' config class knows it)."""
        return run_checks.model_dims(model, light=self.light)[1]

    def numbers(self) -> dict[str, Any]:
        values = {name: self.pick(name, default) for name, default in {**RECIPE_DEFAULTS, **OUR_DEFAULTS}.items()}
        values["num_crops"] = self.pick("num_crops", None)
        if values["num_crops"] is None:
            self.sources["num_crops"] = "task"
        workers = self.args.num_workers
        values["num_workers"] = workers if workers is not None else (4 if self.env is not None and self.env.cuda else 0)
        self.sources["num_workers"] = "flag" if workers is not None else "auto"
        max_steps, warmup = values["max_steps"], values["warmup_steps"]
        if 0 < max_steps <= warmup and self.sources.get("warmup_steps") != "flag":
            # a default warm-up longer than the run is shortened (an explicit one is refused by the schedule check)
            values["warmup_steps"], self.sources["warmup_steps"] = max_steps // 10, "clamped"
            self.notes.append(
                f"warm-up shortened from {warmup} to {max_steps // 10} steps (a tenth of --max_steps {max_steps}) "
                "so the learning rate leaves warm-up; pass --warmup_steps to choose"
            )
        return values


def build_config(args: argparse.Namespace, env: Any = None, flag_problems: Sequence[str] = ()) -> FinetuneConfig:
    """Map parsed flags onto one typed config, then validate it (all problems at once).

    Nothing is built, loaded or written here.

    Args:
        args: ``build_parser().parse_args(...)`` (or ``parse_collecting``, whose bad values keep their defaults).
        env: :class:`~phi3v_core.training.Machine` (detected when omitted; tests pass fakes).
        flag_problems: The bad flag values ``CliParser.parse_collecting`` found, reported with everything else.

    Returns:
        The resolved :class:`FinetuneConfig`.

    Raises:
        ConfigError: Every problem with the flags on this machine, in one message.
    """
    if env is None:
        from phi3v_core.software import torch_gpu_refusal
        from phi3v_core.training.machine import Machine

        # The first answer, before torch is imported (seconds; tens on a busy host): every problem that does not
        # depend on the GPU (all of them with a CPU build of torch), but a run-time preset's sizes (transformers'). Only
        # a clean configuration goes on to the detected machine, so none is reported twice.
        known = Machine.without_torch()
        # GPUs a CPU build of torch cannot use (torch-free to tell): said before any advice judged on the CPU
        refusal = torch_gpu_refusal() if known.probed else None
        if refusal:
            raise ConfigError(refusal)
        cfg, conflicts = _finetune_config(args, _Resolver(args, known, light=True))
        raise_all([*flag_problems, *conflicts, *cfg.problems(known, light=True)])
        # before the training stack is imported (tens of seconds on a busy host): every later check (bf16, flash
        # attention, memory) would judge the CPU instead of the GPU
        refusal = None if known.probed else torch_gpu_refusal()  # a CPU build's was asked above
        if refusal:
            raise ConfigError(refusal)
        env = Machine.detect()
    cfg, conflicts = _finetune_config(args, _Resolver(args, env))
    raise_all([*flag_problems, *conflicts, *cfg.problems(env)])
    if cfg.allow_low_retention and (retention := run_checks.low_retention(cfg.train, env.world_size)):
        cfg.notes.append(f"{retention}; training anyway (--allow_low_retention)")
    return cfg


def _finetune_config(args: argparse.Namespace, resolver: _Resolver) -> tuple[FinetuneConfig, list[str]]:
    """Every flag mapped onto :class:`FinetuneConfig` and its :class:`TrainConfig`, and the flags that conflict."""
    from phi3v_core.training import TrainConfig
    from phi3v_core.training.run import FinetuneConfig

    task, model = resolver.task(), resolver.model()
    method, freeze_vision = resolver.method()
    values = resolver.numbers()
    conflicts = flag_conflicts(args, resolver.preset, method)
    trainer_fields = trainer_values(args, values, resolver.env.world_size, conflicts)  # --batch_size vs accumulation
    train = TrainConfig(
        model=model,
        method=method,
        precision=resolver.precision(),
        attn=resolver.attn(),
        num_crops=values["num_crops"] if values["num_crops"] is not None else (4 if task == "ucf101" else 16),
        micro_batch=values["batch_size_per_gpu"],
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
        **lever_fields(args),
        optim=getattr(args, "optim", "adamw"),
        offload=getattr(args, "offload", "none"),
        packing=bool(getattr(args, "packing", False) or getattr(args, "pack_tokens", None)),
        pack_tokens=getattr(args, "pack_tokens", None),
        extra={"task": task, "preset": args.preset, "command": "phi3v-finetune"},
        **trainer_fields,
    )
    synthetic_eval = None
    if args.synthetic is not None:
        synthetic_eval = args.eval_limit or max(1, min(args.synthetic // 4, 16))
    flash = "--use_flash_attention" if args.use_flash_attention and not args.attn else "--attn flash_attention_2"
    cfg = FinetuneConfig(
        task=task,
        train=train,
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
        overwrite_output_dir=args.overwrite_output_dir,
        max_length=args.max_length or resolver.context(model),
        force=getattr(args, "force", False),
        allow_low_retention=getattr(args, "allow_low_retention", False),
        flags={**_FIELD_FLAGS, "attn=flash_attention_2": flash},
    )
    return cfg, conflicts
