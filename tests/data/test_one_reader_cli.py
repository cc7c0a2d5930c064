"""One data reader, from the user's side: ``phi3v-convert check`` and ``phi3v-plan --data`` refuse the same folders
with the same one-line message naming the cause and the place, never hang, never read outside the folder, and plan at
the num_crops finetune uses.

Each refusal: exit 1, one ``error:`` line, no traceback, the folder unchanged.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from phi3v_core.cli.convert import main as convert_main
from phi3v_core.data.images import check_image_file, open_image
from planner.cli import main as plan_main
from tests.data_folders import write_folder
from tests.safety_helpers import expect_user_error


def _record(rid: str = "a", images: object = ("p.png",), user: str = "What is shown?") -> dict:
    return {"id": rid, "conversations": [{"images": images, "user": user, "assistant": "A cat."}]}


def _folder(root: Path, lines: list[str] | bytes | None = None, name: str = "data") -> Path:
    """``root/<name>_train.jsonl`` (+ a matching val file) with ``images/p.png``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), "red").save(root / "images" / "p.png")
    body = lines if isinstance(lines, bytes) else "".join(line + "\n" for line in (lines or [json.dumps(_record())]))
    for split in ("train", "val"):
        path = root / f"{name}_{split}.jsonl"
        path.write_bytes(body) if isinstance(body, bytes) else path.write_text(body, encoding="utf-8")
    return root


def _check(folder: Path) -> list[str]:
    return ["check", str(folder), "--split", "train"]


def _plan(folder: Path) -> list[str]:
    return ["--gpu", "A100-80GB", "--method", "lora", "--data", str(folder)]


CLIS: list[tuple[str, Callable, Callable[[Path], list[str]]]] = [
    ("convert-check", convert_main, _check),
    ("plan-data", plan_main, _plan),
]
CLI_IDS = [name for name, _, _ in CLIS]


def _good() -> str:
    return json.dumps(_record())


def _make_gzip(root: Path) -> str:
    _folder(root, gzip.compress((_good() + "\n").encode()))
    return "is gzip-compressed; decompress it first"


def _make_array(root: Path) -> str:
    _folder(root, ("[\n  " + _good() + "\n]\n").encode())
    return "holds one JSON array, not JSON Lines"


def _make_cr_only(root: Path) -> str:
    _folder(root, (_good() + "\r" + json.dumps(_record("b")) + "\r").encode())
    return "uses CR-only line endings"


def _make_utf16(root: Path) -> str:
    _folder(root, (_good() + "\n").encode("utf-16"))
    return "is UTF-16 encoded (byte-order mark); save it as UTF-8"


def _make_string_images(root: Path) -> str:
    _folder(root, [json.dumps(_record(images="p.png"))])
    return 'images must be an array of path strings, got a string; write ["p.png"]'


def _make_dotdot(root: Path) -> str:
    _folder(root, [json.dumps(_record(images=["../secret.png"]))])
    return "data_train.jsonl:1: conversations[0].images[0] '../secret.png' contains '..'"


def _make_outside_link(root: Path) -> str:
    outside = root.parent / f"{root.name}-outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    _folder(root, [json.dumps(_record(images=["link.png"]))])
    (root / "images" / "link.png").symlink_to(outside)
    return "outside the images root"


def _make_fifo(root: Path) -> str:
    _folder(root, [json.dumps(_record(images=["pipe.png"]))])
    os.mkfifo(root / "images" / "pipe.png")
    return "data_train.jsonl:1: conversations[0].images[0]"


def _make_broken_link(root: Path) -> str:
    _folder(root, [json.dumps(_record(images=["gone.png"]))])
    (root / "images" / "gone.png").symlink_to(root / "images" / "deleted.png")
    return "is a broken symlink (points to"


def _make_loop(root: Path) -> str:
    _folder(root, [json.dumps(_record(images=["loop.png"]))])
    (root / "images" / "loop.png").symlink_to("loop2.png")
    (root / "images" / "loop2.png").symlink_to("loop.png")
    return "is a symlink loop"


def _make_nfd_name(root: Path) -> str:
    nfc = unicodedata.normalize("NFC", "café.png")
    _folder(root, [json.dumps(_record(images=[nfc]))])
    Image.new("RGB", (8, 8)).save(root / "images" / unicodedata.normalize("NFD", "café.png"))
    return "exists with the same name in NFD Unicode normalisation"


def _make_bad_json(root: Path) -> str:
    _folder(root, [_good(), '{"id": "b", "conversations": [}'])
    return "data_train.jsonl:2: invalid JSON"


def _make_missing_image(root: Path) -> str:
    _folder(root, [json.dumps(_record(images=["nope.png"]))])
    return "data_train.jsonl:1: conversations[0].images[0]"


def _make_duplicate_id(root: Path) -> str:
    _folder(root, [_good(), _good()])
    return "data_train.jsonl:2: duplicate id 'a' (first on line 1)"


def _make_zip(root: Path) -> str:
    _folder(root, b"PK\x03\x04" + b"\x00" * 40)
    return "is a zip archive, not a jsonl text file; extract it first"


def _make_jsonl_broken_link(root: Path) -> str:
    _folder(root)
    (root / "data_train.jsonl").unlink()
    (root / "data_train.jsonl").symlink_to(root / "moved_train.jsonl.bak")
    return "data_train.jsonl: jsonl file is a broken symlink (points to"


def _make_jsonl_fifo(root: Path) -> str:
    _folder(root)
    (root / "data_train.jsonl").unlink()
    os.mkfifo(root / "data_train.jsonl")
    return "data_train.jsonl: is a FIFO (named pipe), not a regular jsonl file"


CASES = {
    "gzip": _make_gzip,
    "json-array": _make_array,
    "cr-only": _make_cr_only,
    "utf16": _make_utf16,
    "images-string": _make_string_images,
    "dotdot": _make_dotdot,
    "symlink-outside": _make_outside_link,
    "fifo-image": _make_fifo,
    "broken-symlink": _make_broken_link,
    "symlink-loop": _make_loop,
    "nfc-nfd": _make_nfd_name,
    "bad-json-line": _make_bad_json,
    "missing-image": _make_missing_image,
    "duplicate-id": _make_duplicate_id,
    "zip": _make_zip,
    "jsonl-broken-symlink": _make_jsonl_broken_link,
    "jsonl-fifo": _make_jsonl_fifo,
}


@pytest.mark.parametrize("cli", CLIS, ids=CLI_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_both_readers_refuse_with_the_cause(case, cli, tmp_path, capsys):
    folder = tmp_path / "data"
    expected = CASES[case](folder)
    _, main, argv = cli
    expect_user_error(main, argv(folder), expected, tmp_path, capsys)


@pytest.mark.parametrize("case", ["fifo-image", "dotdot", "images-string", "nfc-nfd"])
def test_plan_and_check_say_the_same_thing(case, tmp_path, capsys):
    folder = tmp_path / "data"
    CASES[case](folder)
    said = [
        expect_user_error(main, argv(folder), "", tmp_path, capsys).split("error: ", 1)[1] for _, main, argv in CLIS
    ]
    assert said[0] == said[1]


def test_an_appledouble_file_next_to_the_data_is_not_a_second_split(tmp_path, capsys):
    folder = _folder(tmp_path / "data")
    (folder / "._data_train.jsonl").write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")
    assert plan_main(["--gpu", "A100-80GB", "--method", "lora", "--data", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["samples"] == 1


def test_an_appledouble_file_read_directly_is_named(tmp_path):
    from phi3v_core.data.jsonl import read_jsonl
    from phi3v_core.errors import DataError

    path = tmp_path / "._data_train.jsonl"
    path.write_bytes(b"\x00\x05\x16\x07 Mac OS X")
    with pytest.raises(DataError, match="macOS resource-fork file"):
        read_jsonl(path)


def _ucf_like(root: Path) -> Path:
    """A converted UCF-101 folder: 8 frames in one turn."""
    frames = {f"f{k}.jpg": (320, 240) for k in range(8)}
    return write_folder(root, frames, [_record(images=list(frames), user="Which action?")], "ucf101_train.jsonl")


def test_a_converted_ucf101_folder_plans_at_the_crops_finetune_uses(tmp_path, capsys):
    folder = _ucf_like(tmp_path / "ucf")
    assert plan_main(["--gpu", "A100-80GB", "--method", "lora", "--data", str(folder), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    crops = plan["data"]["num_crops"]  # the images' rule (small frames: fewer than the task's 4), and the command says it
    assert crops < 4 and f"--num_crops {crops} " in plan["methods"][0]["command"]
    assert (
        plan_main(["--gpu", "A100-80GB", "--method", "lora", "--data", str(folder), "--json", "--num-crops", "9"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["data"]["num_crops"] == 9


def test_plan_never_decodes_pixels_and_sees_exif_rotation(tmp_path, monkeypatch):
    from planner.dataprofile import profile_data
    from planner.shapes import ModelShape

    folder = _folder(tmp_path / "data", [json.dumps(_record(images=["photo.jpg"]))])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 640x480, shown 480x640
    Image.new("RGB", (640, 480)).save(folder / "images" / "photo.jpg", exif=exif)
    monkeypatch.setattr(Image.Image, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded")))
    profile = profile_data(folder, ModelShape.preset("phi-3.5-vision"))
    assert profile.samples[0].image_sizes == ((480, 640),)


def test_exif_orientation_is_applied_with_one_warning_per_file(tmp_path, caplog):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    Image.new("RGB", (64, 32), "blue").save(path, exif=exif)
    with caplog.at_level(logging.WARNING, logger="phi3v_core.data.images"):
        first, second = open_image(path), open_image(path)
    assert first.size == second.size == (32, 64) == check_image_file(path, mode="header")
    assert [r.getMessage() for r in caplog.records].count(
        f"{path}: rotated/mirrored by its EXIF orientation tag (6) as viewers show it"
    ) == 1


def test_transparency_is_dropped_like_the_reference_processor_with_a_warning(tmp_path, caplog):
    path = tmp_path / "logo.png"
    rgba = Image.new("RGBA", (16, 16), (200, 10, 10, 0))  # fully transparent red
    rgba.save(path)
    with caplog.at_level(logging.WARNING, logger="phi3v_core.data.images"):
        image = open_image(path)
    with Image.open(path) as reference:
        expected = reference.convert("RGB")  # what Microsoft's Phi3VImageProcessor does
    assert image.mode == "RGB" and image.tobytes() == expected.tobytes()
    assert any("has transparency" in r.getMessage() for r in caplog.records)


def test_an_opaque_rgb_image_changes_nothing_and_warns_nothing(tmp_path, caplog):
    path = tmp_path / "plain.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(path)
    with caplog.at_level(logging.WARNING, logger="phi3v_core.data.images"):
        image = open_image(path)
    assert image.getpixel((0, 0)) == (1, 2, 3) and not caplog.records


@pytest.mark.parametrize("cli", CLIS, ids=CLI_IDS)
def test_a_utf8_byte_order_mark_from_a_windows_editor_is_accepted(cli, tmp_path, capsys):
    folder = _folder(tmp_path / "data", b"\xef\xbb\xbf" + (_good() + "\r\n").encode())
    _, main, argv = cli
    assert main(argv(folder)) in (0, None)
    assert "error" not in capsys.readouterr().err
