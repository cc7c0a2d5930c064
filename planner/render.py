"""Text the plan shows: the launch command, the breakdown summary and the recipe's reasons for a method.

The preference order and the accuracy each reason quotes come from ``phi3v_core/recipe.json`` (its
``method_preference`` and its published DocVQA ANLS rows), so no number is typed twice.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from phi3v_core.methods import get_method
from phi3v_core.reference import reference_rows
from planner.memory_types import MemoryEstimate
from planner.request import Hardware, MethodPlan, task_profiles

__all__ = ["MODEL_PLACEHOLDER", "command", "method_preference", "published_anls", "top_items", "why_method"]

#: Shell placeholder for the model folder: expands to $PHI3V_MODEL, or stops the command with this message.
MODEL_PLACEHOLDER = '"${PHI3V_MODEL:?set PHI3V_MODEL or pass --model_name_or_path: the Phi-3.5-vision-instruct folder}"'


@cache
def method_preference() -> tuple[str, ...]:
    """The recipe's order of preference (quality first), from ``recipe.json``'s ``method_preference``."""
    raw = json.loads(resources.files("phi3v_core").joinpath("recipe.json").read_text(encoding="utf-8"))
    return tuple(raw["method_preference"]["order"])


def published_anls(method: str) -> float | None:
    """The recipe's bf16 DocVQA ANLS of ``method`` (its accuracy table in ``recipe.json``)."""
    for row in reference_rows("accuracy"):
        if (row["benchmark"], row["method"], row["precision"]) == ("docvqa", method, "bf16"):
            return float(row["value"])
    return None


def why_method(recommended: str, judged: Sequence[str] | None = None) -> str:
    """Why the recipe's order lands on ``recommended`` (with the published ANLS of it and of the methods above it).

    Methods above it that were not ``judged`` (left out by ``--method``) are named as such, never as not fitting.
    """
    order = method_preference()
    judged = order if judged is None else judged
    skipped = [m for m in order[: order.index(recommended)] if m not in judged]
    above = [m for m in order[: order.index(recommended)] if m in judged]
    score = published_anls(recommended)
    quoted = f"DocVQA ANLS {score:g}" if score is not None else "no published score"
    if skipped:
        not_judged = f"{', '.join(skipped)} not judged (left out by --method)"
        if not above:
            return f"{recommended} is the recipe's first choice among the methods asked ({quoted}); {not_judged}"
        verb = "does" if len(above) == 1 else "do"
        return f"{', '.join(above)} {verb} not fit; {recommended} is the next choice asked ({quoted}); {not_judged}"
    if not above:
        best_other = max((published_anls(m) or 0.0 for m in order[1:]), default=0.0)
        return f"the recipe's first choice: {recommended} fine-tuning ({quoted} vs {best_other:g} next best) fits"
    others = ", ".join(f"{m} {published_anls(m):g}" for m in above if published_anls(m) is not None)
    verb = "does" if len(above) == 1 else "do"
    return f"{', '.join(above)} {verb} not fit; {recommended} is the recipe's next choice ({quoted}; {others})"


def top_items(memory: MemoryEstimate, n: int = 4) -> str:
    """The ``n`` largest parts of a breakdown, ``name GiB`` each."""
    items = sorted(memory.items, key=lambda i: i.bytes, reverse=True)[:n]
    return ", ".join(f"{i.name} {i.gib:.1f}" for i in items)


def _method_args(task: str, mp: MethodPlan, data_dir: str | None = None, skip_bad: bool = False) -> list[str]:
    hp: dict[str, Any] = mp.hyperparameters
    args = ["--task", task, *(["--data_dir", data_dir] if data_dir else []), "--method", mp.method]
    if mp.precision == "bf16":
        args.append("--bf16")
    else:
        args += ["--precision", mp.precision]
    if mp.attn == "flash_attention_2":
        args.append("--use_flash_attention")
    else:
        args += ["--attn", mp.attn]
    args += ["--batch_size", str(mp.global_batch), "--batch_size_per_gpu", str(mp.micro_batch)]
    args += ["--num_crops", str(hp["num_crops"])]
    args += ["--learning_rate", f"{hp['learning_rate']:g}", "--num_train_epochs", f"{hp['epochs']:g}"]
    if "warmup_steps" in hp and hp["warmup_steps"] != _recipe_warmup():
        args += ["--warmup_steps", str(hp["warmup_steps"])]
    if get_method(mp.method).uses_lora:
        args += ["--lora_rank", str(hp["lora_rank"]), "--lora_alpha_ratio", f"{hp['lora_alpha_ratio']:g}"]
    # memory layout: only what differs from phi3v-finetune's defaults (checkpointing on, AdamW, no offload)
    if not mp.gradient_checkpointing or mp.checkpoint_towers != "both":
        args += ["--gradient_checkpointing", mp.checkpoint_towers if mp.gradient_checkpointing else "off"]
    if mp.optim != "adamw":
        args += ["--optim", mp.optim]
    if mp.offload != "none":
        args += ["--offload", mp.offload]
    packing = next((lay.packing for lay in mp.layouts if lay.chosen), None)
    if packing:  # planner.packing: predicted to pay on these lengths
        args += ["--packing", *(["--pack_tokens", str(packing["pack_tokens"])] if packing["pack_tokens"] else [])]
    if data_dir and skip_bad:
        args.append("--skip_bad")  # the plan left out the folder's bad records; training must too
    if data_dir and not any(Path(data_dir).glob("*_val.jsonl")):
        args.append("--no_eval")  # finetune evaluates on *_val.jsonl before and after; without one it would refuse
    if mp.data_loading is not None:  # enough DataLoader workers to feed the GPU at the predicted speed
        args += ["--dataloader_num_workers", str(mp.data_loading.workers)]
    name = Path(data_dir).name if data_dir else task
    args += ["--output_dir", f"./output/{name}-{mp.method}"]
    return args


def _recipe_warmup() -> int:
    """phi3v-finetune's default warm-up (the recipe's fixed ``TrainingArguments`` value)."""
    return int(task_profiles()["common"]["warmup_steps"])


def command(
    hw: Hardware,
    task: str,
    mp: MethodPlan,
    model_path: str | None = None,
    data_dir: str | None = None,
    skip_bad: bool = False,
) -> str:
    """The exact launch command for ``phi3v-finetune`` (names the model folder, or a placeholder that fails clearly).

    With ``data_dir`` (``phi3v-plan --data``) it trains that folder, as the task finetune reads it as (``jsonl``, or
    the task a converted folder was written for).
    """
    model = shlex.quote(model_path) if model_path else MODEL_PLACEHOLDER
    if data_dir:
        from phi3v_core.data.task_registry import task_of_folder  # only with --data (phi3v_core.data loads torch)

        task = task_of_folder(data_dir)
    args = _method_args(task, mp, data_dir, skip_bad)
    # the placeholder stays unquoted by shlex so the shell expands it (or stops with its message)
    model_arg = f"--model_name_or_path {model}"
    if hw.world_size == 1:
        return " ".join(["phi3v-finetune", model_arg, shlex.join(args)])
    launcher = ["torchrun", f"--nproc_per_node={hw.gpus_per_node}"]
    if hw.nodes > 1:
        launcher += [
            f"--nnodes={hw.nodes}",
            "--node_rank=$NODE_RANK",
            "--master_addr=$MASTER_ADDR",
            "--master_port=29500",
        ]
    # $NODE_RANK / $MASTER_ADDR stay unquoted so the shell expands them on each node
    return " ".join([*launcher, "-m", "phi3v_core.cli.finetune", model_arg, shlex.join(args)])
