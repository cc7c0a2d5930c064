"""The planner's trace cache: reading one cached trace, or saying why it cannot be used.

A cached trace is rebuilt (traced again and overwritten atomically by :func:`planner.trace.trace_activations`) when it
is missing, unreadable, or not a trace of the requested configuration.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["read_cached_trace"]


def read_cached_trace(path: Path, key: str) -> dict[str, Any] | None:
    """A cached trace, or ``None`` when there is none or it is unusable (then it is traced again and overwritten).

    A corrupt file (a crash mid-write before atomic writes, a full disk, an edit) is named in a warning instead of
    failing every later plan with a bare ``JSONDecodeError``, and a file that parses but lacks the numbers a trace holds
    is never reported as ``cached: true``.
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        usable = (
            isinstance(data, dict)
            and data.get("key") == key
            and all(isinstance(data.get(name), (int, float)) for name in ("dynamic", "micro_batch", "seq_len"))
            and isinstance(data.get("dynamic_snapshot"), dict)
            and isinstance(data.get("peak"), dict)
        )
        reason = "it is not a trace of this configuration"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        usable, reason = False, f"it cannot be read ({type(exc).__name__}: {exc})"
    if not usable:
        logging.getLogger(__name__).warning("trace cache %s ignored and rebuilt: %s", path, reason)
        return None
    data["cached"] = True
    return data
