"""What every command shares: the argument parser, the console, the error handler and strict JSON output.

Torch-free (``phi3v-plan`` imports it and must stay light). One behaviour for all four commands
(``phi3v-finetune``, ``phi3v-convert``, ``phi3v-bench``, ``phi3v-plan``):

* a bad flag is one line ``error: ... (see PROG --help)`` on stderr and exit code 1 (argparse would print the
  usage and exit 2);
* a user error (:class:`~phi3v_core.errors.Phi3VError`), an unwritable or full disk, a missing file: one line,
  exit 1, no traceback; ``PHI3V_DEBUG=1`` re-raises so developers get the stack;
* ``--json`` output is strict JSON: NaN and infinities become ``null``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from phi3v_core.errors import ConfigError, Phi3VError
from phi3v_core.fs import describe_os_error, describe_storage_error
from phi3v_core.io import json_safe

__all__ = [
    "CliParser",
    "bounded_float",
    "bounded_int",
    "console",
    "debug_enabled",
    "handle_errors",
    "strict_json",
]

F = TypeVar("F", bound=Callable[..., int | None])


class CliParser(argparse.ArgumentParser):
    """``argparse`` that reports bad flags as one :class:`ConfigError` line (exit 1) instead of usage + exit 2.

    Abbreviations are off: a typo such as ``--use_lor`` must not silently match a longer flag. Subparsers made with
    ``add_subparsers().add_parser`` are of this class too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing the usage (the handler prints one line)."""
        raise ConfigError(f"{message} (see {self.prog} --help)")


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


def debug_enabled() -> bool:
    """``PHI3V_DEBUG`` is set to something other than ``0``: errors keep their traceback."""
    return os.environ.get("PHI3V_DEBUG", "") not in ("", "0")


def strict_json(payload: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes ``NaN``/``Infinity`` (they become ``null``); other kwargs as json.dumps."""
    kwargs.setdefault("default", str)
    return json.dumps(json_safe(payload), allow_nan=False, **kwargs)


def _flush_stdout() -> None:
    """Flush stdout, naming it when that fails (``> /dev/full``); a closed pipe stays a quiet BrokenPipeError."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        _silence_stdout()
        raise Phi3VError(describe_os_error(exc, "writing to standard output (stdout)")) from None


def _stdout_broken() -> bool:
    """Whether stdout itself cannot be written (then an OSError without a file name came from printing).

    Probed with one newline: only on this failure path, where the command's output is incomplete anyway.
    """
    try:
        sys.stdout.write("\n")
        sys.stdout.flush()
    except OSError:
        _silence_stdout()
        return True
    return False


def _silence_stdout() -> None:
    # Point stdout at /dev/null so Python's own flush at exit does not print a second, raw error.
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def handle_errors(main: F) -> F:
    """Decorate a CLI ``main``: every error becomes one ``error: ...`` line on stderr and exit code 1.

    User errors keep their message; OS and storage errors are translated to name the path and the cause (full disk,
    file-size limit, read-only, permission); anything else (a bug) is named with its type and the hint to set
    ``PHI3V_DEBUG=1``, which re-raises every error with its traceback.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int | None:
        try:
            result = main(*args, **kwargs)
            _flush_stdout()  # a full disk or closed stdout shows only here, at the last write
            return result
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        except SystemExit:
            raise
        except BrokenPipeError:
            # The reader went away (`phi3v-plan --json | head`): stop quietly, as Unix tools do, and keep Python from
            # complaining again when it flushes stdout at exit.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a tool killed by the signal
        except Phi3VError as exc:
            if debug_enabled():
                raise
            _fail(str(exc))
        except OSError as exc:
            if debug_enabled():
                raise
            if exc.filename is None and _stdout_broken():
                _fail(describe_os_error(exc, "writing to standard output (stdout)"))
            _fail(describe_os_error(exc))
        except RecursionError:
            if debug_enabled():
                raise
            _fail("input nested too deeply to process; flatten the data (set PHI3V_DEBUG=1 for the traceback)")
        except Exception as exc:  # noqa: BLE001 - last line of defence for a clean CLI
            if debug_enabled():
                raise
            storage = describe_storage_error(exc)
            if storage is not None:
                _fail(storage)
            _fail(f"{type(exc).__name__}: {exc} (set PHI3V_DEBUG=1 for the traceback)")
        return None  # unreachable: every branch exits

    return wrapper  # type: ignore[return-value]
