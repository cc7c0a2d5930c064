"""phi3v-convert: UCF-101 conversion (the CookBook's convert_ucf101.py), bad metadata, atomic output, clean CLI errors; synthetic/check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phi3v_core.cli.convert import main
from phi3v_core.data import decode_frames, load_task, sample_frame_indices
from tests.safety_helpers import HANG_GUARD_S

from .conftest import set_avi_frame_count, write_video

CLASSES = ["Archery", "BabyCrawling"]
LAYOUT = {  # split -> class -> video stems
    "train": {"Archery": ["v_Archery_g01_c01", "v_Archery_g02_c01"], "BabyCrawling": ["v_BabyCrawling_g01_c01"]},
    "val": {"Archery": ["v_Archery_g05_c01"], "BabyCrawling": ["v_BabyCrawling_g05_c02"]},
    "test": {"BabyCrawling": ["v_BabyCrawling_g07_c01"]},
}
PROMPT = "Classify the video into one of the following classes: Archery, BabyCrawling."
# 12-frame videos: arange(0, 12, 1.5) -> frames 0,1,3,4,6,7,9,10; frame i is grey level 20*i.
EXPECTED_LEVELS = [0, 20, 60, 80, 120, 140, 180, 200]


@pytest.fixture
def ucf_src(tmp_path: Path) -> Path:
    src = tmp_path / "UCF101_subset"
    for split, classes in LAYOUT.items():
        for class_name, stems in classes.items():
            for stem in stems:
                write_video(src / split / class_name / f"{stem}.avi")
    (src / "train" / "Archery" / "notes.txt").write_text("not a video")  # ignored
    return src


def _levels(paths: list[Path]) -> list[int]:
    return [round(float(np.asarray(Image.open(p).convert("L")).mean())) for p in paths]


def test_sample_frame_indices_match_the_recipe() -> None:
    assert sample_frame_indices(12) == [0, 1, 3, 4, 6, 7, 9, 10]
    assert sample_frame_indices(4) == [0, 0, 1, 1, 2, 2, 3, 3]  # short clips repeat frames, still 8
    assert sample_frame_indices(300) == [0, 37, 75, 112, 150, 187, 225, 262]
    assert sample_frame_indices(7, 3) == [0, 2, 4]
    with pytest.raises(ValueError):
        sample_frame_indices(0)


def test_convert_writes_the_recipe_layout(ucf_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "ucf101"
    assert main(["ucf101", "--src", str(ucf_src), "--out_dir", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["classes"] == CLASSES and summary["videos"] == {"train": 3, "val": 2, "test": 1}
    assert summary["frames_per_video"] == 8 and summary["recounted"] == []
    assert sorted(p.name for p in out.iterdir()) == [
        ".phi3v-manifest.json",  # what the command wrote: a later --overwrite replaces only that
        "images",
        "ucf101_test.jsonl",
        "ucf101_train.jsonl",
        "ucf101_val.jsonl",
    ]

    records = {
        split: [json.loads(line) for line in (out / f"ucf101_{split}.jsonl").read_text().splitlines()]
        for split in LAYOUT
    }
    ids = [r["id"] for split in ("train", "val", "test") for r in records[split]]
    assert ids == [
        "train-0000000000", "train-0000000001", "train-0000000002", "val-0000000003", "val-0000000004",
        "test-0000000005",
    ]  # fmt: skip
    first = records["train"][0]
    assert first["source"] == "ucf101" and list(first) == ["id", "source", "conversations"]
    (turn,) = first["conversations"]
    assert turn == {
        "images": [f"train/Archery/v_Archery_g01_c01.{k}.jpg" for k in range(8)],
        "user": PROMPT,
        "assistant": "Archery",
    }
    assert [r["conversations"][0]["assistant"] for r in records["val"]] == CLASSES
    assert _levels([out / "images" / p for p in turn["images"]]) == pytest.approx(EXPECTED_LEVELS, abs=6)
    assert not list(out.parent.glob(".*tmp*"))  # the temporary folder was renamed, not left behind

    task = load_task("ucf101", data_dir=out)
    assert task.num_crops == 4 and len(task.train) == 3 and len(task.eval) == 2  # test split unused, as the recipe
    tags = "".join(f"<|image_{k}|>" for k in range(1, 9))
    assert task.train[0].conversations[0].user == f"{tags}\n{PROMPT}"


@pytest.mark.parametrize("metadata", [0, 5, 100])
def test_missing_or_wrong_frame_counts_are_recounted(tmp_path: Path, metadata: int) -> None:
    video = write_video(tmp_path / "clip.avi")
    set_avi_frame_count(video, metadata)
    frames, recounted = decode_frames(video)
    assert recounted is True
    assert _levels_of(frames) == pytest.approx(EXPECTED_LEVELS, abs=6)
    untouched = write_video(tmp_path / "ok.avi")
    assert decode_frames(untouched)[1] is False


def _levels_of(frames: list[Image.Image]) -> list[int]:
    return [round(float(np.asarray(f.convert("L")).mean())) for f in frames]


def test_recounted_videos_are_listed_and_the_table_is_printed(
    ucf_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken_meta = ucf_src / "val" / "Archery" / "v_Archery_g05_c01.avi"
    set_avi_frame_count(broken_meta, 0)
    assert main(["ucf101", "--src", str(ucf_src), "--out_dir", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert (
        f"wrote {tmp_path / 'o'}: UCF-101, 2 classes" in out
        and "train" in out
        and "1 video(s) had a missing or wrong frame count" in out
    )
    frames = [tmp_path / "o" / "images" / "val" / "Archery" / f"v_Archery_g05_c01.{k}.jpg" for k in range(8)]
    assert _levels(frames) == pytest.approx(EXPECTED_LEVELS, abs=6)


def test_non_empty_out_dir_is_refused_unless_overwrite(
    ucf_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as info:
        main(["ucf101", "--src", str(ucf_src), "--out_dir", str(out)])
    assert info.value.code == 1
    assert capsys.readouterr().err == (
        f"error: {out} is not empty; choose a new or empty folder, or pass --overwrite to replace it\n"
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --overwrite replaces only what phi3v-convert wrote: a file of the user's is never deleted.
    with pytest.raises(SystemExit):
        main(["ucf101", "--src", str(ucf_src), "--out_dir", str(out), "--overwrite"])
    assert "holds files phi3v-convert did not write (keep.txt)" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    (out / "ucf101_train.jsonl").write_text("old")  # an earlier conversion's output
    assert main(["ucf101", "--src", str(ucf_src), "--out_dir", str(out), "--overwrite", "--json"]) == 0
    assert (out / "ucf101_train.jsonl").read_text() != "old"
    assert main(["ucf101", "--src", str(ucf_src), "--out_dir", str(out), "--overwrite", "--json"]) == 0  # manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["UCF101_subset", "busy"]  # no temp/old folders left


def test_corrupt_video_fails_cleanly_and_writes_nothing(
    ucf_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = ucf_src / "test" / "BabyCrawling" / "v_BabyCrawling_g09_c01.avi"
    bad.write_bytes(b"definitely not a video" * 50)
    out = tmp_path / "new_parent" / "ucf101"
    with pytest.raises(SystemExit) as info:
        main(["ucf101", "--src", str(ucf_src), "--out_dir", str(out)])
    assert info.value.code == 1
    assert capsys.readouterr().err == (
        f"error: {bad}: cannot decode the video (Invalid data found when processing input); re-encode or remove it\n"
    )
    assert not (tmp_path / "new_parent").exists()  # neither the output nor the parent it created


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "error: {src}: source folder not found; pass the folder that holds train/, val/ and test/\n"),
        ("nested", "error: {src}: no train/, val/ or test/ folder (found them in {src}/UCF101_subset; pass that folder); "
                   "expected <src>/<split>/<Class>/*.avi\n"),
        ("empty", "error: {src}: no videos found; expected <src>/<split>/<Class>/*.avi\n"),
    ],
)  # fmt: skip
def test_bad_source_layouts(tmp_path: Path, setup: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    if setup == "nested":
        (src / "UCF101_subset" / "train" / "A").mkdir(parents=True)
    elif setup == "empty":
        (src / "train" / "A").mkdir(parents=True)
    with pytest.raises(SystemExit) as info:
        main(["ucf101", "--src", str(src), "--out_dir", str(tmp_path / "out")])
    assert info.value.code == 1
    assert capsys.readouterr().err == message.format(src=src)
    assert not (tmp_path / "out").exists()


def test_cli_process_exit_code_and_stderr(ucf_src: Path, tmp_path: Path) -> None:
    """The real console entry: exit 1, one line, no traceback, nothing written."""
    (ucf_src / "train" / "Archery" / "v_Archery_g09_c01.avi").write_bytes(b"junk")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "phi3v_core.cli.convert", "ucf101", "--src", str(ucf_src), "--out_dir", str(out)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "v_Archery_g09_c01.avi: cannot decode the video" in proc.stderr
    assert not out.exists()


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "phi3v-convert ucf101 --src" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["ucf101", "--help"])
    assert "example:" in capsys.readouterr().out


def test_synthetic_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "twin"
    assert main(["synthetic", "--task", "nlvr2", "--n", "3", "--n_eval", "2", "--out_dir", str(out), "--json"]) == 0
    written = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert written["splits"]["train"]["records"] == 3 and written["splits"]["eval"]["images"] == 4
    assert written["expected_mean_sequence_length"] > 0
    assert main(["check", str(out), "--task", "nlvr2", "--json"]) == 0
    checked = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert checked["splits"] == written["splits"] and checked["num_crops"] == 16
    assert main(["check", str(out), "--task", "nlvr2"]) == 0
    assert f"{out}: valid (nlvr2, metric accuracy, origin jsonl:{out})" in capsys.readouterr().out
