"""Malformed-input corpus: every case yields one exact, located, actionable message (library and CLI)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from phi3v_core.cli.convert import main
from phi3v_core.data import load_task, read_jsonl
from phi3v_core.data.jsonl import raise_problems
from phi3v_core.errors import DataError

from .conftest import write_lines

GOOD_TURN = {"images": ["good.png"], "user": "<|image_1|>\nWhat colour is it?", "assistant": "Red"}


def record(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": "r1", "source": "test", "conversations": [dict(GOOD_TURN)]}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def turn(**overrides: Any) -> dict[str, Any]:
    base = dict(GOOD_TURN)
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


# (lines, expected message with {f} = jsonl file, {root} = images root, {real_root}/{outside} = resolved paths, kwargs)
CORPUS = [
    pytest.param(
        ['{"id": "r1", "conversations": [}'],
        "{f}:1: invalid JSON (Expecting value at column 32); write one JSON object per line",
        {},
        id="broken-json",
    ),
    pytest.param([[1, 2]], "{f}:1: expected a JSON object per line, got array", {}, id="not-an-object"),
    pytest.param(
        [record(conversations=...)],
        "{f}:1: missing key 'conversations'; every record needs 'id' and 'conversations'",
        {},
        id="missing-conversations",
    ),
    pytest.param(
        [record(id=...)], "{f}:1: missing key 'id'; every record needs 'id' and 'conversations'", {}, id="missing-id"
    ),
    pytest.param([record(id=7)], "{f}:1: 'id' must be a non-empty string, got number", {}, id="id-not-string"),
    pytest.param([record(source=5)], "{f}:1: 'source' must be a non-empty string, got number", {}, id="source-type"),
    pytest.param(
        [{"id": "r1", "conversation": [GOOD_TURN]}],
        "2 problems: {f}:1: record has unknown key 'conversation'; did you mean 'conversations'? allowed keys: id, "
        "source, conversations; {f}:1: missing key 'conversations'; every record needs 'id' and 'conversations'",
        {},
        id="typo-key",
    ),
    pytest.param(
        [record(conversations=[])],
        "{f}:1: 'conversations' must be a non-empty array of turns, got empty array",
        {},
        id="empty-conversations",
    ),
    pytest.param(
        [record(conversations=["hi"])],
        "{f}:1: conversations[0] must be an object with 'user', 'assistant' and optional 'images', got string",
        {},
        id="turn-not-object",
    ),
    pytest.param(
        [record(conversations=[turn(assistant=...)])],
        "{f}:1: conversations[0] is missing 'assistant'; every turn needs 'user' and 'assistant' strings",
        {},
        id="missing-assistant",
    ),
    pytest.param(
        [record(conversations=[turn(images=..., image=["good.png"])])],
        "{f}:1: conversations[0] has unknown key 'image'; did you mean 'images'? allowed keys: user, assistant, "
        "images, answers",
        {},
        id="turn-typo-key",
    ),
    pytest.param(
        [record(conversations=[turn(user=3)])],
        "{f}:1: conversations[0].user must be a non-empty string, got number",
        {},
        id="user-not-string",
    ),
    pytest.param(
        [record(conversations=[turn(assistant="")])],
        "{f}:1: conversations[0].assistant must be a non-empty string, got empty string",
        {},
        id="empty-assistant",
    ),
    pytest.param(
        [record(conversations=[turn(images="good.png")])],
        '{f}:1: conversations[0].images must be an array of path strings, got a string; write ["good.png"]',
        {},
        id="images-not-array",
    ),
    pytest.param(
        [record(conversations=[turn(answers=[])])],
        "{f}:1: conversations[0].answers must be a non-empty array of non-empty strings, got empty array",
        {},
        id="answers-empty",
    ),
    pytest.param(
        [record(conversations=[turn(user="<|image_1|><|image_2|>\nSame?")])],
        "{f}:1: conversations[0].user has image tags <|image_1|><|image_2|> but the turn has 1 image; "
        "use <|image_1|> exactly once, or no tag to have it prepended",
        {},
        id="more-tags-than-images",
    ),
    pytest.param(
        [record(conversations=[turn(images=[])])],
        "{f}:1: conversations[0].user has image tags <|image_1|> but the turn has no images; "
        "remove the tags or list the images",
        {},
        id="tags-without-images",
    ),
    pytest.param(
        [record(conversations=[turn(user="<|image_2|><|image_1|>\nSame?", images=["good.png", "good2.png"])])],
        "{f}:1: conversations[0].user has image tags <|image_2|><|image_1|> but the turn has 2 images; "
        "use <|image_1|>..<|image_2|> once each, in order, or no tags to have them prepended",
        {},
        id="tags-out-of-order",
    ),
    pytest.param(
        [record(conversations=[turn(user="<image>\nWhat is it?")])],
        "{f}:1: conversations[0].user contains '<image>', which the processor treats as plain text; "
        "use <|image_1|>, <|image_2|>, ... (one per image of the turn) or no tags",
        {},
        id="llava-style-tag",
    ),
    pytest.param(
        [record(), record()],
        "{f}:2: duplicate id 'r1' (first on line 1); ids must be unique",
        {},
        id="duplicate-id",
    ),
    pytest.param(
        [record(conversations=[turn(images=["nope.png"])])],
        "{f}:1: conversations[0].images[0] {root}/nope.png: file not found; fix the path or add the file",
        {},
        id="missing-image",
    ),
    pytest.param(
        [record(conversations=[turn(images=["corrupt.png"])])],
        "{f}:1: conversations[0].images[0] {root}/corrupt.png: not a readable image (unknown or corrupt format); "
        "replace the file or remove the record",
        {},
        id="corrupt-image",
    ),
    pytest.param(
        [record(conversations=[turn(images=["truncated.png"])])],
        "{f}:1: conversations[0].images[0] {root}/truncated.png: corrupt or truncated image data (",
        {"prefix": True},
        id="truncated-image",
    ),
    pytest.param(
        [record(conversations=[turn(images=["bomb.png"])])],
        "{f}:1: conversations[0].images[0] {root}/bomb.png: 100000x100000 = 10000000000 pixels exceeds "
        "max_pixels=89478485 (decompression-bomb guard); raise max_pixels if the image is genuine",
        {},
        id="decompression-bomb",
    ),
    pytest.param(
        [record()],
        "{f}:1: conversations[0].images[0] {root}/good.png: 32x24 = 768 pixels exceeds max_pixels=500 "
        "(decompression-bomb guard); raise max_pixels if the image is genuine",
        {"max_pixels": 500},
        id="over-configured-pixel-cap",
    ),
    pytest.param(
        [record(conversations=[turn(images=["sub"])])],
        "{f}:1: conversations[0].images[0] {root}/sub: is a directory, not an image file; point to the image file",
        {},
        id="image-is-directory",
    ),
    pytest.param(
        [record(conversations=[turn(images=["../outside/secret.png"])])],
        "{f}:1: conversations[0].images[0] '../outside/secret.png' contains '..'; image paths must stay inside the "
        "images root {root}",
        {},
        id="dotdot-escape",
    ),
    pytest.param(
        [record(conversations=[turn(images=["/etc/hostname"])])],
        "{f}:1: conversations[0].images[0] '/etc/hostname' is an absolute path; give paths relative to the images "
        "root {root}",
        {},
        id="absolute-path",
    ),
    pytest.param(
        [record(conversations=[turn(images=["link.png"])])],
        "{f}:1: conversations[0].images[0] 'link.png' resolves to {outside}/secret.png, outside the images root "
        "{real_root} (symlink); copy the file into the images root",
        {},
        id="symlink-outside",
    ),
    pytest.param(
        [record(conversations=[turn(images=["a\u0000.png"])])],
        "{f}:1: conversations[0].images[0] 'a\\x00.png' contains a NUL character; fix the path string",
        {},
        id="nul-in-path",
    ),
    pytest.param([], "{f}:1: the file has no records; add one JSON record per line", {}, id="empty-file"),
    pytest.param(["", "   "], "{f}:1: the file has no records; add one JSON record per line", {}, id="blank-file"),
    pytest.param(b'{"id": "\xff"}\n', "{f}:1: not valid UTF-8 (byte 8); save the file as UTF-8", {}, id="not-utf8"),
]


def _write_case(data_dir: Path, lines: list[Any] | bytes) -> Path:
    path = data_dir / "case_train.jsonl"
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        write_lines(path, lines)
    return path


def _expected(template: str, path: Path, data_dir: Path) -> str:
    root = data_dir / "images"
    return template.format(
        f=path,
        root=root,
        real_root=os.path.realpath(root),
        outside=os.path.realpath(data_dir.parent / "outside"),
    )


def _assert_message(message: str, expected: str, prefix: bool) -> None:
    if prefix:
        assert message.startswith(expected), message
        assert message.endswith("); re-export the file or remove the record"), message
    else:
        assert message == expected


@pytest.mark.parametrize(("lines", "template", "options"), CORPUS)
def test_malformed_input_library(data_dir: Path, lines: Any, template: str, options: dict[str, Any]) -> None:
    path = _write_case(data_dir, lines)
    options = dict(options)
    prefix = options.pop("prefix", False)
    with pytest.raises(DataError) as info:
        read_jsonl(path, **options)
    _assert_message(str(info.value), _expected(template, path, data_dir), prefix)


@pytest.mark.parametrize(("lines", "template", "options"), CORPUS)
def test_malformed_input_cli(
    data_dir: Path, lines: Any, template: str, options: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_case(data_dir, lines)
    argv = ["check", str(data_dir), "--split", "train"]
    if "max_pixels" in options:
        argv += ["--max_pixels", str(options["max_pixels"])]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line
    _assert_message(
        err.removeprefix("error: ").rstrip("\n"), _expected(template, path, data_dir), options.get("prefix", False)
    )


def test_every_problem_is_collected_in_line_order(data_dir: Path) -> None:
    path = write_lines(
        data_dir / "many_train.jsonl",
        [record(id="a"), "not json", record(id="b", conversations=[turn(images=["missing.png"])]), record(id=5)],
    )
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    root = data_dir / "images"
    assert str(info.value) == (
        f"3 problems: {path}:2: invalid JSON (Expecting value at column 1); write one JSON object per line; "
        f"{path}:3: conversations[0].images[0] {root}/missing.png: file not found; fix the path or add the file; "
        f"{path}:4: 'id' must be a non-empty string, got number"
    )


def test_long_problem_lists_are_capped(data_dir: Path) -> None:
    path = write_lines(data_dir / "bad_train.jsonl", ["{"] * 25)
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"25 problems (first 20 shown): {path}:1: invalid JSON")
    assert f"{path}:20: invalid JSON" in message and f"{path}:21:" not in message
    assert message.endswith("; ... and 5 more")


def test_raise_problems_single_and_none() -> None:
    raise_problems([])  # nothing to report
    with pytest.raises(DataError, match="^only one$"):
        raise_problems(["only one"])


def test_skip_bad_drops_records_with_bad_images_and_reports_the_count(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_lines(
        data_dir / "mixed_train.jsonl",
        [
            record(id="ok"),
            record(id="corrupt", conversations=[turn(images=["corrupt.png"])]),
            record(id="missing", conversations=[turn(images=["gone.png"])]),
        ],
    )
    with caplog.at_level(logging.WARNING, logger="phi3v_core.data.jsonl"):
        result = read_jsonl(path, skip_bad=True)
    assert [r.id for r in result.records] == ["ok"]
    assert len(result.skipped) == 2
    assert result.skipped[0].startswith(f"{path}:2: conversations[0].images[0] {data_dir / 'images'}/corrupt.png")
    assert "skipped 2 record(s) with bad images (skip_bad=True)" in caplog.text
    task = load_task("jsonl", "train", data_dir=data_dir, skip_bad=True)
    assert task.skipped == {"train": 2} and len(task.train) == 1


def test_skip_bad_never_skips_unsafe_paths(data_dir: Path) -> None:
    path = write_lines(
        data_dir / "x_train.jsonl", [record(), record(id="r2", conversations=[turn(images=["/etc/hostname"])])]
    )
    with pytest.raises(DataError, match=r":2: conversations\[0\].images\[0\] '/etc/hostname' is an absolute path"):
        read_jsonl(path, skip_bad=True)


def test_missing_images_folder(data_dir: Path) -> None:
    path = write_lines(data_dir / "x_train.jsonl", [record()])
    shutil.rmtree(data_dir / "images")
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    root = data_dir / "images"
    assert (
        str(info.value)
        == f"{root}: images folder not found (needed by {path}); put the images there or pass images_root"
    )


def test_missing_jsonl_file(tmp_path: Path) -> None:
    path = tmp_path / "nope_train.jsonl"
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(info.value) == f"{path}: jsonl file not found; check the path (a data folder holds <name>_train.jsonl)"


def test_valid_file_parses_into_records(data_dir: Path) -> None:
    path = write_lines(
        data_dir / "ok_train.jsonl",
        [
            # No tags: they get prepended like the recipe does for UCF-101.
            {"id": "a", "conversations": [{"images": ["good.png", "good2.png"], "user": "Same?", "assistant": "No"}]},
            # Multi-turn, conversation-wide numbering in turn 2, a symlink that stays inside the root, answers.
            {
                "id": "b",
                "source": "custom",
                "conversations": [
                    {"images": ["inside_link.png"], "user": "<|image_1|>\nColour?", "assistant": "Red"},
                    {
                        "images": ["good2.png"],
                        "user": "<|image_2|>\nAnd now?",
                        "assistant": "Blue",
                        "answers": ["Blue", "blue"],
                    },
                    {"user": "Sure?", "assistant": "Yes"},
                ],
            },
            "",
        ],
    )
    result = read_jsonl(path)
    first, second = result.records
    assert first.source == "ok"  # default: the file name before _train
    assert first.conversations[0].user == "<|image_1|><|image_2|>\nSame?"
    assert first.conversations[0].images == [data_dir / "images" / "good.png", data_dir / "images" / "good2.png"]
    assert second.source == "custom" and len(second.conversations) == 3
    assert second.conversations[1].references == ["Blue", "blue"]
    assert second.conversations[2].references == ["Yes"]
    assert result.skipped == []


def test_header_check_mode_misses_truncation_but_full_mode_catches_it(data_dir: Path) -> None:
    path = write_lines(data_dir / "t_train.jsonl", [record(conversations=[turn(images=["truncated.png"])])])
    assert len(read_jsonl(path, check_images="header").records) == 1
    with pytest.raises(DataError, match="corrupt or truncated image data"):
        read_jsonl(path, check_images="full")
