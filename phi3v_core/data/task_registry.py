"""The task registry and the one way a task's jsonl split is read (shared by finetune, convert check and the planner).

:data:`TASKS` holds each task's static facts; :func:`read_task_split` reads one split of a jsonl folder with every
check training applies; :func:`default_num_crops` is the num_crops finetune uses when none is given, and
:func:`task_of_folder` names the task a converted folder was written for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from phi3v_core.data.images import DEFAULT_MAX_PIXELS, ImageCheck
from phi3v_core.data.jsonl import JsonlData, find_split_file, raise_problems, read_jsonl
from phi3v_core.data.records import Record
from phi3v_core.data.synthetic import DOCVQA_ANSWER_SUFFIX
from phi3v_core.errors import ConfigError, DataError

__all__ = [
    "TASKS",
    "HFSource",
    "Split",
    "TaskSpec",
    "default_num_crops",
    "read_task_split",
    "task_of_folder",
    "task_record_problems",
]

Split = Literal["train", "eval", "all"]


@dataclass(frozen=True)
class HFSource:
    """A Hugging Face dataset split: ``datasets.load_dataset(path, name, split=split)``."""

    path: str
    name: str | None
    split: str

    def __str__(self) -> str:
        config = f" ({self.name})" if self.name else ""
        return f"{self.path}{config} split {self.split!r}"


@dataclass(frozen=True)
class TaskSpec:
    """Static facts about a task.

    Attributes:
        name: Task name.
        metric: ``"anls"`` or ``"accuracy"``.
        num_crops: The recipe's processor num_crops.
        answer_suffix: Text appended to questions in the eval/inference prompt ("\\nAnswer briefly." for DocVQA).
        hf_train: Recipe training data on the Hub (``None``: needs ``data_dir``).
        hf_eval: Recipe eval data on the Hub.
        hf_train_full: ``--full_train`` training data (DocVQA only).
        first_turn_images: Images required in the first turn (NLVR2: 2), ``None`` for any.
    """

    name: str
    metric: str
    num_crops: int
    answer_suffix: str = ""
    hf_train: HFSource | None = None
    hf_eval: HFSource | None = None
    hf_train_full: HFSource | None = None
    first_turn_images: int | None = None


_DOCVQA_MINI = "nielsr/docvqa_1200_examples"
_CAULDRON = "HuggingFaceM4/the_cauldron"

#: Registered tasks.
TASKS: dict[str, TaskSpec] = {
    "docvqa": TaskSpec(
        "docvqa",
        "anls",
        16,
        DOCVQA_ANSWER_SUFFIX,
        hf_train=HFSource(_DOCVQA_MINI, None, "train"),
        hf_eval=HFSource(_DOCVQA_MINI, None, "test"),
        hf_train_full=HFSource(_CAULDRON, "docvqa", "train"),
    ),
    "nlvr2": TaskSpec(
        "nlvr2",
        "accuracy",
        16,
        hf_train=HFSource(_CAULDRON, "nlvr2", "train[500:]"),
        hf_eval=HFSource(_CAULDRON, "nlvr2", "train[:500]"),
        first_turn_images=2,
    ),
    "hateful_memes": TaskSpec(
        "hateful_memes",
        "accuracy",
        16,
        hf_train=HFSource(_CAULDRON, "hateful_memes", "train[500:]"),
        hf_eval=HFSource(_CAULDRON, "hateful_memes", "train[:500]"),
    ),
    "ucf101": TaskSpec("ucf101", "accuracy", 4),
    "jsonl": TaskSpec("jsonl", "accuracy", 16),
}


def task_record_problems(spec: TaskSpec, records: Sequence[Record], origin: str) -> list[str]:
    """Rules a task sets beyond the format (NLVR2: exactly two images in the first turn), as ``origin[i]`` lines."""
    problems = []
    if spec.first_turn_images is not None:
        for index, record in enumerate(records):
            count = len(record.conversations[0].images)
            if count != spec.first_turn_images:
                problems.append(
                    f"{origin}[{index}] (id {record.id!r}): {spec.name} needs {spec.first_turn_images} images in the "
                    f"first turn, got {count}"
                )
    return problems


def read_task_split(
    name: str,
    data_dir: str | Path | None,
    split: Literal["train", "eval"],
    *,
    file: str | Path | None = None,
    images_root: str | Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    check_images: ImageCheck = "full",
    skip_bad: bool = False,
    raise_errors: bool = False,
) -> JsonlData | DataError:
    """Read one split of a jsonl folder for task ``name`` with every check training applies.

    The one path by which finetune (:func:`load_task`), ``phi3v-convert check`` and ``phi3v-plan --data`` read data:
    the same file choice (``<name>_<split>.jsonl`` preferred), reader, path rules and task rules (NLVR2's two images).

    Args:
        name: Task name (``jsonl`` for any custom folder).
        data_dir: Folder holding ``*_train.jsonl`` / ``*_val.jsonl`` and ``images/`` (ignored when ``file`` is given).
        split: ``"train"`` or ``"eval"`` (the ``*_val.jsonl`` file).
        file: An explicit jsonl file instead of searching ``data_dir``.
        images_root: Images folder (default ``<data_dir>/images`` or ``images/`` next to the file).
        max_pixels: Per-image pixel cap.
        check_images: ``"full"``, ``"header"`` or ``"none"``.
        skip_bad: Drop records with bad image files instead of failing.
        raise_errors: Raise the :class:`DataError` instead of returning it (callers reading several splits return
            it, to report every split's problems at once).

    Returns:
        The records read, or (``raise_errors=False``) the error listing every problem.
    """
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    spec = TASKS[name]
    root = Path(images_root) if images_root is not None else (Path(data_dir) / "images" if data_dir else None)
    try:
        if file is not None:
            path = Path(file)
        else:
            path = find_split_file(data_dir, "train" if split == "train" else "val", None if name == "jsonl" else name)  # type: ignore[arg-type]
        result = read_jsonl(
            path,
            root,
            max_pixels=max_pixels,
            check_images=check_images,
            skip_bad=skip_bad,
            default_source=None if name == "jsonl" else name,
        )
        raise_problems(task_record_problems(spec, result.records, str(path)))
    except DataError as exc:
        if raise_errors:
            raise
        return exc
    return result


def task_of_folder(data_dir: str | Path, fallback: str = "jsonl") -> str:
    """The task a data folder was written for, read from its file name (``ucf101_train.jsonl`` -> ``ucf101``, as
    ``phi3v-convert`` names it); ``fallback`` when the name is not a registered task."""
    names = sorted(p.name.rsplit("_train.jsonl", 1)[0] for p in Path(data_dir).glob("*_train.jsonl"))
    known = [n for n in names if n in TASKS and n != "jsonl"]
    return known[0] if len(known) == 1 else fallback


def default_num_crops(name: str, records: Sequence[Record]) -> int:
    """The num_crops finetune uses for task ``name`` on ``records`` when none is given.

    Custom folders (``jsonl``): the model card advises num_crops=4 for multi-frame input (3+ images in one turn, e.g.
    video frames) and 16 for single images; NLVR2's two images keep 16 as in the recipe.
    """
    spec = TASKS[name]
    if spec.name == "jsonl" and any(len(t.images) > 2 for r in records for t in r.conversations):
        return 4
    return spec.num_crops
