"""Data folders in the recipe's jsonl format for tests: blank images under ``images/`` and a jsonl file of records."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image


def turn(images: Iterable[str] = (), user: str = "What is shown?", assistant: str = "A cat.") -> dict[str, Any]:
    """One conversation turn showing ``images`` (file names under ``images/``)."""
    return {"images": list(images), "user": user, "assistant": assistant}


def write_folder(
    root: Path, images: Mapping[str, tuple[int, int]], records: Iterable[dict[str, Any] | str], jsonl: str = "mine_train.jsonl"
) -> Path:
    """``root/images/<name>``: a blank RGB image of each size; ``root/<jsonl>``: one record per line (dicts are
    dumped, strings written as they are). Returns ``root``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name, size in images.items():
        Image.new("RGB", size).save(root / "images" / name)
    lines = [record if isinstance(record, str) else json.dumps(record) for record in records]
    (root / jsonl).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return root
