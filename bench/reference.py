"""The seed recipe's published speed and accuracy tables (``results/reference/*.csv``), loaded as DataFrames.

Provenance and measurement conditions are in ``results/reference/README.md``. These numbers were typed in from the
published document; nothing in them was measured by this project.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from phi3v_core.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ACCURACY_COLUMNS",
    "SPEED_COLUMNS",
    "default_reference_dir",
    "load_reference_accuracy",
    "load_reference_speed",
    "reference_hardware_for",
]

SPEED_COLUMNS: dict[str, type] = {
    "hardware": str,
    "gpu": str,
    "gpus_per_node": int,
    "model": str,
    "dataset": str,
    "num_crops": int,
    "avg_seq_tokens": float,
    "seed_method": str,
    "method": str,
    "nodes": int,
    "gpus": int,
    "flash_attention": bool,
    "attn": str,
    "effective_batch": int,
    "img_per_s": float,
    "speedup": float,
    "peak_gpu_mem_gb": float,
    "note": str,
}

ACCURACY_COLUMNS: dict[str, type] = {
    "benchmark": str,
    "model": str,
    "metric": str,
    "seed_method": str,
    "method": str,
    "precision": str,
    "lora_rank": int,
    "lora_alpha": int,
    "batch_size": int,
    "learning_rate": float,
    "epochs": int,
    "gpus": int,
    "value": float,
    "note": str,
}

#: Which optional columns may be empty (everything else must be filled in).
_OPTIONAL = {"note", "lora_rank", "lora_alpha"}


def default_reference_dir() -> Path:
    """Return ``results/reference`` of the source tree this package runs from."""
    return Path(__file__).resolve().parents[1] / "results" / "reference"


def _read(path: Path, columns: dict[str, type]) -> pd.DataFrame:
    import pandas as pd

    if not path.is_file():
        raise DataError(f"{path}: reference table not found; pass --reference pointing at results/reference")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}:1: missing column(s) {', '.join(missing)}")
        rows = []
        for line_no, raw in enumerate(reader, start=2):
            row = {}
            for name, kind in columns.items():
                text = (raw.get(name) or "").strip()
                if not text:
                    if name not in _OPTIONAL:
                        raise DataError(f"{path}:{line_no}: column {name!r} is empty; fill it in")
                    row[name] = None if kind is not str else ""
                    continue
                try:
                    if kind is bool:
                        if text not in ("true", "false"):
                            raise ValueError(text)
                        row[name] = text == "true"
                    else:
                        row[name] = kind(text)
                except ValueError:
                    raise DataError(f"{path}:{line_no}: column {name!r} = {text!r} is not a {kind.__name__}") from None
            rows.append(row)
    return pd.DataFrame(rows, columns=list(columns))


def load_reference_speed(reference_dir: str | Path | None = None) -> pd.DataFrame:
    """Load the published speed table (one row per method/nodes/flash-attention/hardware).

    Raises:
        DataError: The file is missing or a row is malformed (with file:line).
    """
    return _read(Path(reference_dir or default_reference_dir()) / "speed.csv", SPEED_COLUMNS)


def load_reference_accuracy(reference_dir: str | Path | None = None) -> pd.DataFrame:
    """Load the published accuracy table (DocVQA ANLS, hateful memes and NLVR2 accuracy).

    Raises:
        DataError: The file is missing or a row is malformed (with file:line).
    """
    return _read(Path(reference_dir or default_reference_dir()) / "accuracy.csv", ACCURACY_COLUMNS)


def reference_hardware_for(gpu_name: str | None) -> str:
    """Pick the published table to show beside results measured on ``gpu_name``.

    V100s get the V100 table; everything else (and CPU runs) gets the A100 table, the data-centre anchor.
    """
    return "8xV100-32GB" if gpu_name and "V100" in gpu_name.upper() else "8xA100-80GB"
