"""Task registry and :func:`load_task`: one entry point for the recipe's four tasks and custom jsonl folders.

Every task loads from one of three sources, chosen by the arguments:

* ``data_dir=`` (or explicit ``train_file=`` / ``eval_file=``): a jsonl folder (``*_train.jsonl``, ``*_val.jsonl``,
  ``images/``), strictly validated (see :mod:`phi3v_core.data.jsonl`).
* ``synthetic=N``: the offline synthetic twin (:mod:`phi3v_core.data.synthetic`).
* neither: the recipe's Hugging Face datasets (needs the optional ``datasets`` package and a local copy or network).

=================  ===========================================================  ==========  =========
task               recipe source (train / eval)                                 metric      num_crops
=================  ===========================================================  ==========  =========
``docvqa``         nielsr/docvqa_1200_examples train / test ("Answer briefly.")  anls        16
``docvqa`` full    HuggingFaceM4/the_cauldron docvqa train / mini test          anls        16
``hateful_memes``  the_cauldron hateful_memes train[500:] / train[:500]          accuracy    16
``nlvr2``          the_cauldron nlvr2 train[500:] / train[:500] (first turn)     accuracy    16
``ucf101``         ``data_dir`` from ``phi3v-convert ucf101`` (train / val)      accuracy    4
``jsonl``          any jsonl folder or explicit files                           accuracy    16 (4 if multi-frame)
=================  ===========================================================  ==========  =========
"""

from __future__ import annotations

import difflib
import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from phi3v_core.data.images import DEFAULT_MAX_PIXELS, ImageCheck
from phi3v_core.data.jsonl import (
    JsonlData,
    raise_problems,
    validate_records,
    write_jsonl_folder,
)
from phi3v_core.data.metrics import METRICS, compute_metric
from phi3v_core.data.records import ImageSource, LazyImage, Record, Turn, image_tags
from phi3v_core.data.synthetic import DOCVQA_ANSWER_SUFFIX, SYNTHETIC_TASKS, synthesize
from phi3v_core.data.task_registry import (
    TASKS,
    HFSource,
    Split,
    TaskSpec,
    default_num_crops,
    read_task_split,
    task_of_folder,
    task_record_problems,
)
from phi3v_core.errors import ConfigError, DataError, raise_all

__all__ = [
    "TASKS",
    "EvalItem",
    "HFSource",
    "Split",
    "TaskData",
    "TaskSpec",
    "default_num_crops",
    "load_task",
    "read_task_split",
    "task_of_folder",
]


@dataclass
class EvalItem:
    """One generation-based evaluation question.

    Attributes:
        id: Record id.
        user: The question turn's user text (image tags included).
        images: Images of the question turn.
        references: Accepted answers.
        context: Earlier turns of the conversation (empty when only first turns are evaluated).
    """

    id: str
    user: str
    images: list[ImageSource]
    references: list[str]
    context: list[Turn] = field(default_factory=list)


@dataclass
class TaskData:
    """What :func:`load_task` returns: records plus everything needed to train and evaluate on them.

    Attributes:
        name: Task name.
        train: Training records (empty when only the eval split was loaded).
        eval: Evaluation records (full conversations; :meth:`eval_items` picks the questions to ask).
        metric: ``"anls"`` or ``"accuracy"`` (see :mod:`phi3v_core.data.metrics`).
        num_crops: Default processor num_crops for the task.
        origin: Where the records came from, e.g. ``"jsonl:/data/ucf101"``, ``"synthetic(seed=0)"``, ``"hf:..."``.
        answer_suffix: Appended to questions by :meth:`build_prompt`.
        skipped: Split → number of records dropped by ``skip_bad=True``.
    """

    name: str
    train: list[Record]
    eval: list[Record]
    metric: str
    num_crops: int
    origin: str
    answer_suffix: str = ""
    skipped: dict[str, int] = field(default_factory=dict)

    def build_prompt(self, question: str, num_images: int = 1) -> str:
        """User text for a new question, formatted like the task's eval prompts.

        ``<|image_1|>..<|image_n|>`` (concatenated), a newline, the question and the task's suffix
        (DocVQA: "\\nAnswer briefly.").
        """
        prefix = f"{image_tags(num_images)}\n" if num_images else ""
        return f"{prefix}{question}{self.answer_suffix}"

    def eval_items(self, *, all_turns: bool = False) -> list[EvalItem]:
        """Questions to generate answers for: by default the first question of each eval record, as the recipe
        evaluates (it scores NLVR2 and hateful memes on ``texts[0]`` only).

        Args:
            all_turns: Also evaluate later turns, with the earlier turns (and their reference answers) as context.
        """
        items = []
        for record in self.eval:
            turns = record.conversations if all_turns else record.conversations[:1]
            for t, turn in enumerate(turns):
                items.append(
                    EvalItem(
                        id=record.id if t == 0 else f"{record.id}#{t}",
                        user=turn.user,
                        images=list(turn.images),
                        references=turn.references,
                        context=list(record.conversations[:t]),
                    )
                )
        return items

    def score(
        self, predictions: Sequence[str], references: Sequence[Sequence[str]] | None = None, **kwargs: Any
    ) -> float:
        """Score predictions with the task metric (references default to :meth:`eval_items`' references)."""
        if references is None:
            references = [item.references for item in self.eval_items()]
        return compute_metric(self.metric, predictions, references, **kwargs)

    def write(
        self, out_dir: str | Path, *, overwrite: bool = False, image_format: Literal["png", "jpg"] = "png"
    ) -> dict[str, Path]:
        """Write the records as a jsonl folder (``<name>_train.jsonl``, ``<name>_val.jsonl``, ``images/``)."""
        splits = {"train": self.train, "val": self.eval}
        return write_jsonl_folder(
            out_dir,
            {k: v for k, v in splits.items() if v},
            name=self.name,
            overwrite=overwrite,
            image_format=image_format,
        )


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face datasets (optional dependency)
# --------------------------------------------------------------------------------------------------------------------


def _hf_image(dataset: Any, index: int, column: str, position: int | None) -> Image.Image:
    value = dataset[index][column]
    if position is None:
        return value
    if position >= len(value):
        raise DataError(
            f"row {index} of the Hub dataset has {len(value)} image(s) in {column!r}; expected {position + 1}"
        )
    return value[position]


def _hf_lazy(dataset: Any, index: int, column: str, position: int | None = None) -> LazyImage:
    return LazyImage(functools.partial(_hf_image, dataset, index, column, position), None, f"{column}[{index}]")


def _text_view(dataset: Any, columns: list[str]) -> Any:
    # Reading only the text columns avoids decoding every image once at load time.
    return dataset.select_columns(columns) if hasattr(dataset, "select_columns") else dataset


def docvqa_rows_to_records(
    rows: Any, split: str, rng: random.Random, *, answer_suffix: str = DOCVQA_ANSWER_SUFFIX
) -> list[Record]:
    """Convert ``nielsr/docvqa_1200_examples`` rows (``image``, ``query['en']``, ``answers``) to records.

    The target is one of the answers drawn with ``rng`` (the recipe draws anew on every access); all answers are kept
    as references.
    """
    text = _text_view(rows, ["query", "answers"])
    records = []
    for i in range(len(text)):
        row = text[i]
        question, answers = row["query"]["en"], [a for a in row["answers"] if a.strip()]
        records.append(
            Record(
                id=f"docvqa-{split}-{i:06d}",
                source="docvqa",
                conversations=[
                    Turn(
                        user=f"{image_tags(1)}\n{question}{answer_suffix}",
                        assistant=rng.choice(answers) if answers else "",
                        images=[_hf_lazy(rows, i, "image")],
                        answers=answers,
                    )
                ],
            )
        )
    return records


def cauldron_rows_to_records(
    rows: Any,
    task: str,
    split: str,
    rng: random.Random,
    *,
    num_images: int,
    all_turns: bool,
    pick_random_turn: bool = False,
) -> list[Record]:
    """Convert ``HuggingFaceM4/the_cauldron`` rows (``images``, ``texts=[{user, assistant}]``) to records.

    Args:
        rows: Dataset (or sequence of row dicts).
        task: Task name (ids and ``source``).
        split: Split label for ids.
        rng: Draws the text for ``pick_random_turn``.
        num_images: Images used per row (the first ``num_images`` of ``images``): NLVR2 2, others 1. Fixed per
            task so that loading reads only the text column and decodes no image.
        all_turns: Keep every text as a turn (NLVR2); otherwise only ``texts[0]`` (hateful memes).
        pick_random_turn: Use one random text (DocVQA ``--full_train``, like the recipe's ``random.choice``).
    """
    text = _text_view(rows, ["texts"])
    records = []
    for i in range(len(text)):
        texts = text[i]["texts"]
        chosen = [rng.choice(texts)] if pick_random_turn else (texts if all_turns else texts[:1])
        images = [_hf_lazy(rows, i, "images", k) for k in range(num_images)]
        turns = [
            Turn(
                user=(f"{image_tags(num_images)}\n{entry['user']}" if t == 0 else entry["user"]),
                assistant=entry["assistant"],
                images=images if t == 0 else [],
            )
            for t, entry in enumerate(chosen)
        ]
        records.append(Record(id=f"{task}-{split}-{i:06d}", source=task, conversations=turns))
    return records


def _load_hf_split(source: HFSource, task: str) -> Any:
    try:
        import datasets  # optional dependency, only needed for the recipe's Hub datasets
    except ImportError:
        raise DataError(
            f"task {task!r} without data_dir needs the Hugging Face dataset {source}, but the 'datasets' package is "
            f"not installed; pip install datasets (and download it), or pass data_dir=... or synthetic=N"
        ) from None
    try:
        return datasets.load_dataset(source.path, source.name, split=source.split)
    except Exception as exc:  # noqa: BLE001 - any Hub/cache failure becomes one actionable line
        raise DataError(
            f"cannot load the Hugging Face dataset {source} for task {task!r} ({type(exc).__name__}: {exc}); "
            f"download it while online (datasets.load_dataset) or pass data_dir=... or synthetic=N"
        ) from None


def _load_from_hf(spec: TaskSpec, split: Split, full_train: bool, seed: int) -> tuple[list[Record], list[Record], str]:
    rng = random.Random(seed)
    train: list[Record] = []
    evaluation: list[Record] = []
    train_source = spec.hf_train_full if full_train else spec.hf_train
    assert train_source is not None and spec.hf_eval is not None
    if split in ("train", "all"):
        rows = _load_hf_split(train_source, spec.name)
        if spec.name == "docvqa" and not full_train:
            train = docvqa_rows_to_records(rows, "train", rng)
        elif spec.name == "docvqa":
            train = cauldron_rows_to_records(
                rows, "docvqa", "train", rng, num_images=1, all_turns=False, pick_random_turn=True
            )
        else:
            train = cauldron_rows_to_records(
                rows, spec.name, "train", rng, num_images=spec.first_turn_images or 1, all_turns=spec.name == "nlvr2"
            )
    if split in ("eval", "all"):
        rows = _load_hf_split(spec.hf_eval, spec.name)
        if spec.name == "docvqa":
            evaluation = docvqa_rows_to_records(rows, "eval", rng)
        else:
            evaluation = cauldron_rows_to_records(
                rows, spec.name, "eval", rng, num_images=spec.first_turn_images or 1, all_turns=False
            )
    origin = f"hf:{train_source if split != 'eval' else spec.hf_eval}"
    return train, evaluation, origin


# --------------------------------------------------------------------------------------------------------------------
# load_task
# --------------------------------------------------------------------------------------------------------------------


def _check_arguments(
    name: str,
    split: str,
    data_dir: Any,
    synthetic: int | None,
    synthetic_eval: int | None,
    full_train: bool,
    files: dict[str, Any],
    metric: str | None,
    num_crops: int | None,
) -> None:
    problems: list[str] = []
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown task {name!r}{hint}; choose one of {', '.join(TASKS)}")
    if split not in ("train", "eval", "all"):
        problems.append(f"split must be 'train', 'eval' or 'all', got {split!r}")
    from_files = data_dir is not None or any(v is not None for v in files.values())
    if synthetic is not None:
        if from_files:
            problems.append("pass either synthetic=N or data_dir/train_file/eval_file, not both")
        if name not in SYNTHETIC_TASKS:
            problems.append(f"task {name!r} has no synthetic twin; use one of {', '.join(SYNTHETIC_TASKS)}")
        if synthetic < 1:
            problems.append(f"synthetic must be >= 1 records, got {synthetic}")
    if synthetic_eval is not None and (synthetic is None or synthetic_eval < 1):
        problems.append("synthetic_eval needs synthetic=N and must be >= 1")
    if full_train and name != "docvqa":
        problems.append(f"full_train applies to docvqa only, not {name!r}")
    if full_train and from_files:
        problems.append("full_train selects the recipe's Hub train set; drop it when loading data_dir/train_file")
    if synthetic is None and not from_files and TASKS[name].hf_train is None:
        problems.append(
            f"task {name!r} needs data_dir (a folder with *_train.jsonl, *_val.jsonl and images/"
            + (", e.g. from phi3v-convert ucf101" if name == "ucf101" else "")
            + ") or explicit train_file/eval_file"
            + (", or synthetic=N" if name in SYNTHETIC_TASKS else "")
        )
    if metric is not None and metric not in METRICS:
        problems.append(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if num_crops is not None and not 1 <= num_crops <= 16:
        problems.append(f"num_crops must be in 1..16 (the recipe asserts <= 16), got {num_crops}")
    raise_all(problems, ConfigError)


def load_task(
    name: str,
    split: Split = "all",
    *,
    data_dir: str | Path | None = None,
    synthetic: int | None = None,
    synthetic_eval: int | None = None,
    full_train: bool = False,
    seed: int = 0,
    train_file: str | Path | None = None,
    eval_file: str | Path | None = None,
    images_root: str | Path | None = None,
    skip_bad: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    check_images: ImageCheck = "full",
    metric: str | None = None,
    num_crops: int | None = None,
    limit: int | None = None,
    eval_limit: int | None = None,
) -> TaskData:
    """Load a task's train/eval records from a jsonl folder, its synthetic twin or the recipe's Hub datasets.

    Args:
        name: ``docvqa``, ``nlvr2``, ``hateful_memes``, ``ucf101`` or ``jsonl`` (any custom folder).
        split: Load ``"train"``, ``"eval"`` or ``"all"`` (the other list stays empty).
        data_dir: Folder with ``*_train.jsonl``, ``*_val.jsonl`` (``<name>_*.jsonl`` preferred when several) and
            ``images/``.
        synthetic: Generate this many training records of the offline twin instead.
        synthetic_eval: Eval records of the twin (default: ``synthetic``).
        full_train: DocVQA only: the recipe's ``--full_train`` (the Cauldron DocVQA train set, prompts without
            "Answer briefly."; with ``synthetic`` the twin drops the suffix from training prompts).
        seed: Seed of the twin and of the answer drawn among several references.
        train_file: Explicit train jsonl (instead of searching ``data_dir``).
        eval_file: Explicit eval jsonl.
        images_root: Images folder (default ``<data_dir>/images`` or ``images/`` next to the jsonl).
        skip_bad: Skip records with unreadable images (counted in ``TaskData.skipped``) instead of failing.
        max_pixels: Per-image pixel cap (decompression-bomb guard).
        check_images: Image validation depth for files: ``"full"`` (decode), ``"header"`` or ``"none"``.
        metric: Override the task metric (``"anls"`` / ``"accuracy"``).
        num_crops: Override the default num_crops (1..16).
        limit: Keep at most this many training records (in file order).
        eval_limit: Keep at most this many eval records.

    Returns:
        The :class:`TaskData`.

    Raises:
        ConfigError: Inconsistent arguments (all listed at once).
        DataError: Invalid data (every problem with ``file:line``), or Hub data that is not available offline.
    """
    files = {"train_file": train_file, "eval_file": eval_file, "images_root": images_root}
    _check_arguments(name, split, data_dir, synthetic, synthetic_eval, full_train, files, metric, num_crops)
    spec = TASKS[name]
    want = {"train": split in ("train", "all"), "eval": split in ("eval", "all")}
    skipped: dict[str, int] = {}
    if synthetic is not None:
        train, evaluation = _load_synthetic(spec, want, synthetic, synthetic_eval, full_train, seed)
        origin = f"synthetic(seed={seed})"
    elif data_dir is not None or train_file is not None or eval_file is not None:
        options = {"max_pixels": max_pixels, "check_images": check_images, "skip_bad": skip_bad}
        train, evaluation, skipped = _load_jsonl(name, want, data_dir, train_file, eval_file, images_root, options)
        origin = f"jsonl:{data_dir if data_dir is not None else train_file or eval_file}"
    else:
        train, evaluation, origin = _load_hub(spec, split, full_train, seed)
    if limit is not None:
        train = train[:limit]
    if eval_limit is not None:
        evaluation = evaluation[:eval_limit]
    return TaskData(
        name=name,
        train=train,
        eval=evaluation,
        metric=metric or spec.metric,
        num_crops=num_crops if num_crops is not None else default_num_crops(name, train or evaluation),
        origin=origin,
        answer_suffix=spec.answer_suffix,
        skipped=skipped,
    )


def _load_synthetic(
    spec: TaskSpec, want: dict[str, bool], count: int, eval_count: int | None, full_train: bool, seed: int
) -> tuple[list[Record], list[Record]]:
    """The offline twin's train/eval records (validated like any other records)."""
    train = synthesize(spec.name, count, seed=seed, split="train") if want["train"] else []
    if full_train:
        for record in train:
            for turn in record.conversations:
                turn.user = turn.user.removesuffix(spec.answer_suffix)
    evaluation = synthesize(spec.name, eval_count or count, seed=seed, split="eval") if want["eval"] else []
    for label, records in (("train", train), ("eval", evaluation)):
        if records:
            validate_records(records, f"synthetic {spec.name} {label}")
    return train, evaluation


def _load_jsonl(
    name: str,
    want: dict[str, bool],
    data_dir: str | Path | None,
    train_file: str | Path | None,
    eval_file: str | Path | None,
    images_root: str | Path | None,
    options: dict[str, Any],
) -> tuple[list[Record], list[Record], dict[str, int]]:
    """Train/eval records of a jsonl folder (or explicit files) and the records skipped per split; every problem of
    every split is raised at once."""
    explicit = {"train": train_file, "eval": eval_file}
    loaded = {
        label: read_task_split(name, data_dir, label, file=explicit[label], images_root=images_root, **options)
        for label in ("train", "eval")
        if want[label]
    }
    raise_problems([str(v) for v in loaded.values() if isinstance(v, DataError)])
    read = {k: v for k, v in loaded.items() if isinstance(v, JsonlData)}  # all of them, once nothing was raised
    train = read["train"].records if "train" in read else []
    evaluation = read["eval"].records if "eval" in read else []
    return train, evaluation, {k: len(v.skipped) for k, v in read.items() if v.skipped}


def _load_hub(spec: TaskSpec, split: Split, full_train: bool, seed: int) -> tuple[list[Record], list[Record], str]:
    """The recipe's Hub records, validated with the jsonl rules and the task's rules."""
    train, evaluation, origin = _load_from_hf(spec, split, full_train, seed)
    for label, records in (("train", train), ("eval", evaluation)):
        if records:
            validate_records(records, f"{origin} {label}")
    raise_problems(
        task_record_problems(spec, train, f"{origin} train") + task_record_problems(spec, evaluation, f"{origin} eval")
    )
    return train, evaluation, origin
