"""``phi3v-finetune``'s settings: the recipe's defaults, the ``--preset`` table, and flag resolution.

:func:`build_config` maps parsed flags onto one :class:`~phi3v_core.training.run.FinetuneConfig` and validates
everything (all problems at once) before a model is built, data is read or a file is written: choices, conflicts,
every number's range (finite floats; LoRA rank within the hidden size; lengths within the model context), the model
folder (config type and weight headers), the output folder (writable, no other run in it, no overlap with the data
or the model) and the checkpoint to resume.

Precedence of every setting: recipe default < ``--preset`` < explicit flag.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi3v_core.cli.finetune_hf import path_problems, trainer_values
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
from phi3v_core.errors import ConfigError, did_you_mean, raise_all
from phi3v_core.methods import METHOD_NAMES, METHODS
from phi3v_core.run_folder import output_dir_problems

if TYPE_CHECKING:
    from phi3v_core.training.run import FinetuneConfig

__all__ = [
    "MODEL_ENV",
    "OUR_DEFAULTS",
    "RECIPE_DEFAULTS",
    "RECIPE_PRESETS",
    "TASK_NAMES",
    "build_config",
]

TASK_NAMES = ("docvqa", "nlvr2", "hateful_memes", "ucf101", "jsonl")
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
_FIELD_RE = re.compile(r"^(" + "|".join(sorted(_FIELD_FLAGS, key=len, reverse=True)) + r")\b")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _output_problems(args: argparse.Namespace, output_dir: str) -> list[str]:
    """Why the run may not write ``output_dir`` (torch-free: also asked before torch is imported)."""
    model = args.model_name_or_path or os.environ.get(MODEL_ENV)
    sources = {"--data_dir": args.data_dir, "--model_name_or_path": model if model not in MODEL_PRESET_NAMES else None}
    return output_dir_problems(output_dir, resume=args.resume, overwrite=args.overwrite_output_dir, sources=sources)


def _early_problems(args: argparse.Namespace) -> list[str]:
    """Paths and the output folder, before torch is imported (seconds): a mistyped folder or a run already in the
    output folder (the commonest refusals) answer at once."""
    problems = path_problems(args, args.model_name_or_path or os.environ.get(MODEL_ENV))
    # a preset may name another output folder: judged after it is resolved
    out = args.output_dir if args.output_dir is not None or args.preset else RECIPE_DEFAULTS["output_dir"]
    return problems + (_output_problems(args, out) if out and not problems else [])


def _resolve_model(value: str, problems: list[str], notes: list[str]) -> str:
    """A preset name, a local folder, or a Hub id found in the local Hugging Face cache (never downloaded)."""
    if value in MODEL_PRESET_NAMES or Path(value).expanduser().is_dir():
        return str(Path(value).expanduser()) if value not in MODEL_PRESET_NAMES else value
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
            f"or use a preset ({', '.join(MODEL_PRESET_NAMES)})"
        )
        return value
    problems.append(
        f"--model_name_or_path {value}: no such folder; pass a local checkpoint folder (config.json + *.safetensors) "
        f"or a preset ({', '.join(MODEL_PRESET_NAMES)})"
    )
    return value


def _model_dims(model: str) -> tuple[int | None, int | None]:
    """``(hidden_size, context_length)`` of a preset or a checkpoint folder's config.json (``None`` if unknown)."""
    if model in MODEL_PRESET_NAMES:
        from phi3v_core.config import get_config

        config = get_config(model)
        return config.hidden_size, config.max_position_embeddings
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(config, dict):
        return None, None  # TrainConfig.problems names the broken config.json
    hidden, context = config.get("hidden_size"), config.get("max_position_embeddings")
    return (hidden if isinstance(hidden, int) else None), (context if isinstance(context, int) else None)


@dataclass
class _Resolver:
    """Resolves one group of settings at a time, collecting problems, notes and where each value came from."""

    args: argparse.Namespace
    env: Any
    preset: RecipePreset | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)  # TrainConfig fields already reported in flag terms
    context: int | None = None  # the model's context length, once known

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
        self.preset = RECIPE_PRESETS.get(name)
        if self.preset is None:
            self.problems.append(
                f"unknown preset {name!r}{did_you_mean(name, list(RECIPE_PRESETS))}; "
                f"choose one of {', '.join(RECIPE_PRESETS)} (phi3v-finetune --list-presets)"
            )

    def resolve_task(self) -> str:
        args, problems, preset = self.args, self.problems, self.preset
        task = args.task or (preset.task if preset else "docvqa")
        self.sources["task"] = "flag" if args.task else ("preset" if preset else "default")
        if task not in TASK_NAMES:
            problems.append(
                f"unknown task {task!r}{did_you_mean(task, TASK_NAMES)}; choose one of {', '.join(TASK_NAMES)}"
            )
        if preset and args.task and args.task != preset.task:
            others = ", ".join(n for n, p in RECIPE_PRESETS.items() if p.task == args.task) or "none published"
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
        if model in MODEL_PRESET_NAMES:
            self.notes.append(
                f"model {model!r} is randomly initialised (no weights): the run checks the pipeline; pass "
                "--model_name_or_path FOLDER for Phi-3.5-vision"
            )
        return model  # a folder's config and weight headers are judged by TrainConfig.problems

    def check_sizes(self, model: str, values: dict[str, Any], method: str) -> None:
        """LoRA rank within the hidden size; lengths within the model context (before anything loads)."""
        if "model" in self.reported:
            return
        hidden, context = _model_dims(model)
        self.context = context
        rank = values["lora_rank"]
        if _uses_lora(method) and hidden and rank > hidden:
            self.problems.append(
                f"--lora_rank {rank} exceeds the model's hidden size {hidden}; pass --lora_rank <= {hidden} "
                "(the recipe uses 32..128)"
            )
        if context:
            for flag, value in (("--max_length", self.args.max_length), ("--max_new_tokens", values["max_new_tokens"])):
                if value is not None and value > context:
                    self.problems.append(
                        f"{flag} {value} exceeds the model context of {context} tokens; pass at most {context}"
                    )

    def check_output(self, output_dir: str) -> None:
        """The output folder: writable, no other run in it, no overlap with data or model (reads only)."""
        self.problems.extend(_output_problems(self.args, output_dir))
        # output_dir_problems judges the folder (a run in it, --resume, --overwrite_output_dir): the training
        # helper's narrower "already holds checkpoints" must not refuse an --overwrite_output_dir it allowed.
        self.reported.add("output_dir")

    def resolve_method(self) -> tuple[str, bool]:
        """``(method, freeze_vision)`` from --method, the recipe's --use_lora/--use_qlora/--freeze_vision_model."""
        args, problems = self.args, self.problems
        recipe_method = "qlora" if args.use_qlora else ("lora" if args.use_lora else None)
        if args.method is not None:
            if args.use_qlora and args.method != "qlora":
                problems.append(f"--use_qlora conflicts with --method {args.method}; drop one of them")
            elif args.use_lora and not _uses_lora(args.method):
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
        return method, bool(args.freeze_vision_model and _uses_lora(method))

    def resolve_precision(self) -> str:
        args, env = self.args, self.env
        if args.precision is not None:
            if args.bf16 and args.precision in PRECISION_NAMES and args.precision != "bf16":
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
        return precision  # judged by TrainConfig.problems (fp16 needs a GPU)

    def resolve_attn(self) -> str:
        args = self.args
        if args.attn is not None:
            if args.use_flash_attention and args.attn in ATTN_NAMES and args.attn != "flash_attention_2":
                self.problems.append(f"--use_flash_attention conflicts with --attn {args.attn}; drop one of them")
            attn, self.sources["attn"] = args.attn, "flag"
        elif args.use_flash_attention:
            attn, self.sources["attn"] = "flash_attention_2", "flag"
        else:
            attn, self.sources["attn"] = DEFAULT_ATTN, "default"
        if attn == "flash_attention_2" and not self.env.cuda:
            flag = "--attn flash_attention_2" if args.attn else "--use_flash_attention"
            self.problems.append(
                f"{flag} needs a CUDA GPU (Ampere or newer) with flash-attn; drop it here (--attn sdpa is the default)"
            )
            self.reported.add("attn")
        return attn

    def resolve_numbers(self) -> dict[str, Any]:
        values = {name: self.pick(name, default) for name, default in {**RECIPE_DEFAULTS, **OUR_DEFAULTS}.items()}
        # num_crops and the batch sizes are judged by TrainConfig.problems, in flag terms
        values["num_crops"] = self.pick("num_crops", None)
        if values["num_crops"] is None:
            self.sources["num_crops"] = "task"
        workers = self.args.num_workers
        values["num_workers"] = workers if workers is not None else (4 if self.env.cuda else 0)
        self.sources["num_workers"] = "flag" if workers is not None else "auto"
        return values

    def check_together(self, method: str, values: dict[str, Any]) -> None:
        """Settings that are each valid but wrong together, checked after resolution.

        * A preset's learning rate belongs to its method: ``--preset docvqa-lora --method full`` would train full
          fine-tuning at the LoRA rate (40x too high), so it is refused unless ``--learning_rate`` is given, or the
          task's preset for that method has the same rate (LoRA and QLoRA do).
        * Warm-up must end before ``--max_steps``: a default warm-up longer than the run is shortened to a tenth of
          the steps (with a note); an explicit ``--warmup_steps`` that long is refused.
        """
        preset = self.preset
        if preset is not None and method != preset.method and self.sources.get("learning_rate") == "preset":
            same_task = RECIPE_PRESETS.get(f"{preset.task}-{method}")
            if same_task is None or same_task.values.get("learning_rate") != preset.values.get("learning_rate"):
                suggestion = f"use --preset {preset.task}-{method}" if same_task else "drop --preset"
                self.problems.append(
                    f"--preset {self.args.preset} sets the learning rate for --method {preset.method} "
                    f"({preset.values.get('learning_rate')}), not for --method {method}; {suggestion}, or pass "
                    "--learning_rate to choose the rate yourself"
                )
        max_steps, warmup = values["max_steps"], values["warmup_steps"]
        if isinstance(max_steps, int) and isinstance(warmup, int) and 0 < max_steps <= warmup:
            if self.sources.get("warmup_steps") == "flag":
                self.problems.append(
                    f"--warmup_steps {warmup} is not below --max_steps {max_steps}: the learning rate would never "
                    f"leave warm-up; pass --warmup_steps below {max_steps} (e.g. {max_steps // 10})"
                )
                self.reported.add("warmup_steps")
            else:
                values["warmup_steps"] = max_steps // 10
                self.sources["warmup_steps"] = "clamped"
                self.notes.append(
                    f"warm-up shortened from {warmup} to {max_steps // 10} steps (a tenth of --max_steps {max_steps}) "
                    "so the learning rate leaves warm-up; pass --warmup_steps to choose"
                )

    def check_retention(self, train_cfg: Any) -> None:
        """Refuse a layout that cannot apply its updates (predicted retention below 50 %) unless
        ``--allow_low_retention``, which turns the refusal into a note: bf16 weights without an fp32 master copy
        lose every step shorter than half their last bit (:mod:`phi3v_core.retention`)."""
        from phi3v_core.retention import RETENTION_FLOOR

        if train_cfg.method not in METHOD_NAMES or not train_cfg.learning_rate > 0:
            return  # reported elsewhere
        retention = train_cfg.update_retention(self.env.world_size)
        if retention >= RETENTION_FLOOR:
            return
        what = (
            f"--optim {train_cfg.optim} stores the {train_cfg.method} weights in bf16: at --learning_rate "
            f"{train_cfg.learning_rate:g} a step changes only {retention:.0%} of them (smaller steps round away)"
        )
        if getattr(self.args, "allow_low_retention", False):
            self.notes.append(f"{what}; training anyway (--allow_low_retention)")
            return
        self.problems.append(
            f"{what}; use --optim adamw_8bit_fp32_master (fp32 weights, 10 bytes per parameter) or adamw, or pass "
            "--allow_low_retention to train anyway"
        )

    def add_train_config_problems(self, train_cfg: Any) -> None:
        """The training helper's own checks (environment, model folder, checkpoints), phrased with our flags."""
        for problem in train_cfg.problems(self.env, names=_FIELD_FLAGS):
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
        env: :class:`~phi3v_core.training.Machine` (detected when omitted; tests pass fakes).

    Returns:
        The resolved :class:`FinetuneConfig`.

    Raises:
        ConfigError: Every problem with the flags on this machine, in one message.
    """
    if env is None:
        raise_all(_early_problems(args))
        from phi3v_core.software import torch_gpu_refusal

        # before anything else (even importing the training stack: tens of seconds on a busy host): every later
        # check (bf16, flash attention, memory) would judge the CPU instead of the GPU
        refusal = torch_gpu_refusal()
        if refusal:
            raise ConfigError(refusal)
    from phi3v_core.training import Machine, TrainConfig

    resolver = _Resolver(args, env or Machine.detect())
    resolver.resolve_preset()
    task = resolver.resolve_task()
    resolver.check_data(task)
    model = resolver.resolve_model()
    method, freeze_vision = resolver.resolve_method()
    precision = resolver.resolve_precision()
    attn = resolver.resolve_attn()
    values = resolver.resolve_numbers()
    trainer_fields = trainer_values(args, values, resolver.env.world_size, resolver.problems)
    resolver.check_together(method, values)
    resolver.check_sizes(model, values, method)
    resolver.check_output(values["output_dir"])

    train_cfg = TrainConfig(
        model=model,
        method=method,  # an unknown method, precision or attn is named by TrainConfig.problems
        precision=precision,
        attn=attn,
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
    resolver.add_train_config_problems(train_cfg)
    resolver.check_retention(train_cfg)
    raise_all(dict.fromkeys(resolver.problems))  # dedupe, keep order

    return _finetune_config(args, task, train_cfg, values, resolver)


def _finetune_config(
    args: argparse.Namespace, task: str, train_cfg: Any, values: dict[str, Any], resolver: _Resolver
) -> FinetuneConfig:
    """The run around the validated ``TrainConfig``: data, evaluation, output and where each setting came from."""
    synthetic_eval = None
    if args.synthetic is not None:
        synthetic_eval = args.eval_limit or max(1, min(args.synthetic // 4, 16))
    from phi3v_core.training.run import FinetuneConfig

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
        overwrite_output_dir=args.overwrite_output_dir,
        max_length=args.max_length or resolver.context,
        force=getattr(args, "force", False),
    )


def _uses_lora(method: str) -> bool:
    """Whether ``method`` is a registered adapter method (an unknown name is reported elsewhere)."""
    spec = METHODS.get(method)
    return spec is not None and spec.uses_lora
