"""Data for phi3v-bench: the recipe's jsonl format, task loaders, synthetic twins, metrics and torch datasets.

Typical use::

    from phi3v_core.data import load_task, EncodedDataset, PromptDataset

    task = load_task("docvqa", synthetic=32)                  # or data_dir="./docvqa", or the Hub datasets
    train_ds = EncodedDataset(task.train, processor)          # processor.encode_conversation, lazily
    eval_ds = PromptDataset(task.eval_items(), processor)     # processor.encode_prompt; eval_ds.references
    score = task.score(predictions)                           # ANLS or accuracy, in [0, 1]
"""

from phi3v_core.data.images import DEFAULT_MAX_PIXELS, check_image_file, open_image, resolve_image_path
from phi3v_core.data.jsonl import (
    JsonlData,
    atomic_directory,
    find_split_file,
    read_jsonl,
    record_to_json,
    validate_records,
    write_jsonl_folder,
)
from phi3v_core.data.metrics import ANLS_THRESHOLD, METRICS, accuracy, anls, anls_score, compute_metric
from phi3v_core.data.records import (
    ImageSource,
    LazyImage,
    Record,
    Turn,
    image_size,
    image_tag_problem,
    image_tags,
    load_image,
    with_image_tags,
)
from phi3v_core.data.seqlen import hd_padded_height_width, image_token_count_for_size, record_image_tokens
from phi3v_core.data.synthetic import (
    SYNTHETIC_TASKS,
    TWIN_PROFILES,
    TwinProfile,
    expected_mean_sequence_length,
    synthesize,
    ucf101_prompt,
)
from phi3v_core.data.tasks import TASKS, EvalItem, TaskData, TaskSpec, load_task
from phi3v_core.data.ucf101 import ConvertSummary, convert_ucf101, decode_frames, sample_frame_indices

__all__ = [
    "ANLS_THRESHOLD",
    "DEFAULT_MAX_PIXELS",
    "METRICS",
    "SYNTHETIC_TASKS",
    "TASKS",
    "TWIN_PROFILES",
    "ConversationEncoder",
    "ConvertSummary",
    "EncodedDataset",
    "EvalItem",
    "ImageSource",
    "JsonlData",
    "LazyImage",
    "PromptDataset",
    "PromptEncoder",
    "Record",
    "TaskData",
    "TaskSpec",
    "Turn",
    "TwinProfile",
    "accuracy",
    "anls",
    "anls_score",
    "atomic_directory",
    "check_image_file",
    "compute_metric",
    "convert_ucf101",
    "decode_frames",
    "expected_mean_sequence_length",
    "find_split_file",
    "hd_padded_height_width",
    "image_size",
    "image_tag_problem",
    "image_tags",
    "load_image",
    "load_task",
    "image_token_count_for_size",
    "open_image",
    "read_jsonl",
    "record_image_tokens",
    "record_to_json",
    "resolve_image_path",
    "sample_frame_indices",
    "synthesize",
    "ucf101_prompt",
    "validate_records",
    "with_image_tags",
    "write_jsonl_folder",
]

#: The torch datasets load on first use: reading and checking data (phi3v-convert check, phi3v-plan --data) needs
#: no torch, whose import alone takes seconds.
_TORCH_NAMES = ("ConversationEncoder", "EncodedDataset", "PromptDataset", "PromptEncoder")


def __getattr__(name: str) -> object:
    if name in _TORCH_NAMES:
        from phi3v_core.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
