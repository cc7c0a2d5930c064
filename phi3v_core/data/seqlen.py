"""Image-token arithmetic (the HD rule and token count of the checkpoint's processing_phi3_v.py) for sequence-length profiles, without touching pixels.

The processor resizes every image so its long side is ``scale·336`` (the largest scale whose crop grid fits
``num_crops``), pads the short side to a multiple of 336 and emits ``N = 144·hc·wc + 12·hc + 157`` placeholder tokens,
``hc``/``wc`` being the padded height/width in 336-pixel crops. The count depends only on the aspect ratio. The rule
and the formula live in :mod:`phi3v_core.constants`; this module applies them to records.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from phi3v_core.constants import hd_padded_height_width, image_token_count_for_size
from phi3v_core.data.records import Record, image_size
from phi3v_core.errors import DataError

__all__ = [
    "hd_padded_height_width",
    "image_token_count_for_size",
    "mean_image_tokens",
    "record_image_tokens",
    "too_long_error",
]


def record_image_tokens(record: Record, num_crops: int) -> int:
    """Total image placeholder tokens of a record (image sizes from headers / lazy metadata, no decoding)."""
    return sum(image_token_count_for_size(*image_size(src), num_crops) for src in record.images)


def mean_image_tokens(sizes: Iterable[tuple[tuple[int, int], float]], num_crops: int) -> float:
    """Expected image tokens under a weighted distribution of ``((width, height), weight)``."""
    pairs = list(sizes)
    total = sum(w for _, w in pairs)
    return sum(image_token_count_for_size(wd, ht, num_crops) * w for (wd, ht), w in pairs) / total


def too_long_error(origin: str, too_long: Sequence[str], max_length: int) -> DataError:
    """The one refusal of records longer than ``max_length`` tokens (finetune, ``phi3v-convert check``, ``phi3v-plan
    --data`` all raise it, so the three name the same records with the same reason and fixes).

    Args:
        origin: Where the records came from (a data folder, a jsonl file).
        too_long: One ``record 'id': N tokens (M image)`` per offender, with its ``file:line`` where known.
        max_length: The limit (``--max_length``, default the model context).
    """
    shown = "; ".join(too_long[:3]) + (f"; and {len(too_long) - 3} more" if len(too_long) > 3 else "")
    return DataError(
        f"{origin}: {len(too_long)} training record(s) longer than --max_length {max_length} ({shown}); "
        "records are never truncated: shorten them, lower --num_crops, or raise --max_length (up to the "
        "model context)"
    )
