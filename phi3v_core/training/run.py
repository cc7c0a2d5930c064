"""One ``phi3v-finetune`` run: distributed set-up, data, eval before, training, eval after — and its output folder.

The CLI (:mod:`phi3v_core.cli.finetune`) parses and resolves flags into a :class:`FinetuneConfig` and prints; this
module runs it. :mod:`phi3v_core.training.launch` shares the output-folder guard.

Output-folder rules (issue #11):

* one writer per folder: a kernel lock names the holder (:class:`phi3v_core.fs.FolderLock`), released when it dies;
* a folder holding a run is refused unless ``resume`` (continue it) or ``overwrite_output_dir`` (replace it): the old
  run is moved aside in a journaled transaction (:mod:`phi3v_core.transaction`), the new one written, and the old one
  deleted only when the new one finished (restored when the new one fails or is killed); files this command did not
  write are never deleted (the folder is refused instead);
* a folder holding files the run would overwrite (e.g. a model folder) is refused;
* a complete run (``run_complete.json``) is never trained further by ``resume``: the run says so and does nothing.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi3v_core import run_checks
from phi3v_core.constants import MODEL_PRESET_NAMES
from phi3v_core.device import local_device
from phi3v_core.errors import raise_all
from phi3v_core.fs import LOCK_NAME, FolderLock, pending
from phi3v_core.io import atomic_write_json
from phi3v_core.progress import stage

# The folder's judgment is torch-free (the CLI asks it before torch is imported).
from phi3v_core.run_folder import COMPLETE_MARKER, MANIFEST_NAME, inspect_run_folder, read_json_quietly
from phi3v_core.transaction import SetAside, recover

__all__ = [
    "FinetuneConfig",
    "guarded_output_dir",
    "is_main_process",
    "run",
]

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
        overwrite_output_dir: Replace a run already in the output folder (moved aside, deleted after success).
        force: Train even where the planner predicts the run does not fit this machine's memory.
        max_length: Longest training sequence in tokens (``None``: the model context); longer records are an
            error naming them (never truncated, so no record loses its supervised tokens).
        allow_low_retention: Train even where a step changes under half the weights (a note instead of a refusal).
        flags: ``TrainConfig`` field → the command's flag, so every message names what the user typed (empty: field
            names). ``attn=flash_attention_2`` names the flag that asked for flash attention.
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
    overwrite_output_dir: bool = False
    max_length: int | None = None
    force: bool = False
    allow_low_retention: bool = False
    flags: dict[str, str] = field(default_factory=dict)

    def problems(self, env: Any, *, light: bool = False) -> list[str]:
        """Every problem with this run on this machine (empty when it can run): ``TrainConfig.problems`` and the
        run's own checks (:mod:`phi3v_core.run_checks`: preset, data, folders, sizes, schedule, output folder, flash
        attention, retention), in flag terms. Reads only; nothing is loaded or written.

        Args:
            env: The machine (:class:`~phi3v_core.training.Machine`; :meth:`Machine.unprobed
                <phi3v_core.training.machine.Machine.unprobed>`: the checks that need the GPU wait).
            light: Import neither torch nor transformers (the command's first answer): the built-in presets' sizes
                come from the shipped records, those of a preset registered at run time wait.
        """
        train, flags = self.train, self.flags
        model = run_checks.model_problems(train.model)
        spelling = flags.get("attn=flash_attention_2", "attn flash_attention_2")
        flash = run_checks.flash_problems(train.attn, env.cuda, spelling) if env.probed else []
        schedule = run_checks.schedule_problems(train.max_steps, train.warmup_steps)
        counts = {name: getattr(self, name) for name in ("eval_limit", "max_new_tokens", "eval_batch_size")}
        out = [
            *run_checks.preset_problems(self.preset),
            *run_checks.data_problems(
                self.task, data_dir=self.data_dir, synthetic=self.synthetic, full_train=self.full_train, counts=counts
            ),
            *model,
            *flash,
            *schedule,
            *run_checks.size_problems(
                train.model, train.method, train.lora_rank,
                max_length=self.max_length, max_new_tokens=self.max_new_tokens, light=light,
            ),
            *run_checks.output_problems(
                train.output_dir, resume=train.resume, overwrite=self.overwrite_output_dir, data_dir=self.data_dir,
                model=train.model,
            ),
        ]
        # The run's output-folder rule replaces TrainConfig's narrower "already holds checkpoints" (which would refuse
        # an --overwrite_output_dir the rule allows); the fields said above in flag terms are not said twice.
        said = {"model": model, "attn": flash, "warmup_steps": schedule}
        judged = {"output_dir", *(name for name, problems in said.items() if problems)}
        out += run_checks.in_flag_terms(train.problems(env, names=flags), flags, judged)
        retention = run_checks.low_retention(train, env.world_size)
        if retention and not self.allow_low_retention:
            out.append(
                f"{retention}; use --optim adamw_8bit_fp32_master (fp32 weights, 10 bytes per parameter) or adamw, "
                "or pass --allow_low_retention to train anyway"
            )
        return out


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Global rank 0 (or no launcher): the process that writes files and prints."""
    return _rank() == 0


# -- the output folder ----------------------------------------------------------------------------------------------


def _lock_at(lock: FolderLock, folder: Path) -> None:
    """Take ``lock`` on the hidden new folder of a replacement, before that folder is put in place."""
    lock.moved_to(folder)
    lock.acquire(recovering=False)


def _own_entries(folder: Path, before: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in before and p.name != LOCK_NAME)


@contextlib.contextmanager
def guarded_output_dir(
    output_dir: str | Path, *, command: str, overwrite: bool = False, resume: str | None = None
) -> Iterator[Path]:
    """Hold the output folder for one run (main process; other ranks just yield).

    First finishes or rolls back a transaction a killed command left on the folder. Takes the lock; with
    ``overwrite`` moves the old run aside as a journaled transaction (:class:`phi3v_core.transaction.SetAside`):
    deleted only when the block succeeds, restored when it fails, and — after a SIGKILL or power loss — restored by
    the next command unless the new run had finished. A symlinked folder is written through (the link is kept).
    Records what the run wrote in the manifest.

    Raises:
        StorageError: Another writer holds the folder, or it cannot be written.
    """
    out = Path(output_dir).expanduser()
    if not is_main_process():
        yield out
        return
    if out.is_symlink():
        out = out.resolve()  # replace the real folder, never the link with a real folder
    recover(out)
    aside: SetAside | None = None
    lock = FolderLock(out, command)
    if overwrite and out.is_dir() and any(out.iterdir()):
        # One lock across the whole replacement: the old run's lock is held until the new (hidden, already locked)
        # folder has taken its place, so no other writer can slip in between.
        old_lock = FolderLock(out, command).acquire()  # refuse if another writer works in the old run
        try:
            aside = SetAside(out, command, done_marker=COMPLETE_MARKER, prepare=lambda new: _lock_at(lock, new))
            lock.moved_to(aside.target)
            (aside.aside / LOCK_NAME).unlink(missing_ok=True)  # moved aside with the old run: not a lock of it
        except BaseException:
            lock.release()
            raise
        finally:
            old_lock.release()
    created = not out.exists()
    manifest = read_json_quietly(out / MANIFEST_NAME)
    previous = set(manifest.get("entries", [])) if isinstance(manifest, dict) else set()
    if aside is None:
        lock.acquire()
    if lock.took_over:
        print(
            f"note: {out}: the previous holder of the lock (pid {lock.took_over.get('pid')}) ended without releasing "
            "it; taking it",
            file=sys.stderr,
        )
    before = {p.name for p in out.iterdir()} - previous
    try:
        yield out
    except BaseException:
        if aside is not None:
            aside.rollback()  # under the lock: no one else writes the folder while it is put back
        lock.release()
        if aside is None and created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty: a failed run leaves no folder it made for nothing
        raise
    else:
        entries = sorted(previous | set(_own_entries(out, before)) | {MANIFEST_NAME})
        atomic_write_json(out / MANIFEST_NAME, {"command": command, "entries": entries})
        if aside is not None:
            aside.commit()
        lock.release()


def check_sequence_lengths(task: Any, processor: Any, max_length: int) -> None:
    """Every training record fits ``max_length`` tokens (text + image placeholders); all offenders listed.

    Records are never truncated: cutting a sequence could leave an answer without a supervised token.

    Raises:
        DataError: Naming the first records that are too long and the fixes.
    """
    from phi3v_core.data.seqlen import record_image_tokens, too_long_error

    tokenizer = processor.tokenizer
    too_long = []
    for record in task.train:
        image_tokens = record_image_tokens(record, task.num_crops)
        text = "".join(f"<|user|>\n{t.user}<|end|>\n<|assistant|>\n{t.assistant}<|end|>\n" for t in record.conversations)
        # verbose=False: the tokenizer's own "longer than the maximum" warning would be a second stderr line.
        total = image_tokens + len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) + 1
        if total > max_length:
            too_long.append(f"record {record.id!r}: {total} tokens ({image_tokens} image)")
    if too_long:
        raise too_long_error(task.origin, too_long, max_length)


def _load_data(cfg: FinetuneConfig) -> Any:
    from phi3v_core.data import load_task

    if cfg.data_dir:
        pending(cfg.data_dir, "--data_dir")  # finetune only reads the data folder: an interrupted convert is reported
    # --no_eval reads the training file only: a folder without *_val.jsonl (phi3v-plan --data prints --no_eval for it)
    # trains instead of being refused for a file the run would never read.
    return load_task(
        cfg.task,
        "all" if cfg.evaluate else "train",
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

    if model in MODEL_PRESET_NAMES:
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
        "progress": cfg.progress,  # on stderr, so --json keeps it too (plain lines when not a terminal)
    }


def _evaluate_before(cfg: FinetuneConfig, task: Any, processor: Any, env: Any) -> Any:
    import torch

    from phi3v_core.training.evaluate import EvalResult, baseline_model, evaluate_task

    path = Path(cfg.train.output_dir) / "eval_before.json"
    if cfg.train.resume is not None and path.is_file():
        previous = EvalResult.from_json(path)
        if previous.task == task.name and previous.ids == [item.id for item in task.eval_items()]:
            return previous  # a resumed run keeps its baseline instead of regenerating it
    with stage("eval before: building the model", enabled=cfg.progress and is_main_process()):
        model = baseline_model(cfg.train, env).to(local_device(env.cuda))  # QLoRA: the same nf4 base as "after"
    try:
        return evaluate_task(
            model, task, processor, output_file=path, description="eval before", **_eval_kwargs(cfg, env)
        )
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run(cfg: FinetuneConfig, env: Any = None, on_plan: Callable[[FinetuneConfig, Any], None] | None = None) -> dict[str, Any]:
    """Hold the output folder, load data and processor, evaluate, train, evaluate again; return the summary.

    Args:
        cfg: A validated :class:`FinetuneConfig` (from :func:`phi3v_core.cli.finetune.build_config`).
        env: The machine (detected when omitted).
        on_plan: Called on the main process once the data is loaded (the CLI prints the plan).

    Returns:
        JSON-ready summary: settings, data, training result and the before/after metrics. For a complete run asked
        to resume: ``{"status": "complete", ...}`` and nothing is trained or written.
    """
    out = Path(cfg.train.output_dir)
    if is_main_process():
        recover(out)
    folder = inspect_run_folder(out)
    if cfg.train.resume == "latest" and folder.complete is not None:
        return {
            "status": "complete",
            "output_dir": str(out),
            "global_step": folder.complete.get("global_step") if isinstance(folder.complete, dict) else None,
            "message": f"{out} holds a complete run; nothing to train (start a new run with another --output_dir "
            "or --overwrite_output_dir)",
        }
    with guarded_output_dir(out, command="phi3v-finetune", overwrite=cfg.overwrite_output_dir, resume=cfg.train.resume):
        return _run_locked(cfg, env, on_plan)


def _on_train_begin(done: Callable[[], None]) -> Any:
    from transformers import TrainerCallback

    class OnTrainBegin(TrainerCallback):
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            done()  # the model is built (and wrapped): the Trainer's own bar takes over

    return OnTrainBegin()


def _run_locked(cfg: FinetuneConfig, env: Any, on_plan: Callable[[FinetuneConfig, Any], None] | None) -> dict[str, Any]:
    from phi3v_core.training.api import init_distributed, resolve_resume, train
    from phi3v_core.training.checkpoints import data_fingerprint
    from phi3v_core.training.evaluate import evaluate_task
    from phi3v_core.training.machine import Machine

    env = env or Machine.detect()
    resolve_resume(cfg.train)  # checkpoint compatibility before any data or model loads
    init_distributed(env.cuda, cfg.train.ddp_timeout)  # before the first eval; the Trainer reuses it
    task = _load_data(cfg)
    raise_all(cfg.train.dataset_problems(len(task.train), env))
    cfg.train.num_crops = task.num_crops  # the task's default when --num_crops was not given (validated 1..16)
    cfg.train.extra["data"] = task.origin
    cfg.train.extra["data_content"] = data_fingerprint(task.train)  # resume refuses other data of the same origin
    processor = _build_processor(cfg.train.model, task.num_crops)
    if cfg.max_length is not None:
        check_sequence_lengths(task, processor, cfg.max_length)

    from phi3v_core.data import EncodedDataset

    train_dataset = EncodedDataset(task.train, processor)
    if is_main_process() and on_plan is not None:
        on_plan(cfg, task)
    if not cfg.force:  # before any model is built: the planner's memory prediction against this machine
        from phi3v_core.training.fit_hook import fit_problems

        local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))  # processes on this node (torchrun sets it)
        raise_all(fit_problems(cfg.train, task.name, cfg.data_dir, env.world_size, local, env.cuda))

    before = _evaluate_before(cfg, task, processor, env) if cfg.evaluate else None
    with stage("train: building the model", enabled=cfg.progress and is_main_process()) as built:
        result = train(cfg.train, train_dataset, processor=processor, env=env, callbacks=[_on_train_begin(built)])
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
    from phi3v_core.training.advice import cuda_peak_and_capacity, memory_advice

    advice = memory_advice(cfg.train, task.name, cfg.data_dir, *cuda_peak_and_capacity())
    train_summary = result.to_dict()
    train_summary.pop("steps", None)  # per-step timings are the benchmark's business
    return {
        "status": "trained",
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
        "advice": advice,
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
        "batch_size_per_gpu": train.micro_batch,
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
