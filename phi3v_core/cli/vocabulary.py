"""One vocabulary for the four commands: the table of shared flags every command builds its arguments from.

A concept that more than one command takes (the model, HD crops, steps, batch sizes, the output folder, the seed...)
has one primary spelling, the Hugging Face ``TrainingArguments`` / CookBook recipe name where one exists, and its
older spellings as aliases registered in the same ``add_argument`` call, so existing scripts keep working.
``tests/test_vocabulary.py`` fails when two commands spell one concept differently.

Policies stated here once:

* ``--overwrite_output_dir`` replaces what an output folder already holds (``--overwrite``, the older spelling, means
  the same); ``--force`` runs where the planner predicts the run does not fit (in ``phi3v-bench``, where it is older,
  it also still replaces a stored result);
* ``--seed`` defaults to :data:`DEFAULT_SEED` (42, ``TrainingArguments``' default) in every command;
* throughput is ``img/s`` (images per second over all GPUs, the recipe's published unit) in every text; a plan for a
  task with several images per sample converts its samples/s.

Torch-free: ``phi3v-plan`` imports it and must stay light.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_SEED",
    "SHARED_FLAGS",
    "THROUGHPUT_UNIT",
    "SharedFlag",
    "add_shared",
    "add_version",
    "on_off",
    "plural",
    "shared_flags_markdown",
    "version",
]

#: The seed every command uses when ``--seed`` is not given (``transformers.TrainingArguments``' default).
DEFAULT_SEED = 42
#: The one name of the throughput unit in every command's text.
THROUGHPUT_UNIT = "img/s"


@dataclass(frozen=True)
class SharedFlag:
    """One concept several commands take.

    Attributes:
        concept: Short name of the concept (the table's key).
        spellings: The primary spelling first, then the accepted aliases (older spellings).
        meaning: What the flag sets, in a few words (the README's table).
        commands: The commands that take it.
    """

    concept: str
    spellings: tuple[str, ...]
    meaning: str
    commands: tuple[str, ...]

    @property
    def primary(self) -> str:
        """The spelling help texts, messages and documentation use."""
        return self.spellings[0]

    @property
    def aliases(self) -> tuple[str, ...]:
        """The other accepted spellings."""
        return self.spellings[1:]


_FT, _BENCH, _PLAN, _CONVERT = "phi3v-finetune", "phi3v-bench", "phi3v-plan", "phi3v-convert"

#: The shared flags, by concept. The order is the README table's.
SHARED_FLAGS: dict[str, SharedFlag] = {
    flag.concept: flag
    for flag in (
        SharedFlag("model", ("--model_name_or_path", "--model", "--model-path", "--model_path"),
                   "model preset or local checkpoint folder", (_FT, _BENCH, _PLAN)),
        SharedFlag("task", ("--task",), "task (docvqa, nlvr2, hateful_memes, ucf101, jsonl)", (_FT, _PLAN, _CONVERT)),
        SharedFlag("data_dir", ("--data_dir", "--data"), "your jsonl data folder", (_FT, _PLAN)),
        SharedFlag("method", ("--method",), "fine-tuning method", (_FT, _BENCH, _PLAN)),
        SharedFlag("attn", ("--attn", "--attention"), "attention kernel", (_FT, _BENCH)),
        SharedFlag("precision", ("--precision",), "mixed precision", (_FT, _BENCH)),
        SharedFlag("num_crops", ("--num_crops", "--num-crops"), "HD crops per image, 1..16", (_FT, _BENCH, _PLAN)),
        SharedFlag("global_batch", ("--batch_size", "--global-batch", "--global_batch", "--batch-size"),
                   "global batch per optimizer step (all GPUs, all micro-steps)", (_FT, _BENCH, _PLAN)),
        SharedFlag("micro_batch", ("--per_device_train_batch_size", "--batch_size_per_gpu", "--micro-batch",
                                   "--micro_batch"), "micro-batch per GPU", (_FT, _BENCH)),
        SharedFlag("max_steps", ("--max_steps", "--steps", "--max-steps"), "optimizer steps", (_FT, _BENCH)),
        SharedFlag("learning_rate", ("--learning_rate", "--learning-rate"), "peak learning rate", (_FT, _BENCH)),
        SharedFlag("seed", ("--seed",), f"random seed (default {DEFAULT_SEED} everywhere)", (_FT, _BENCH, _CONVERT)),
        SharedFlag("gpus", ("--gpus", "--count", "--nproc_per_node"), "GPUs per node", (_BENCH, _PLAN)),
        SharedFlag("nodes", ("--nodes", "--nnodes"), "nodes", (_BENCH, _PLAN)),
        SharedFlag("gradient_checkpointing", ("--gradient_checkpointing", "--gradient-checkpointing"),
                   "recompute activations in backward: both (on), llm, vision or off", (_FT, _BENCH)),
        SharedFlag("optim", ("--optim",), "optimizer", (_FT, _BENCH)),
        SharedFlag("offload", ("--offload",), "DeepSpeed offload", (_FT, _BENCH)),
        SharedFlag("output_dir", ("--output_dir", "--out_dir", "--out"), "where the command writes", (_FT, _BENCH, _CONVERT)),
        SharedFlag("overwrite", ("--overwrite_output_dir", "--overwrite"),
                   "replace what the output folder already holds", (_FT, _BENCH, _CONVERT)),
        SharedFlag("force", ("--force",), "run even where the planner predicts it does not fit this machine's memory",
                   (_FT, _BENCH)),
        SharedFlag("skip_bad", ("--skip_bad", "--skip-bad"), "skip records with unreadable images", (_FT, _CONVERT, _PLAN)),
        SharedFlag("max_length", ("--max_length", "--max-length"), "longest sequence in tokens", (_FT, _CONVERT)),
        SharedFlag("repeats", ("--repeats",), "measured repeats", (_BENCH, _PLAN)),
        SharedFlag("json", ("--json",), "one JSON object on stdout", (_FT, _BENCH, _PLAN, _CONVERT)),
        SharedFlag("version", ("--version",), "print the version and exit", (_FT, _BENCH, _PLAN, _CONVERT)),
    )
}


def add_shared(container: Any, concept: str, *, aliases: tuple[str, ...] | None = None, **kwargs: Any) -> argparse.Action:
    """Add the shared flag ``concept`` to a parser or argument group, spelled as the table says.

    Args:
        container: An ``ArgumentParser`` or argument group.
        concept: A key of :data:`SHARED_FLAGS`.
        aliases: A subset of the table's aliases where a spelling would clash with another flag of this command
            (default: all of them).
        **kwargs: ``add_argument`` keyword arguments (``dest`` keeps a command's attribute name).

    Returns:
        The argparse action.
    """
    flag = SHARED_FLAGS[concept]
    chosen = flag.aliases if aliases is None else aliases
    unknown = [a for a in chosen if a not in flag.aliases]
    if unknown:
        raise ValueError(f"{unknown} are not aliases of {flag.primary} in SHARED_FLAGS")
    kwargs.setdefault("dest", concept)
    return container.add_argument(flag.primary, *chosen, **kwargs)


def version() -> str:
    """The installed package version (``0+unknown`` from a source tree that was never installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("phi3v-bench")
    except PackageNotFoundError:
        return "0+unknown"


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version``: print ``PROG VERSION`` and exit 0."""
    add_shared(parser, "version", action="version", version=f"{parser.prog} {version()}", dest=argparse.SUPPRESS)


def on_off(text: str) -> bool:
    """An argparse ``type`` for ``on``/``off`` (also ``true``/``false``, ``1``/``0``)."""
    value = text.strip().lower()
    if value in ("on", "true", "1", "yes"):
        return True
    if value in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def plural(count: float, noun: str, many: str | None = None) -> str:
    """``"1 crop"``, ``"2 crops"``, ``"1 node"``: a count with its noun in the right number."""
    shown = f"{count:g}" if isinstance(count, float) else str(count)
    return f"{shown} {noun if count == 1 else (many or noun + 's')}"


def shared_flags_markdown() -> str:
    """The README's table of shared flags."""
    rows = ["| concept | flag | also accepted | commands |", "|---|---|---|---|"]
    for flag in SHARED_FLAGS.values():
        also = ", ".join(f"`{a}`" for a in flag.aliases) or "–"
        commands = ", ".join(c.removeprefix("phi3v-") for c in flag.commands)
        rows.append(f"| {flag.meaning} | `{flag.primary}` | {also} | {commands} |")
    return "\n".join(rows)
