"""Fixtures for tests/data: a small images root with good, corrupt, truncated and oversized files, and tiny videos."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image


def write_lines(path: Path, lines: list[Any]) -> Path:
    """Write jsonl lines (dicts are dumped, strings written verbatim)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def png_bytes(size: tuple[int, int] = (32, 24), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width``×``height`` (valid CRC): a decompression bomb that is never decoded."""
    data = bytearray(png_bytes((1, 1)))
    ihdr = bytearray(data[16:29])  # 13 header bytes after length + b"IHDR"
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """``<tmp>/data`` with ``images/`` holding good/corrupt/truncated/bomb files, a folder and an outside symlink."""
    root = tmp_path / "data"
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    good = png_bytes()
    (images / "good.png").write_bytes(good)
    (images / "good2.png").write_bytes(png_bytes((40, 30), (10, 10, 200)))
    (images / "corrupt.png").write_bytes(b"this is not an image" * 10)
    (images / "truncated.png").write_bytes(png_bytes((300, 200))[:150])
    (images / "bomb.png").write_bytes(bomb_png(100_000, 100_000))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(good)
    (images / "link.png").symlink_to(outside / "secret.png")
    (images / "inside_link.png").symlink_to(images / "good.png")
    return root


def write_video(path: Path, frames: int = 12, size: tuple[int, int] = (64, 48)) -> Path:
    """A tiny mpeg4 .avi whose frame ``i`` is uniformly grey at level ``i * 20`` (so tests can read frame numbers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            array = np.full((size[1], size[0], 3), min(255, i * 20), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def set_avi_frame_count(path: Path, frames: int) -> None:
    """Overwrite the frame count in the AVI headers (avih.dwTotalFrames and strh.dwLength) to fake bad metadata."""
    data = bytearray(path.read_bytes())
    avih = data.find(b"avih")
    data[avih + 8 + 16 : avih + 8 + 20] = frames.to_bytes(4, "little")
    strh = data.find(b"strh")
    data[strh + 8 + 32 : strh + 8 + 36] = frames.to_bytes(4, "little")
    path.write_bytes(bytes(data))
