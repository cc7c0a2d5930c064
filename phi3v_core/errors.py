"""User-facing errors and the one CLI error handler every command shares.

Bad input must end in one clear line (what, where, how to fix), exit code 1 and no traceback.
``PHI3V_DEBUG=1`` re-raises so developers still get the stack.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

__all__ = ["Phi3VError", "ConfigError", "DataError", "ImageSizeError", "did_you_mean", "raise_all"]

F = TypeVar("F", bound=Callable[..., int | None])


class Phi3VError(Exception):
    """An error caused by the user's input or environment, printed as one line without a traceback."""


class ConfigError(Phi3VError):
    """Invalid configuration or flag combination."""


class DataError(Phi3VError):
    """Invalid data file, record or image (the message names file:line)."""


class ImageSizeError(DataError, ValueError):
    """An image size the HD transform cannot take (an empty side, or a padded size that is not a multiple of 336).

    One class wherever an image size is checked (processor, data layer, planner, model), so a caller catches one thing.
    It is a :class:`DataError` (the size usually comes from a data file) and a ``ValueError`` (what callers that
    predate this class catch).
    """


def did_you_mean(value: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a mistyped ``value`` ("" when none is close)."""
    close = difflib.get_close_matches(value, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def raise_all(problems: Iterable[str], error_cls: type[Phi3VError] = ConfigError) -> None:
    """Raise one error listing every problem at once (no-op when there are none).

    Args:
        problems: Human-readable problem descriptions.
        error_cls: Error class to raise.
    """
    problems = list(dict.fromkeys(p for p in problems if p))  # the same problem found twice is said once
    if not problems:
        return
    if len(problems) == 1:
        raise error_cls(problems[0])
    raise error_cls(f"{len(problems)} problems: " + "; ".join(problems))
