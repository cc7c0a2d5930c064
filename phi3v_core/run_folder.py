"""What a run's output folder holds, and whether a new run may write it — torch-free, so the CLI answers at once.

:mod:`phi3v_core.training.run` takes the folder (lock, journaled replacement); this module only reads it, so
``phi3v-finetune`` can refuse a folder holding a run before torch and transformers are imported (seconds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi3v_core.fs import LOCK_NAME, foreign_entries, live_transaction, overlap_problem, writable_problem
from phi3v_core.transaction import PROOF_NAME, recover

__all__ = ["COMPLETE_MARKER", "MANIFEST_NAME", "RunFolder", "inspect_run_folder", "output_dir_problems"]

#: Written into a run folder by the main process once the final model is saved; its presence marks a complete run.
COMPLETE_MARKER = "run_complete.json"
#: Top-level names a run wrote (``overwrite_output_dir`` deletes only these).
MANIFEST_NAME = ".phi3v-manifest.json"
#: Names a run writes, for folders from before the manifest existed.
_RUN_NAMES = (
    "train_config.json", "trainer_state.json", "training_args.bin", "train_result.json", "eval_before.json",
    "eval_after.json", COMPLETE_MARKER, MANIFEST_NAME, LOCK_NAME, PROOF_NAME, "config.json", "generation_config.json",
    "model.safetensors", "model.safetensors.index.json", "adapter_config.json", "adapter_model.safetensors",
    "README.md", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "preprocessor_config.json", "processor_config.json", "chat_template.json",
    "chat_template.jinja", ".final-staging",
)  # fmt: skip
_RUN_PREFIXES = ("checkpoint-", "model-0", ".final-staging")
#: Files whose presence means "this folder holds a model or a run": never silently overwritten.
_WOULD_OVERWRITE = ("config.json", "model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                    "adapter_config.json", "train_config.json", "eval_before.json", "eval_after.json")  # fmt: skip


@dataclass
class RunFolder:
    """What an output folder holds.

    Attributes:
        path: The folder.
        exists: It exists (as a folder).
        has_run: It holds a phi3v run (``train_config.json`` or checkpoints).
        complete: The run finished (``run_complete.json``): ``{"global_step": N, ...}``.
        last_checkpoint: Step of the newest checkpoint folder (complete or not), or ``None``.
        foreign: Top-level names the run did not write (never deleted).
        would_overwrite: Files present that a new run would write over (a model folder, another run's results).
    """

    path: Path
    exists: bool = False
    has_run: bool = False
    complete: dict[str, Any] | None = None
    last_checkpoint: int | None = None
    foreign: list[str] = field(default_factory=list)
    would_overwrite: list[str] = field(default_factory=list)


def read_json_quietly(path: Path) -> Any:
    """The JSON in ``path``, or ``None`` where it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def inspect_run_folder(path: str | Path) -> RunFolder:
    """Look at an output folder without changing it."""
    folder = RunFolder(Path(path))
    if not folder.path.is_dir():
        return folder
    folder.exists = True
    names = [p.name for p in folder.path.iterdir()]
    steps = [int(n.removeprefix("checkpoint-")) for n in names if n.removeprefix("checkpoint-").isdigit()]
    folder.last_checkpoint = max(steps) if steps else None
    folder.has_run = "train_config.json" in names or bool(steps)
    folder.complete = read_json_quietly(folder.path / COMPLETE_MARKER) if COMPLETE_MARKER in names else None
    manifest = read_json_quietly(folder.path / MANIFEST_NAME)
    own = set(manifest.get("entries", [])) if isinstance(manifest, dict) else set()
    folder.foreign = foreign_entries(folder.path, own | set(_RUN_NAMES), _RUN_PREFIXES)
    folder.would_overwrite = sorted(n for n in names if n in _WOULD_OVERWRITE)
    return folder


def output_dir_problems(
    output_dir: str | Path,
    *,
    resume: str | None,
    overwrite: bool,
    sources: dict[str, str | None] | None = None,
    flag: str = "--output_dir",
) -> list[str]:
    """Why a run may not write ``output_dir`` (empty when it may). Reads only; call before anything loads.

    Args:
        output_dir: The run folder.
        resume: ``None``, ``"latest"`` or a checkpoint folder.
        overwrite: ``--overwrite_output_dir``.
        sources: Flag → folder the run reads (data, model): they may not overlap the output folder.
        flag: The flag naming the output folder, for messages.
    """
    out = Path(output_dir).expanduser()
    recover(out)  # what the folder holds after an interrupted transaction is finished or rolled back
    live = live_transaction(out)
    if live is not None:  # checked before the folder's content, which is half-way between two runs
        return [
            f"{flag} {out} is being replaced by pid {live.get('pid')} ({live.get('command')}): one writer per folder; "
            "wait for it to finish or choose another folder"
        ]
    problem = writable_problem(out, flag)
    if problem:
        return [problem]
    problems = []
    for source_flag, source in (sources or {}).items():
        if source and Path(source).expanduser().exists():
            overlap = overlap_problem(Path(source), out, source_flag, flag)
            if overlap:
                problems.append(overlap)
    folder = inspect_run_folder(out)
    if not folder.exists:
        return problems
    if overwrite and resume is not None:
        problems.append(f"--resume continues the run in {out} and --overwrite_output_dir replaces it; drop one of them")
    elif overwrite:
        if folder.foreign:
            shown = ", ".join(folder.foreign[:5]) + (", ..." if len(folder.foreign) > 5 else "")
            problems.append(
                f"{flag} {out} holds files phi3v-finetune did not write ({shown}); --overwrite_output_dir replaces "
                "only a run's own folder: move them away or choose another {flag}".replace("{flag}", flag)
            )
    elif resume is not None:
        if folder.complete is not None and resume == "latest":
            pass  # reported by the run as "complete, nothing to do" (not an error)
        elif not folder.has_run and any(folder.path.iterdir()) and folder.would_overwrite:
            problems.append(
                f"{flag} {out} holds no phi3v run to resume but has {', '.join(folder.would_overwrite)}; "
                f"choose the run's folder or another {flag}"
            )
    elif folder.has_run:
        state = (
            f"a complete run (step {folder.complete.get('global_step')})"
            if isinstance(folder.complete, dict)
            else "an unfinished run" + (f" (checkpoint {folder.last_checkpoint})" if folder.last_checkpoint else "")
        )
        # A complete run cannot be continued (its step count is part of its configuration): only point at --resume
        # where there is something left to train.
        remedy = "" if isinstance(folder.complete, dict) else "pass --resume to continue it, "
        problems.append(
            f"{flag} {out} already holds {state}; {remedy}pass --overwrite_output_dir to replace it, or choose "
            f"another {flag}"
        )
    elif folder.would_overwrite:
        problems.append(
            f"{flag} {out} holds {', '.join(folder.would_overwrite)}, which the run would overwrite (a model "
            f"folder?); choose an empty or new {flag}"
        )
    return problems
