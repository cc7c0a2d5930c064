"""The seed recipe's published speed and accuracy tables as DataFrames (``phi3v-bench report``).

Read through the one reader, :func:`phi3v_core.reference.reference_rows` (the packaged ``recipe.json`` copy, or the
CSV files of a ``--reference`` folder). Provenance and measurement conditions are in ``results/reference/README.md``.
These numbers were typed in from the published document; nothing in them was measured by this project.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from phi3v_core.reference import ACCURACY_COLUMNS, SPEED_COLUMNS, reference_rows

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["load_reference_accuracy", "load_reference_speed", "reference_hardware_for"]


def load_reference_speed(reference_dir: str | Path | None = None) -> pd.DataFrame:
    """Load the published speed table (one row per method/nodes/flash-attention/hardware).

    Raises:
        DataError: A ``reference_dir`` lacks ``speed.csv`` or a row is malformed (with file:line).
    """
    import pandas as pd

    return pd.DataFrame(list(reference_rows("speed", reference_dir)), columns=list(SPEED_COLUMNS))


def load_reference_accuracy(reference_dir: str | Path | None = None) -> pd.DataFrame:
    """Load the published accuracy table (DocVQA ANLS, hateful memes and NLVR2 accuracy).

    Raises:
        DataError: A ``reference_dir`` lacks ``accuracy.csv`` or a row is malformed (with file:line).
    """
    import pandas as pd

    return pd.DataFrame(list(reference_rows("accuracy", reference_dir)), columns=list(ACCURACY_COLUMNS))


def reference_hardware_for(gpu_name: str | None) -> str:
    """Pick the published table to show beside results measured on ``gpu_name``.

    V100s get the V100 table; everything else (and CPU runs) gets the A100 table, the data-centre anchor.
    """
    return "8xV100-32GB" if gpu_name and "V100" in gpu_name.upper() else "8xA100-80GB"
