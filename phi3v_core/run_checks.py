"""What a ``phi3v-finetune`` run asks of its settings beyond :class:`~phi3v_core.training.TrainConfig`: the preset and
the data it trains on, the model and data folders, lengths and LoRA rank against the model, the schedule, the output
folder, flash attention on this machine and update retention.

:meth:`phi3v_core.training.run.FinetuneConfig.problems` calls every check here together with ``TrainConfig.problems``:
one validation, every problem at once. Torch-free, so the command can ask the ones that read only flags and folders
before torch is imported (a mistyped folder answers in a second). Messages name the command's flags.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from phi3v_core.constants import MODEL_PRESET_NAMES, is_model_preset, load_recipe
from phi3v_core.errors import did_you_mean
from phi3v_core.methods import METHOD_NAMES, METHODS
from phi3v_core.preset_files import preset_dims
from phi3v_core.run_folder import output_dir_problems

__all__ = [
    "TASK_NAMES",
    "data_problems",
    "flash_problems",
    "in_flag_terms",
    "is_hub_id",
    "low_retention",
    "model_dims",
    "model_problems",
    "output_problems",
    "preset_problems",
    "schedule_problems",
    "size_problems",
    "uses_lora",
]

TASK_NAMES = ("docvqa", "nlvr2", "hateful_memes", "ucf101", "jsonl")
#: Tasks whose recipe data is a Hugging Face dataset (read when no --data_dir or --synthetic is given).
_HUB_TASKS = ("docvqa", "nlvr2", "hateful_memes")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(value: str) -> bool:
    """``value`` is spelled like a Hugging Face Hub id (``owner/name``), not a local path."""
    return bool(_HUB_ID_RE.match(value))


def uses_lora(method: str) -> bool:
    """Whether ``method`` is a registered adapter method (an unknown name is reported by ``TrainConfig.problems``)."""
    spec = METHODS.get(method)
    return spec is not None and spec.uses_lora


def preset_problems(preset: str | None) -> list[str]:
    """An unknown ``--preset`` name."""
    presets = load_recipe().presets
    if preset is None or preset in presets:
        return []
    return [
        f"unknown preset {preset!r}{did_you_mean(preset, list(presets))}; "
        f"choose one of {', '.join(presets)} (phi3v-finetune --list-presets)"
    ]


def data_problems(
    task: str,
    *,
    data_dir: str | None,
    synthetic: int | None,
    full_train: bool,
    counts: Mapping[str, int | None] | None = None,
) -> list[str]:
    """The task and where its data comes from, the data folder included.

    Args:
        task: The task name.
        data_dir: ``--data_dir``.
        synthetic: ``--synthetic`` records.
        full_train: ``--full_train``.
        counts: Flag name (without ``--``) → a count that must be >= 1 when given (``eval_limit``, ...).
    """
    problems = []
    if task not in TASK_NAMES:
        problems.append(f"unknown task {task!r}{did_you_mean(task, TASK_NAMES)}; choose one of {', '.join(TASK_NAMES)}")
    if synthetic is not None and synthetic < 1:
        problems.append(f"--synthetic must be >= 1 records (got {synthetic})")
    if synthetic is not None and task == "jsonl":
        problems.append("--task jsonl has no synthetic twin; pass --data_dir, or --synthetic with another task")
    if data_dir is None and synthetic is None and task in ("ucf101", "jsonl"):
        hint = ", e.g. from phi3v-convert ucf101" if task == "ucf101" else ""
        twin = " or --synthetic N" if task == "ucf101" else ""
        problems.append(
            f"--task {task} needs --data_dir (a folder with *_train.jsonl, *_val.jsonl and images/{hint}){twin}"
        )
    if full_train and task in TASK_NAMES and task != "docvqa":
        problems.append(f"--full_train applies to --task docvqa only, not {task}")
    if data_dir is None and synthetic is None and task in _HUB_TASKS and importlib.util.find_spec("datasets") is None:
        problems.append(
            f"--task {task} without --data_dir loads the recipe's Hugging Face dataset, which needs the "
            "'datasets' package (pip install datasets) and a download; or pass --data_dir DIR or --synthetic N"
        )
    for name, value in (counts or {}).items():
        if value is not None and value < 1:
            problems.append(f"--{name} must be >= 1 (got {value})")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        problems.append(f"--data_dir {data_dir}: no such folder")
    return problems


def model_problems(model: str) -> list[str]:
    """A model that is neither a preset nor a local folder (a Hub id is never downloaded). A folder's config and
    weight headers are judged by ``TrainConfig.problems``."""
    if is_model_preset(model) or Path(model).expanduser().is_dir():
        return []
    if is_hub_id(model):
        return [
            f"--model_name_or_path {model} is a Hugging Face Hub id and phi3v-finetune does not download models; "
            f"download it first (huggingface-cli download {model} --local-dir DIR) and pass that local folder, "
            f"or use a preset ({', '.join(MODEL_PRESET_NAMES)})"
        ]
    return [
        f"--model_name_or_path {model}: no such folder; pass a local checkpoint folder (config.json + *.safetensors) "
        f"or a preset ({', '.join(MODEL_PRESET_NAMES)})"
    ]


def model_dims(model: str, *, light: bool = False) -> tuple[int | None, int | None]:
    """``(hidden_size, context_length)`` of a preset or a checkpoint folder's config.json (``None`` if unknown).

    ``light``: import no transformers (a command's first answer): the built-in presets' sizes come from the shipped
    records, a preset registered at run time stays unknown until the second answer.
    """
    if is_model_preset(model):
        if light:
            return preset_dims(model)
        from phi3v_core.config import get_config  # imports transformers: asked after torch is loaded

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


def size_problems(
    model: str, method: str, lora_rank: int, *, max_length: int | None, max_new_tokens: int | None,
    light: bool = False,
) -> list[str]:
    """LoRA rank within the model's hidden size; lengths within its context (read from its config, nothing loads;
    ``light``: as :func:`model_dims`)."""
    hidden, context = model_dims(model, light=light)
    problems = []
    if uses_lora(method) and hidden and lora_rank > hidden:
        problems.append(
            f"--lora_rank {lora_rank} exceeds the model's hidden size {hidden}; pass --lora_rank <= {hidden} "
            "(the recipe uses 32..128)"
        )
    if context:
        for flag, value in (("--max_length", max_length), ("--max_new_tokens", max_new_tokens)):
            if value is not None and value > context:
                problems.append(f"{flag} {value} exceeds the model context of {context} tokens; pass at most {context}")
    return problems


def schedule_problems(max_steps: int, warmup_steps: int) -> list[str]:
    """Warm-up must end before ``--max_steps`` (a default warm-up that long was already shortened, with a note)."""
    if 0 < max_steps <= warmup_steps:
        return [
            f"--warmup_steps {warmup_steps} is not below --max_steps {max_steps}: the learning rate would never "
            f"leave warm-up; pass --warmup_steps below {max_steps} (e.g. {max_steps // 10})"
        ]
    return []


def output_problems(
    output_dir: str, *, resume: str | None, overwrite: bool, data_dir: str | None, model: str
) -> list[str]:
    """Why the run may not write ``output_dir``: another run in it, files it would overwrite, an overlap with the data
    or the model, not writable (:func:`phi3v_core.run_folder.output_dir_problems`; reads only)."""
    sources = {"--data_dir": data_dir, "--model_name_or_path": None if is_model_preset(model) else model}
    return output_dir_problems(output_dir, resume=resume, overwrite=overwrite, sources=sources)


def flash_problems(attn: str, cuda: bool, spelling: str) -> list[str]:
    """Flash attention on a machine without CUDA (``spelling``: the flag that asked for it)."""
    if attn == "flash_attention_2" and not cuda:
        return [
            f"{spelling} needs a CUDA GPU (Ampere or newer) with flash-attn; drop it here (--attn sdpa is the default)"
        ]
    return []


def low_retention(train: Any, world_size: int) -> str | None:
    """Why ``train`` (a TrainConfig) cannot apply its updates (predicted retention below 50 %), or None.

    bf16 weights without an fp32 master copy lose every step shorter than half their last bit
    (:mod:`phi3v_core.retention`).
    """
    from phi3v_core.retention import RETENTION_FLOOR

    if train.method not in METHOD_NAMES or not train.learning_rate > 0:
        return None  # reported by TrainConfig.problems
    retention = train.update_retention(world_size)
    if retention >= RETENTION_FLOOR:
        return None
    return (
        f"--optim {train.optim} stores the {train.method} weights in bf16: at --learning_rate "
        f"{train.learning_rate:g} a step changes only {retention:.0%} of them (smaller steps round away)"
    )


def in_flag_terms(problems: Iterable[str], names: Mapping[str, str], judged: Iterable[str] = ()) -> list[str]:
    """``TrainConfig.problems`` phrased with the command's flags: a message that opens with a field name opens with
    its flag instead; one about a field in ``judged`` (already said by a check here, in flag terms) is dropped."""
    fields = sorted({*(n for n in names if n.isidentifier()), *judged}, key=len, reverse=True)
    if not fields:
        return list(problems)
    pattern = re.compile(r"^(" + "|".join(fields) + r")\b")
    judged = set(judged)
    out = []
    for problem in problems:
        match = pattern.match(problem)
        if match and match.group(1) in judged:
            continue
        if names:
            problem = pattern.sub(lambda m: names.get(m.group(1), m.group(1)), problem, count=1)
            problem = problem.replace("resume='latest'", "--resume")
        out.append(problem)
    return out
