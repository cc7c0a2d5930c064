"""Progress where commands were silent (issue #24 §4): phi3v-finetune's model build and evaluation, phi3v-convert
check's images - plain stderr lines when not a terminal, quiet for quick jobs, stdout untouched."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import pytest

import phi3v_core.data.jsonl_reader
from phi3v_core.cli.convert import main as convert_main
from phi3v_core.progress import Counter, format_seconds, stage
from tests.data_folders import turn, write_folder


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_counter_prints_done_total_and_eta_after_the_quiet_time_and_a_last_line() -> None:
    stream, clock = io.StringIO(), _Clock()
    with Counter(8, "eval before", stream=stream, clock=clock, every_s=5, quiet_s=2) as counter:
        clock.now = 1
        counter.advance()  # within the quiet time: nothing
        clock.now = 4
        counter.advance()
        clock.now = 6
        counter.advance()  # under every_s since the last line: nothing
        clock.now = 12
        counter.advance(5)
    assert stream.getvalue().splitlines() == [
        "eval before: 2/8 (4 s, ETA 12 s)",
        "eval before: 8/8 (12 s, ETA 0 s)",
        "eval before: 8/8 in 12 s",
    ]


def test_a_quick_job_prints_nothing() -> None:
    stream, clock = io.StringIO(), _Clock()
    with Counter(3, "checking images", stream=stream, clock=clock) as counter:
        counter.advance(3)
    assert stream.getvalue() == ""


def test_stage_says_when_it_started_and_how_long_it_took() -> None:
    stream, clock = io.StringIO(), _Clock()
    with stage("train: building the model", stream=stream, clock=clock) as done:
        clock.now = 75
        done()  # the Trainer's on_train_begin
        clock.now = 500  # training itself: not the stage's time
    assert stream.getvalue().splitlines() == ["train: building the model…", "train: building the model: done in 1 m 15 s"]
    assert format_seconds(3720) == "1 h 02 m"


def test_convert_check_shows_progress_over_images_on_stderr(tmp_path: Path, monkeypatch, capsys) -> None:
    records = [{"id": f"r{i}", "conversations": [turn([f"{i}.png"], "q?", "a")]} for i in range(4)]
    data = write_folder(tmp_path / "data", {f"{i}.png": (32 + i, 24) for i in range(4)}, records)
    # As if every image took seconds: no quiet time, a line per image.
    monkeypatch.setattr(phi3v_core.data.jsonl_reader, "Counter", functools.partial(Counter, quiet_s=0, every_s=0))
    assert convert_main(["check", str(data), "--split", "train", "--json"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("checking images: ")]
    assert lines[0].startswith("checking images: 1/4") and lines[-1].startswith("checking images: 4/4 in ")
    json.loads(captured.out)  # stdout: the JSON summary only


@pytest.mark.parametrize("enabled", [True, False])
def test_stage_can_be_off(enabled: bool) -> None:
    stream = io.StringIO()
    with stage("x", enabled=enabled, stream=stream):
        pass
    assert bool(stream.getvalue()) is enabled
