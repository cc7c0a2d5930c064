"""What every command shares: the argument parser, the console, the error handler and strict JSON output.

Torch-free (``phi3v-plan`` imports it and must stay light). One behaviour for all four commands
(``phi3v-finetune``, ``phi3v-convert``, ``phi3v-bench``, ``phi3v-plan``):

* a bad flag is one line ``error: ... (see PROG --help)`` on stderr and exit code 1 (argparse would print the
  usage and exit 2);
* a user error (:class:`~phi3v_core.errors.Phi3VError`), an unwritable or full disk, a missing file: one line,
  exit 1, no traceback; ``PHI3V_DEBUG=1`` re-raises so developers get the stack;
* SIGTERM, SIGHUP and SIGINT run the same cleanup as an exception (:mod:`phi3v_core.signals`), then exit with
  ``128 + signal``;
* ``--json`` output is strict JSON: NaN and infinities become ``null``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

from phi3v_core.cli.vocabulary import add_version
from phi3v_core.entrypoint import CliParser, debug_enabled, handle_errors, keep_working_without_stdout
from phi3v_core.io import json_safe

__all__ = [
    "keep_working_without_stdout",
    "CliParser",
    "bounded_float",
    "bounded_int",
    "command_parser",
    "console",
    "debug_enabled",
    "handle_errors",
    "strict_json",
]

def command_parser(prog: str, description: str, epilog: str) -> CliParser:
    """The top-level parser of a command: its one-line description, its examples (``epilog``, line breaks kept) and
    ``--version``."""
    parser = CliParser(prog=prog, description=description, epilog=epilog)
    add_version(parser)
    return parser


def _number(text: str, cast: Callable[[str], Any], kind: str) -> Any:
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None


def bounded_float(low: float | None = None, high: float | None = None, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type`` accepting finite floats in ``[low, high]`` (``(low, high]`` with ``low_open``).

    ``nan``, ``inf`` and out-of-range values are rejected with the range in the message.
    """

    def parse(text: str) -> float:
        value = _number(text, float, "a number")
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value <= high
        if not ok:
            left = "(" if low_open else "["
            lo = f"{low:g}" if low is not None else "-inf"
            hi = f"{high:g}" if high is not None else "inf"
            raise argparse.ArgumentTypeError(f"must be a finite number in {left}{lo}, {hi}], got {text}")
        return value

    parse.__name__ = "number"  # argparse names the type in some messages
    return parse


def bounded_int(low: int | None = None, high: int | None = None, *, also: tuple[int, ...] = ()) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers in ``[low, high]`` (or one of ``also``, e.g. ``-1``)."""

    def parse(text: str) -> int:
        if len(text) > 30:
            raise argparse.ArgumentTypeError(f"expected an integer of at most 30 digits, got {text[:20]}...")
        value = _number(text, int, "an integer")
        if value in also:
            return value
        if (low is not None and value < low) or (high is not None and value > high):
            extra = "".join(f" or {a}" for a in also)
            lo = low if low is not None else "-inf"
            hi = high if high is not None else "inf"
            raise argparse.ArgumentTypeError(f"must be an integer in {lo}..{hi}{extra}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def console(stderr: bool = False) -> Any:
    """A ``rich`` console (stdout, or stderr for progress and notes while stdout carries JSON)."""
    from rich.console import Console

    return Console(stderr=stderr)


def strict_json(payload: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes ``NaN``/``Infinity`` (they become ``null``); other kwargs as json.dumps."""
    kwargs.setdefault("default", str)
    return json.dumps(json_safe(payload), allow_nan=False, **kwargs)
