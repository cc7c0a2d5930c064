"""Data and phi3v-convert bad input: special files, control tokens, unencodable text, nesting, huge numbers, bounds,
and output folders that hold the source or someone else's files.

Each case: exit 1, one ``error:`` line naming file:line (or the flag) and the fix, no traceback, nothing changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from phi3v_core.cli.convert import main
from phi3v_core.data.jsonl import MAX_IMAGES_PER_RECORD, MAX_TEXT_CHARS
from tests.safety_helpers import expect_user_error

from .conftest import write_video


def _record(user: str = "<|image_1|>\nWhat is shown?", assistant: str = "a shape", **extra: Any) -> dict[str, Any]:
    turn = {"user": user, "assistant": assistant, "images": ["good.png"], **extra}
    return {"id": "r1", "conversations": [turn]}


def _write(data_dir: Path, line: str | dict[str, Any]) -> Path:
    path = data_dir / "case_train.jsonl"
    path.write_text((line if isinstance(line, str) else json.dumps(line)) + "\n", encoding="utf-8")
    return path


def _check(data_dir: Path) -> list[str]:
    return ["check", str(data_dir), "--split", "train"]


TEXT_CASES = [
    (_record(assistant="yes<|endoftext|>"), "conversations[0].assistant contains the chat control token '<|endoftext|>'"),
    (_record(assistant="no <|end|> more"), "conversations[0].assistant contains the chat control token '<|end|>'"),
    (_record(user="<|image_1|>\nQ <|assistant|> A"), "conversations[0].user contains the chat control token '<|assistant|>'"),
    (_record(user="<|user|> hi"), "conversations[0].user contains the chat control token '<|user|>'"),
    (_record(assistant="</s>"), "conversations[0].assistant contains the chat control token '</s>'"),
    (_record(assistant="x <|system|>"), "contains the chat control token '<|system|>'"),
    (_record(assistant="x <|placeholder3|>"), "contains the chat control token '<|placeholder3|>'"),
    (_record(answers=["ok", "<|end|>"]), "conversations[0].answers[1] contains the chat control token '<|end|>'"),
    (_record(assistant="see <|image_1|>"), "conversations[0].assistant contains the image tag '<|image_1|>'"),
    ('{"id": "r1", "conversations": [{"user": "\\ud800 Q", "assistant": "A", "images": ["good.png"]}]}',
     "conversations[0].user holds an unencodable character '\\ud800' at position 0"),
    ('{"id": "r1", "conversations": [{"user": "Q", "assistant": "A \\udfff", "images": ["good.png"]}]}',
     "conversations[0].assistant holds an unencodable character"),
    ('{"id": "\\ud83d", "conversations": [{"user": "Q", "assistant": "A", "images": ["good.png"]}]}',
     "'id' holds an unencodable character"),
    ('{"id": "r1", "conversations": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested too deeply"),
    ('{"id": ' + "9" * 5000 + ', "conversations": []}', "unreadable JSON value (Exceeds the limit"),
    ({"id": "r1", "conversations": [{"user": "Q", "assistant": "A", "images": ["good.png"] * (MAX_IMAGES_PER_RECORD + 1)}]},
     f"the record has {MAX_IMAGES_PER_RECORD + 1} images (limit {MAX_IMAGES_PER_RECORD} per record)"),
    (_record(assistant="a" * (MAX_TEXT_CHARS + 1)), f"conversations[0].assistant is {MAX_TEXT_CHARS + 1} characters long"),
]  # fmt: skip


@pytest.mark.parametrize(("line", "message"), TEXT_CASES, ids=[f"text{i}" for i in range(len(TEXT_CASES))])
def test_bad_text_is_named_with_file_and_line(data_dir, line, message, capsys):
    path = _write(data_dir, line)
    err = expect_user_error(main, _check(data_dir), message, data_dir.parent, capsys)
    assert f"{path}:1: " in err


def test_a_fifo_image_is_rejected_without_hanging(data_dir, capsys):
    os.mkfifo(data_dir / "images" / "pipe.png")
    _write(data_dir, {"id": "r1", "conversations": [{"user": "Q", "assistant": "A", "images": ["pipe.png"]}]})
    expect_user_error(
        main, _check(data_dir), "pipe.png: is a FIFO (named pipe), not a regular image file", data_dir.parent, capsys
    )


def test_a_fifo_jsonl_is_rejected_without_hanging(data_dir, capsys):
    os.mkfifo(data_dir / "case_train.jsonl")
    expect_user_error(
        main, _check(data_dir), "case_train.jsonl: is a FIFO (named pipe), not a regular jsonl file", data_dir.parent, capsys
    )


def test_a_device_image_is_rejected(data_dir, capsys):
    (data_dir / "images" / "null.png").symlink_to("/dev/null")
    _write(data_dir, {"id": "r1", "conversations": [{"user": "Q", "assistant": "A", "images": ["null.png"]}]})
    expect_user_error(main, _check(data_dir), "outside the images root", data_dir.parent, capsys)


def test_a_device_jsonl_is_rejected():
    from phi3v_core.data.jsonl import read_jsonl
    from phi3v_core.errors import DataError

    with pytest.raises(DataError, match=r"^/dev/zero: is a device, not a regular jsonl file"):
        read_jsonl("/dev/zero")  # an endless file: reading it would never finish


def test_training_runs_the_same_validation_as_check(data_dir, capsys):
    """phi3v-finetune --task jsonl reports the same file:line problem as phi3v-convert check."""
    from phi3v_core.cli import finetune

    path = _write(data_dir, _record(assistant="yes<|endoftext|>"))
    (data_dir / "case_val.jsonl").write_text(path.read_text())
    # --no-eval reads the training file only, as check --split train does
    check_err = expect_user_error(main, ["check", str(data_dir), "--split", "train"], "chat control token",
                                  data_dir.parent, capsys)
    train_err = expect_user_error(
        finetune.main,
        ["--task", "jsonl", "--data_dir", str(data_dir), "--output_dir", str(data_dir.parent / "run"), "--no-eval"],
        "chat control token",
        data_dir.parent,
        capsys,
    )
    assert check_err == train_err


# -- phi3v-convert flags and output folders ---------------------------------------------------------------------------

FLAG_CASES = [
    (["synthetic", "--task", "docvqa", "--n", "0", "--out_dir", "OUT"], "argument --n: must be an integer in 1..100000, got 0"),
    (["synthetic", "--task", "docvqa", "--n", "1000000000", "--out_dir", "OUT"], "argument --n: must be an integer in 1..100000"),
    (["synthetic", "--task", "docvqa", "--n", "2", "--n_eval", "0", "--out_dir", "OUT"], "argument --n_eval: must be an integer"),
    (["synthetic", "--task", "docvqa", "--n", "2", "--seed", "-1", "--out_dir", "OUT"], "argument --seed: must be an integer in 0..4294967295"),
    (["synthetic", "--task", "docvqa", "--n", "x", "--out_dir", "OUT"], "argument --n: expected an integer, got 'x'"),
    (["synthetic", "--task", "docvq", "--n", "2", "--out_dir", "OUT"], "argument --task: invalid choice: 'docvq'"),
    (["synthetic", "--n", "2", "--out_dir", "OUT"], "the following arguments are required: --task"),
    (["ucf101", "--src", "SRC", "--out_dir", "OUT", "--num_frames", "0"], "argument --num_frames: must be an integer in 1..64, got 0"),
    (["check", "DATA", "--max_pixels", "0"], "argument --max_pixels: must be an integer in 1..1000000000, got 0"),
    (["bogus"], "invalid choice: 'bogus' (choose from 'ucf101', 'synthetic', 'check')"),
    (["check", "DATA", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "the following arguments are required: {ucf101,synthetic,check}"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), FLAG_CASES, ids=[" ".join(a)[:40] for a, _ in FLAG_CASES])
def test_convert_bad_flags_are_one_line_exit_1(data_dir, argv, message, capsys):
    subs = {"OUT": str(data_dir.parent / "out"), "SRC": str(data_dir), "DATA": str(data_dir)}
    expect_user_error(main, [subs.get(a, a) for a in argv], message, data_dir.parent, capsys)
    assert not (data_dir.parent / "out").exists()


@pytest.fixture
def ucf_src(tmp_path: Path) -> Path:
    src = tmp_path / "videos" / "UCF101_subset"
    for split in ("train", "val", "test"):
        write_video(src / split / "Archery" / "v_Archery_g01_c01.avi")
    (tmp_path / "videos" / "unrelated.txt").write_text("someone else's file")
    return src


def test_overwrite_with_an_output_that_contains_the_source_is_refused(ucf_src, capsys):
    out = ucf_src.parent  # holds the source videos and an unrelated file
    expect_user_error(
        main,
        ["ucf101", "--src", str(ucf_src), "--out_dir", str(out), "--overwrite"],
        f"--out_dir {out} contains the source folder --src {ucf_src}; replacing it would delete the source",
        ucf_src.parent.parent,
        capsys,
    )


def test_output_that_is_the_source_is_refused(ucf_src, capsys):
    expect_user_error(
        main,
        ["ucf101", "--src", str(ucf_src), "--out_dir", str(ucf_src), "--overwrite"],
        f"--out_dir {ucf_src} is the source folder --src {ucf_src}",
        ucf_src.parent.parent,
        capsys,
    )


def test_output_inside_the_source_is_refused(ucf_src, capsys):
    expect_user_error(
        main,
        ["ucf101", "--src", str(ucf_src), "--out_dir", str(ucf_src / "converted")],
        "is inside the source folder --src",
        ucf_src.parent.parent,
        capsys,
    )


def test_synthetic_overwrite_never_deletes_foreign_files(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    expect_user_error(
        main,
        ["synthetic", "--task", "docvqa", "--n", "2", "--out_dir", str(out), "--overwrite"],
        f"--out_dir {out} holds files phi3v-convert did not write (thesis.tex)",
        tmp_path,
        capsys,
    )


def test_synthetic_output_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    expect_user_error(
        main, ["synthetic", "--task", "docvqa", "--n", "2", "--out_dir", str(target)], "exists and is not a folder", tmp_path, capsys
    )


def test_synthetic_output_below_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    expect_user_error(
        main,
        ["synthetic", "--task", "docvqa", "--n", "2", "--out_dir", str(tmp_path / "file" / "out")],
        "is a file, not a folder",
        tmp_path,
        capsys,
    )


def test_synthetic_overwrite_replaces_its_own_output(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["synthetic", "--task", "docvqa", "--n", "2", "--out_dir", str(out), "--json"]) == 0
    assert main(["synthetic", "--task", "docvqa", "--n", "3", "--out_dir", str(out), "--overwrite", "--json"]) == 0
    lines = (out / "docvqa_train.jsonl").read_text().splitlines()
    assert len(lines) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    capsys.readouterr()


def test_check_reports_records_longer_than_max_length_like_training(tmp_path, capsys):
    out = tmp_path / "twin"
    assert main(["synthetic", "--task", "docvqa", "--n", "2", "--out_dir", str(out), "--json"]) == 0
    capsys.readouterr()
    expect_user_error(
        main,
        ["check", str(out), "--task", "docvqa", "--max_length", "32"],
        "2 training record(s) longer than --max_length 32",
        tmp_path,
        capsys,
    )


def test_a_jsonl_symlink_out_of_the_data_folder_is_refused(data_dir, tmp_path, capsys):
    outside = tmp_path / "elsewhere_train.jsonl"
    outside.write_text(json.dumps(_record()) + "\n")
    (data_dir / "case_train.jsonl").symlink_to(outside)
    expect_user_error(main, _check(data_dir), "outside the data folder", tmp_path, capsys)
