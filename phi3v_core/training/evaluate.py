"""Generation-based evaluation, as the recipe runs it before and after fine-tuning (the evaluation loops of the Phi-3CookBook vision fine-tuning scripts (microsoft/Phi-3CookBook, code/03.Finetuning/vision_finetuning/)).

Greedy decoding (``do_sample=False``, ``max_new_tokens=64``) that stops on ``<|end|>`` / ``<|endoftext|>`` (the
model's generation config lists eos 32000, 32007 and 2), on prompts from ``processor.encode_prompt`` batched with
LEFT padding, so every row's new tokens start at the same column. Rank ``r`` of ``W`` processes evaluates items
``r::W``; predictions are gathered to every rank with ``all_gather_object`` and put back in item order, the task
metric (ANLS for DocVQA, accuracy otherwise) is computed, and rank 0 writes the recipe's JSON
(``eval_before.json`` / ``eval_after.json``).

Differences from the recipe, on purpose:

* Batched generation (the recipe uses batch 1 except for UCF-101). Left padding plus an attention mask built from
  the real lengths gives the same greedy tokens as batch 1, up to floating-point noise.
* Generation also stops on ``<|end|>`` (the recipe only passes ``<|endoftext|>``); the text is the same after
  ``skip_special_tokens`` and the metric's ``strip()``, and decoding stops 2 tokens earlier.

>>> result = evaluate_task(model, load_task("docvqa", synthetic=32), processor, output_file="out/eval_after.json")  # doctest: +SKIP
>>> result.score, result.metric  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from phi3v_core.data import DEFAULT_MAX_PIXELS, METRICS, EvalItem, PromptDataset, TaskData, compute_metric
from phi3v_core.errors import ConfigError, DataError
from phi3v_core.io import atomic_write_json
from phi3v_core.processing import Phi3VDataCollator

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "EvalResult",
    "baseline_model",
    "distributed_rank_and_size",
    "evaluate",
    "evaluate_task",
    "generate_answers",
    "keep_training_kernels",
    "shard_indices",
]

#: The recipe's generation length.
DEFAULT_MAX_NEW_TOKENS = 64


@dataclass
class EvalResult:
    """Predictions and score of one evaluation (identical on every rank after the gather).

    Attributes:
        task: Task name (``docvqa``, ...).
        metric: ``"anls"`` or ``"accuracy"``.
        score: Metric value in [0, 1] (the recipe's tables show it ×100).
        ids: Eval item ids, in dataset order.
        predictions: Generated answers (decoded new tokens, special tokens skipped), aligned with ``ids``.
        references: Accepted answers per item.
        max_new_tokens: Generation budget used.
        seconds: Wall time of generation + gather on this process.
        world_size: Processes that shared the work.
    """

    task: str
    metric: str
    score: float
    ids: list[str]
    predictions: list[str]
    references: list[list[str]]
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seconds: float = 0.0
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """Number of evaluated questions."""
        return len(self.predictions)

    def to_json(self) -> dict[str, Any]:
        """The recipe's eval JSON plus our fields.

        Recipe keys: ``answers_unique`` (ANLS: the list of accepted answers per question; accuracy: the answer string,
        or a list when a question has several), ``generated_texts_unique`` and ``anls`` or ``accuracy``. Ours:
        ``task``, ``metric``, ``num_samples``, ``ids``, ``max_new_tokens``, ``seconds``, ``world_size``.
        """
        if self.metric == "anls":
            answers: list[Any] = [list(refs) for refs in self.references]
        else:
            answers = [refs[0] if len(refs) == 1 else list(refs) for refs in self.references]
        return {
            "task": self.task,
            "metric": self.metric,
            self.metric: self.score,
            "num_samples": self.num_samples,
            "answers_unique": answers,
            "generated_texts_unique": list(self.predictions),
            "ids": list(self.ids),
            "max_new_tokens": self.max_new_tokens,
            "seconds": self.seconds,
            "world_size": self.world_size,
            **self.extra,
        }

    @classmethod
    def from_json(cls, path: str | Path) -> EvalResult:
        """Read a file written by :func:`evaluate` (e.g. to reuse ``eval_before.json`` when a run resumes).

        Raises:
            DataError: The file is not such a JSON object.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            metric = data["metric"]
            answers = data["answers_unique"]
            return cls(
                task=data["task"],
                metric=metric,
                score=float(data[metric]),
                ids=list(data["ids"]),
                predictions=list(data["generated_texts_unique"]),
                references=[list(a) if isinstance(a, list) else [a] for a in answers],
                max_new_tokens=int(data.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
                seconds=float(data.get("seconds", 0.0)),
                world_size=int(data.get("world_size", 1)),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: not an evaluation result written by phi3v-finetune ({exc})") from None


def distributed_rank_and_size() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` when ``torch.distributed`` is not initialized."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_indices(num_items: int, rank: int, world_size: int) -> list[int]:
    """Indices rank ``rank`` evaluates: ``rank, rank + W, rank + 2W, ...`` (like ``datasets.shard(contiguous=False)``).

    Strided shards keep the per-rank work balanced when item lengths drift through the file.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return list(range(rank, num_items, world_size))


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Restore the caller's mode: evaluate() runs between training phases too.
    was_training = model.training
    model.eval()
    keep_training_kernels(model)
    try:
        yield
    finally:
        model.train(was_training)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None or dtype == torch.float32 or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _progress(enabled: bool, total: int, description: str) -> Any:
    """Progress on stderr (stdout stays clean for ``--json``): a rich bar on a terminal, plain ``done/total`` lines
    with an ETA otherwise (:class:`phi3v_core.progress.Counter`), or a no-op stand-in."""
    if not enabled:
        return _NoProgress()
    from phi3v_core.progress import Counter

    return _CounterBar(Counter(total, description))


class _CounterBar:
    """A :class:`~phi3v_core.progress.Counter` behind the rich bar's ``advance(task_id, n)``."""

    task_id = 0

    def __init__(self, counter: Any) -> None:
        self.counter = counter

    def __enter__(self) -> _CounterBar:
        self.counter.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.counter.__exit__(*exc)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.counter.advance(int(advance))


class _NoProgress:
    task_id = 0

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def advance(self, task_id: int, advance: float = 1) -> None:
        """Do nothing."""


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    processor: Any,
    *,
    batch_size: int = 8,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    progress: bool = False,
    description: str = "evaluating",
) -> list[str]:
    """Greedy answers for every prompt of ``dataset`` on this process (no sharding, no gather).

    Args:
        model: ``Phi3VForCausalLM`` or a wrapper with the same ``generate`` (PEFT ``PeftModel``).
        dataset: Items are ``processor.encode_prompt`` outputs (e.g. a :class:`~phi3v_core.data.PromptDataset`).
        processor: A ``Phi3VProcessor`` (``pad_token_id`` and ``batch_decode``).
        batch_size: Prompts per ``generate`` call (left-padded).
        max_new_tokens: Generation budget per answer.
        device: Where to run; default: the model's device.
        autocast_dtype: Run under ``torch.autocast`` with this dtype (e.g. bf16 for fp32 master weights after
            mixed-precision training); ``None`` or fp32 runs in the weights' dtype.
        num_workers: DataLoader workers that encode prompts (render/decode images) in parallel.
        progress: Show a progress bar on stderr.
        description: Progress bar label.

    Returns:
        One decoded answer per item, in dataset order.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ConfigError(f"batch_size and max_new_tokens must be >= 1 (got {batch_size}, {max_new_tokens})")
    device = torch.device(device) if device is not None else _model_device(model)
    pad_id = int(processor.pad_token_id)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=Phi3VDataCollator(pad_token_id=pad_id, padding_side="left"),
        pin_memory=device.type == "cuda",
    )
    answers: list[str] = []
    with _eval_mode(model), _progress(progress, len(dataset), description) as bar:  # type: ignore[arg-type]
        for batch in loader:
            batch = _to_device(batch, device)
            prompt_length = batch["input_ids"].shape[1]
            inputs = {
                "input_ids": batch["input_ids"],
                "attention_mask": batch["attention_mask"],
                "image_sizes": batch["image_sizes"],
            }
            if "pixel_values" in batch:
                inputs["pixel_values"] = batch["pixel_values"]
            with _autocast(device, autocast_dtype):
                output = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,  # training configs turn the KV cache off; generation needs it for speed
                    pad_token_id=pad_id,
                )
            # Left padding puts every prompt's end at the same column, so the new tokens are one slice.
            answers.extend(processor.batch_decode(output[:, prompt_length:].cpu(), skip_special_tokens=True))
            bar.advance(bar.task_id, batch["input_ids"].shape[0])
    return answers


def _gather(local: list[tuple[int, str]], world_size: int) -> list[tuple[int, str]]:
    if world_size == 1:
        return local
    gathered: list[list[tuple[int, str]] | None] = [None] * world_size
    torch.distributed.all_gather_object(gathered, local)
    return [pair for part in gathered for pair in (part or [])]


def _answers_in_order(
    model: nn.Module, dataset: PromptDataset, processor: Any, rank: int, world_size: int, **generate_kwargs: Any
) -> list[str]:
    """This rank's shard of answers, gathered from every rank into item order (each rank gets all of them)."""
    indices = shard_indices(len(dataset), rank, world_size)
    local_answers = generate_answers(model, Subset(dataset, indices), processor, **generate_kwargs) if indices else []
    pairs = sorted(_gather(list(zip(indices, local_answers)), world_size))
    if [index for index, _ in pairs] != list(range(len(dataset))):
        raise RuntimeError(f"gathered {len(pairs)} answers for {len(dataset)} eval items; the ranks disagree")
    return [answer for _, answer in pairs]


def evaluate(
    model: nn.Module,
    items: Sequence[EvalItem],
    processor: Any,
    *,
    metric: str,
    task: str = "",
    output_file: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    description: str | None = None,
    metric_kwargs: dict[str, Any] | None = None,
) -> EvalResult:
    """Generate answers for ``items`` (sharded over ranks), score them and let rank 0 write the JSON.

    Every rank must call it (when ``torch.distributed`` is initialized) and every rank returns the same result.

    Args:
        model: ``Phi3VForCausalLM`` or a PEFT-wrapped one, on its device.
        items: Questions (``TaskData.eval_items()``).
        processor: ``Phi3VProcessor`` used to encode prompts and decode answers.
        metric: ``"anls"`` or ``"accuracy"``.
        task: Task name recorded in the result.
        output_file: Where rank 0 writes the recipe-style JSON (atomically); ``None`` writes nothing.
        batch_size: Prompts per ``generate`` call on each rank.
        max_new_tokens: Generation budget (recipe: 64).
        device: Default: the model's device.
        autocast_dtype: See :func:`generate_answers`.
        num_workers: DataLoader workers for prompt encoding.
        progress: Progress bar on rank 0.
        max_pixels: Image pixel cap when decoding files.
        description: Progress bar label (default ``"eval <task>"``).
        metric_kwargs: Extra arguments for the metric (e.g. ``{"case_sensitive": False}`` for ANLS).

    Returns:
        The :class:`EvalResult`.

    Raises:
        ConfigError: Unknown metric or bad sizes.
        DataError: No items, or an item that cannot be encoded.
    """
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if not items:
        raise DataError(f"nothing to evaluate: the {task or 'task'} eval split is empty")
    rank, world_size = distributed_rank_and_size()
    start = time.perf_counter()
    dataset = PromptDataset(items, processor, max_pixels=max_pixels)
    predictions = _answers_in_order(
        model, dataset, processor, rank, world_size,
        batch_size=batch_size, max_new_tokens=max_new_tokens, device=device, autocast_dtype=autocast_dtype,
        num_workers=num_workers, progress=progress and rank == 0, description=description or f"eval {task}".strip(),
    )
    references = dataset.references
    score = compute_metric(metric, predictions, references, **(metric_kwargs or {}))
    if not math.isfinite(score):
        raise RuntimeError(f"metric {metric} is {score}")
    result = EvalResult(
        task=task,
        metric=metric,
        score=score,
        ids=[item.id for item in dataset.items],
        predictions=predictions,
        references=references,
        max_new_tokens=max_new_tokens,
        seconds=time.perf_counter() - start,
        world_size=world_size,
    )
    if output_file is not None and rank == 0:
        atomic_write_json(Path(output_file), result.to_json())
    return result


def evaluate_task(model: nn.Module, task: TaskData, processor: Any, **kwargs: Any) -> EvalResult:
    """:func:`evaluate` on ``task.eval_items()`` with the task's metric and name.

    Args:
        model: The model (or PEFT wrapper).
        task: What :func:`phi3v_core.data.load_task` returned.
        processor: ``Phi3VProcessor`` with the run's ``num_crops``.
        **kwargs: Passed to :func:`evaluate` (``output_file``, ``batch_size``, ``max_new_tokens``, ...).
    """
    return evaluate(model, task.eval_items(), processor, metric=task.metric, task=task.name, **kwargs)


def baseline_model(cfg: Any, env: Any = None) -> nn.Module:
    """The model the "before" evaluation runs: the same base the method will train, in the same numerics.

    QLoRA trains on an nf4 base, so "before" must run that quantised base too; evaluating the bf16 base would mix
    the quantisation loss into the before/after change. The method is applied exactly as :func:`train` applies it
    (same seed, so the same weights and the same quantisation); the fresh LoRA ``B`` matrices are zero, so the
    adapters add nothing and the output is the quantised base's own. Other methods evaluate the plain base
    (LoRA's 16-bit base is the base; full fine-tuning starts from it).

    Args:
        cfg: The run's ``TrainConfig``.
        env: The machine (detected when omitted).
    """
    from phi3v_core.methods import get_method
    from phi3v_core.training.model_setup import build_model, prepare_model

    if get_method(cfg.method).quantized:
        model, _ = prepare_model(cfg, env)
    else:
        model = build_model(cfg, env)
    return model.eval()


def keep_training_kernels(model: nn.Module) -> None:
    """Make bitsandbytes run the 4-bit layers with the kernel training uses, also in eval mode on CPU.

    On CPUs with AVX512-bf16, bitsandbytes repacks an nf4 weight for a bf16 inference kernel on the first eval-mode
    forward without gradients. Evaluation must see the numerics training saw (and "before" the same as "after");
    the repacking also fails on layers narrower than one quantisation block (the tiny model's CLIP). No-op on GPU
    and for models without 4-bit layers.
    """
    bnb = sys.modules.get("bitsandbytes")  # no 4-bit layer can exist unless bitsandbytes was imported
    if bnb is None:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
