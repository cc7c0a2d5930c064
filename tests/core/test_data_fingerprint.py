"""The data identity resume compares (issue #27): image files count by their bytes, not by path, size and mtime."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from phi3v_core.data.records import Record, Turn
from phi3v_core.training import checkpoints
from phi3v_core.training.checkpoints import data_fingerprint


def _records(*paths: Path) -> list[Record]:
    return [
        Record(id=f"r{i}", source="mine", conversations=[Turn(user="<|image_1|>\nWhat?", assistant="ok", images=[p])])
        for i, p in enumerate(paths)
    ]


def _bmp(path: Path, value: int) -> Path:
    Image.new("RGB", (8, 8), (value, 0, 0)).save(path, format="BMP")  # BMP: a pixel edit keeps the file size
    return path


def test_a_same_size_image_edited_with_its_mtime_kept_is_another_data_set(tmp_path):
    image = _bmp(tmp_path / "a.bmp", 10)
    before = data_fingerprint(_records(image))
    info = image.stat()
    _bmp(image, 200)  # one pixel value differs; the size is the same
    os.utime(image, ns=(info.st_atime_ns, info.st_mtime_ns))  # and the modification time is put back
    assert image.stat().st_size == info.st_size and image.stat().st_mtime_ns == info.st_mtime_ns
    assert data_fingerprint(_records(image)) != before


def test_the_same_bytes_elsewhere_in_time_are_the_same_data(tmp_path):
    image = _bmp(tmp_path / "a.bmp", 10)
    before = data_fingerprint(_records(image))
    os.utime(image, ns=(1, 1))  # touched, not changed: still the same data set, resume goes on
    assert data_fingerprint(_records(image)) == before


def test_an_image_shared_by_records_is_read_once(tmp_path, monkeypatch):
    image = _bmp(tmp_path / "a.bmp", 10)
    read: list[Path] = []
    real = checkpoints.file_digest
    monkeypatch.setattr(checkpoints, "file_digest", lambda p: read.append(p) or real(p))
    data_fingerprint(_records(image, image, image))
    assert read == [image]
