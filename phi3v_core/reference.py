"""The one reader of the seed recipe's published speed and accuracy tables (torch-free).

The tables live twice, by design: ``phi3v_core/recipe.json`` (``reference_speed``, ``reference_accuracy``; packaged,
so an installed planner has them) and ``results/reference/*.csv`` (the human-readable copy with its provenance in
``results/reference/README.md``; ``tests/core/test_constants.py`` checks the two hold the same rows). Both are read
here, through one typed, validated path: the planner's calibration, ``phi3v-bench report`` and the plan's quoted
accuracies all call :func:`reference_rows`. Without a folder the packaged rows are used; ``--reference DIR`` reads
that folder's CSV files instead.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from phi3v_core.constants import load_recipe
from phi3v_core.errors import DataError

__all__ = ["ACCURACY_COLUMNS", "SPEED_COLUMNS", "TABLES", "default_reference_dir", "reference_rows",
           "reference_source"]

SPEED_COLUMNS: dict[str, type] = {
    "hardware": str, "gpu": str, "gpus_per_node": int, "model": str, "dataset": str, "num_crops": int,
    "avg_seq_tokens": float, "seed_method": str, "method": str, "nodes": int, "gpus": int, "flash_attention": bool,
    "attn": str, "effective_batch": int, "img_per_s": float, "speedup": float, "peak_gpu_mem_gb": float, "note": str,
}  # fmt: skip
ACCURACY_COLUMNS: dict[str, type] = {
    "benchmark": str, "model": str, "metric": str, "seed_method": str, "method": str, "precision": str,
    "lora_rank": int, "lora_alpha": int, "batch_size": int, "learning_rate": float, "epochs": int, "gpus": int,
    "value": float, "note": str,
}  # fmt: skip
#: Table name → its columns and their types.
TABLES: dict[str, dict[str, type]] = {"speed": SPEED_COLUMNS, "accuracy": ACCURACY_COLUMNS}
#: Columns that may be empty (every other one must be filled in): "" for text, None for numbers.
_OPTIONAL = {"note", "lora_rank", "lora_alpha"}


def default_reference_dir() -> Path:
    """``results/reference`` of the source tree this package runs from (the CSV copy; may be absent when installed)."""
    return Path(__file__).resolve().parents[1] / "results" / "reference"


def _value(name: str, kind: type, value: Any, where: str) -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        if name not in _OPTIONAL:
            raise DataError(f"{where}: column {name!r} is empty; fill it in")
        return "" if kind is str else None
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text not in ("true", "false"):
                raise DataError(f"{where}: column {name!r} = {text!r} is not a bool")
            return text == "true"
        try:
            return kind(text)
        except ValueError:
            raise DataError(f"{where}: column {name!r} = {text!r} is not a {kind.__name__}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(f"{where}: column {name!r} = {value!r} is not a {kind.__name__}")
    return value


def _typed(raw: dict[str, Any], columns: dict[str, type], where: str) -> dict[str, Any]:
    return {name: _value(name, kind, raw.get(name), where) for name, kind in columns.items()}


def reference_source(table: str, reference_dir: str | Path | None = None) -> str:
    """Where :func:`reference_rows` reads ``table`` from (for reports and ``--calibration``)."""
    if reference_dir is None:
        return f"phi3v_core/recipe.json reference_{table} (= results/reference/{table}.csv)"
    return str(Path(reference_dir) / f"{table}.csv")


def reference_rows(table: str, reference_dir: str | Path | None = None) -> tuple[dict[str, Any], ...]:
    """The published ``table`` (``speed`` or ``accuracy``) as typed rows, every column checked.

    Args:
        table: ``speed`` or ``accuracy``.
        reference_dir: A folder holding ``<table>.csv``; None reads the packaged copy in ``recipe.json``.

    Raises:
        DataError: The file is missing, a column is absent, or a row is malformed (``file:line``).
    """
    columns = TABLES[table]
    if reference_dir is None:
        where = f"phi3v_core/recipe.json reference_{table}"
        rows = getattr(load_recipe(), f"reference_{table}")
        return tuple(_typed(row, columns, f"{where}[{i}]") for i, row in enumerate(rows))
    path = Path(reference_dir) / f"{table}.csv"
    if not path.is_file():
        raise DataError(f"{path}: reference table not found; pass --reference pointing at results/reference")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}:1: missing column(s) {', '.join(missing)}")
        return tuple(_typed(raw, columns, f"{path}:{line}") for line, raw in enumerate(reader, start=2))
