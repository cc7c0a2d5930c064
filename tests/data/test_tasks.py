"""load_task: argument checks, the Hub path (import guard, row converters), jsonl folders, prompts, scoring."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from PIL import Image

from phi3v_core.data import TASKS, load_task
from phi3v_core.data import tasks as tasks_module
from phi3v_core.data.tasks import cauldron_rows_to_records, docvqa_rows_to_records
from phi3v_core.errors import ConfigError, DataError

from .conftest import write_lines


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"name": "docvq"},
            ConfigError,
            "unknown task 'docvq' (did you mean 'docvqa'?); choose one of docvqa, nlvr2, hateful_memes, ucf101, jsonl",
        ),
        (
            {"name": "nlvr2", "synthetic": 4, "data_dir": "x"},
            ConfigError,
            "pass either synthetic=N or data_dir/train_file/eval_file, not both",
        ),
        ({"name": "nlvr2", "full_train": True}, ConfigError, "full_train applies to docvqa only, not 'nlvr2'"),
        (
            {"name": "ucf101"},
            ConfigError,
            "task 'ucf101' needs data_dir (a folder with *_train.jsonl, *_val.jsonl and images/, e.g. from "
            "phi3v-convert ucf101) or explicit train_file/eval_file, or synthetic=N",
        ),
        (
            {"name": "jsonl", "synthetic": 2},
            ConfigError,
            "task 'jsonl' has no synthetic twin; use one of docvqa, nlvr2, hateful_memes, ucf101",
        ),
        (
            {"name": "docvqa", "synthetic": 0, "num_crops": 17, "metric": "bleu"},
            ConfigError,
            "3 problems: synthetic must be >= 1 records, got 0; unknown metric 'bleu'; choose one of anls, accuracy; "
            "num_crops must be in 1..16 (the recipe asserts <= 16), got 17",
        ),
    ],
)
def test_argument_errors_are_reported_at_once(kwargs: dict, error: type[Exception], message: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(error) as info:
        load_task(name, **kwargs)
    assert str(info.value) == message


def test_hub_path_without_datasets_names_the_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError, installed or not
    with pytest.raises(DataError) as info:
        load_task("docvqa")
    assert str(info.value) == (
        "task 'docvqa' without data_dir needs the Hugging Face dataset nielsr/docvqa_1200_examples split 'train', "
        "but the 'datasets' package is not installed; pip install datasets (and download it), or pass data_dir=... "
        "or synthetic=N"
    )
    with pytest.raises(DataError, match=r"HuggingFaceM4/the_cauldron \(nlvr2\) split 'train\[:500\]'"):
        load_task("nlvr2", "eval")
    with pytest.raises(DataError, match=r"HuggingFaceM4/the_cauldron \(docvqa\) split 'train'"):
        load_task("docvqa", "train", full_train=True)


def test_hub_path_offline_failure_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeDatasets:
        @staticmethod
        def load_dataset(path: str, name: str | None, split: str) -> None:
            raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    with pytest.raises(DataError) as info:
        load_task("hateful_memes", "train")
    assert str(info.value) == (
        "cannot load the Hugging Face dataset HuggingFaceM4/the_cauldron (hateful_memes) split 'train[500:]' for task "
        "'hateful_memes' (ConnectionError: offline); download it while online (datasets.load_dataset) or pass "
        "data_dir=... or synthetic=N"
    )


def _page(colour: int) -> Image.Image:
    return Image.new("RGB", (40, 50), (colour, 0, 0))


def test_docvqa_rows_follow_the_recipe_prompt() -> None:
    rows = [
        {"image": _page(10), "query": {"en": "What is the date?"}, "answers": ["1 May", "May 1"]},
        {"image": _page(20), "query": {"en": "Who signed?"}, "answers": ["J. Doe"]},
    ]
    records = docvqa_rows_to_records(rows, "eval", random.Random(0))
    turn = records[0].conversations[0]
    assert turn.user == "<|image_1|>\nWhat is the date?\nAnswer briefly."
    assert turn.assistant in {"1 May", "May 1"} and turn.references == ["1 May", "May 1"]
    assert turn.images[0].load().getpixel((0, 0)) == (10, 0, 0)  # lazy: the row's image, fetched on demand
    assert records[1].id == "docvqa-eval-000001" and records[1].source == "docvqa"


def test_cauldron_rows_nlvr2_multi_turn_and_memes_first_text() -> None:
    rows = [
        {
            "images": [_page(1), _page(2)],
            "texts": [
                {"user": "Left has two dogs.", "assistant": "True", "source": "nlvr2"},
                {"user": "Right has a cat.", "assistant": "False", "source": "nlvr2"},
            ],
        }
    ]
    (record,) = cauldron_rows_to_records(rows, "nlvr2", "train", random.Random(0), num_images=2, all_turns=True)
    first, second = record.conversations
    assert first.user == "<|image_1|><|image_2|>\nLeft has two dogs." and len(first.images) == 2
    assert second.user == "Right has a cat." and second.images == [] and second.assistant == "False"
    (meme,) = cauldron_rows_to_records(rows, "hateful_memes", "eval", random.Random(0), num_images=1, all_turns=False)
    assert len(meme.conversations) == 1 and meme.conversations[0].user == "<|image_1|>\nLeft has two dogs."


def test_hub_path_with_a_fake_datasets_module(monkeypatch: pytest.MonkeyPatch) -> None:
    row = {
        "images": [_page(1), _page(2)],
        "texts": [{"user": "Q1", "assistant": "True"}, {"user": "Q2", "assistant": "False"}],
    }
    calls = []

    class FakeDatasets:
        @staticmethod
        def load_dataset(path: str, name: str | None, split: str) -> list:
            calls.append((path, name, split))
            return [row, row]

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    task = load_task("nlvr2")
    assert calls == [
        ("HuggingFaceM4/the_cauldron", "nlvr2", "train[500:]"),
        ("HuggingFaceM4/the_cauldron", "nlvr2", "train[:500]"),
    ]
    assert len(task.train[0].conversations) == 2
    assert [len(r.conversations) for r in task.eval] == [1, 1]  # recipe: first question only
    assert task.metric == "accuracy" and task.num_crops == 16


def test_synthetic_full_train_drops_answer_briefly_from_training_prompts_only() -> None:
    task = load_task("docvqa", synthetic=3, full_train=True)
    assert all(not r.conversations[0].user.endswith("Answer briefly.") for r in task.train)
    assert all(r.conversations[0].user.endswith("\nAnswer briefly.") for r in task.eval)


def test_task_defaults_prompts_eval_items_and_scoring() -> None:
    docvqa = load_task("docvqa", synthetic=2)
    assert (docvqa.metric, docvqa.num_crops, docvqa.origin) == ("anls", 16, "synthetic(seed=0)")
    assert docvqa.build_prompt("What is the total?") == "<|image_1|>\nWhat is the total?\nAnswer briefly."
    items = docvqa.eval_items()
    assert len(items) == 2 and items[0].user == docvqa.eval[0].conversations[0].user
    assert docvqa.score([i.references[0] for i in items]) == 1.0
    assert docvqa.score(["zzzzzzzzzzzzzzzzzzzzzzzzz"] * 2) == 0.0

    ucf = load_task("ucf101", synthetic=2)
    assert (ucf.metric, ucf.num_crops) == ("accuracy", 4)
    assert ucf.build_prompt("Which?", num_images=3) == "<|image_1|><|image_2|><|image_3|>\nWhich?"

    nlvr2 = load_task("nlvr2", synthetic=2, synthetic_eval=3)
    assert len(nlvr2.train) == 2 and len(nlvr2.eval) == 3
    assert len(nlvr2.eval_items()) == 3  # recipe: first question of each record only
    assert len(nlvr2.eval_items(all_turns=True)) == sum(len(r.conversations) for r in nlvr2.eval)
    assert len(nlvr2.train[0].conversations) >= 2  # training keeps every turn
    only_eval = load_task("nlvr2", "eval", synthetic=2)
    assert only_eval.train == [] and len(only_eval.eval) == 2
    assert len(load_task("hateful_memes", synthetic=10, limit=3, eval_limit=1).train) == 3


def test_eval_items_all_turns_carry_context(tmp_path: Path) -> None:
    folder = tmp_path / "multi"
    (folder / "images").mkdir(parents=True)
    _page(5).save(folder / "images" / "a.png")
    line = {
        "id": "m",
        "conversations": [
            {"images": ["a.png"], "user": "Colour?", "assistant": "Red"},
            {"user": "Sure?", "assistant": "Yes"},
        ],
    }
    write_lines(folder / "m_train.jsonl", [line])
    write_lines(folder / "m_val.jsonl", [line])
    task = load_task("jsonl", data_dir=folder)
    first, second = task.eval_items(all_turns=True)
    assert (first.id, first.context) == ("m", [])
    assert second.id == "m#1" and second.references == ["Yes"] and second.context[0].assistant == "Red"
    assert len(task.eval_items()) == 1


def test_jsonl_folder_discovery(tmp_path: Path) -> None:
    folder = tmp_path / "custom"
    (folder / "images").mkdir(parents=True)
    for k in range(3):
        _page(k).save(folder / "images" / f"f{k}.png")
    video = {
        "id": "v",
        "conversations": [{"images": [f"f{k}.png" for k in range(3)], "user": "Class?", "assistant": "A"}],
    }
    write_lines(folder / "clips_train.jsonl", [video])
    write_lines(folder / "clips_val.jsonl", [dict(video, id="w")])
    task = load_task("jsonl", data_dir=folder)
    assert task.num_crops == 4  # multi-frame data -> the model card's num_crops=4
    assert task.train[0].source == "clips" and task.origin == f"jsonl:{folder}"
    assert task.train[0].conversations[0].user == "<|image_1|><|image_2|><|image_3|>\nClass?"

    write_lines(folder / "other_train.jsonl", [video])
    with pytest.raises(DataError) as info:
        load_task("jsonl", data_dir=folder)
    assert str(info.value) == (
        f"{folder}: several *_train.jsonl files (clips_train.jsonl, other_train.jsonl); pass the file explicitly"
    )
    explicit = load_task("jsonl", train_file=folder / "other_train.jsonl", eval_file=folder / "clips_val.jsonl")
    assert [r.id for r in explicit.train] == ["v"] and [r.id for r in explicit.eval] == ["w"]

    (folder / "clips_val.jsonl").unlink()
    with pytest.raises(DataError) as info:
        load_task("jsonl", "eval", data_dir=folder)
    assert str(info.value) == f"{folder}: no *_val.jsonl file; expected e.g. data_val.jsonl next to images/"


def test_problems_in_train_and_eval_files_are_reported_together(tmp_path: Path) -> None:
    folder = tmp_path / "both"
    (folder / "images").mkdir(parents=True)
    write_lines(folder / "x_train.jsonl", ["{"])
    write_lines(folder / "x_val.jsonl", [{"id": "a"}])
    with pytest.raises(DataError) as info:
        load_task("jsonl", data_dir=folder)
    assert str(info.value) == (
        f"2 problems: {folder}/x_train.jsonl:1: invalid JSON (Expecting property name enclosed in double quotes at "
        f"column 2); write one JSON object per line; {folder}/x_val.jsonl:1: missing key 'conversations'; every "
        f"record needs 'id' and 'conversations'"
    )


def test_nlvr2_from_jsonl_needs_two_images(tmp_path: Path) -> None:
    folder = tmp_path / "nlvr2"
    (folder / "images").mkdir(parents=True)
    _page(1).save(folder / "images" / "a.png")
    write_lines(
        folder / "nlvr2_train.jsonl",
        [{"id": "x", "conversations": [{"images": ["a.png"], "user": "Q", "assistant": "True"}]}],
    )
    with pytest.raises(DataError) as info:
        load_task("nlvr2", "train", data_dir=folder)
    assert str(info.value) == f"{folder}/nlvr2_train.jsonl[0] (id 'x'): nlvr2 needs 2 images in the first turn, got 1"


def test_registry_matches_the_recipe() -> None:
    assert {name: (spec.metric, spec.num_crops) for name, spec in TASKS.items()} == {
        "docvqa": ("anls", 16),
        "nlvr2": ("accuracy", 16),
        "hateful_memes": ("accuracy", 16),
        "ucf101": ("accuracy", 4),
        "jsonl": ("accuracy", 16),
    }
    assert str(TASKS["docvqa"].hf_eval) == "nielsr/docvqa_1200_examples split 'test'"
    assert tasks_module.DOCVQA_ANSWER_SUFFIX == "\nAnswer briefly."
