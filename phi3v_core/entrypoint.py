"""The argument parser and error handler every process entry point shares.

Below both the commands (:mod:`phi3v_core.cli`) and the training launcher (:mod:`phi3v_core.training.launch`), so the
launcher gets the same one-line errors without importing the command layer. Torch-free.
:mod:`phi3v_core.cli.common` re-exports these names; commands import them from there.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from phi3v_core.errors import Phi3VError, raise_all
from phi3v_core.fs import describe_os_error, describe_storage_error
from phi3v_core.signals import Stopped, stop_on_signals

__all__ = ["OPTIONAL_PACKAGES", "CliParser", "debug_enabled", "handle_errors", "keep_working_without_stdout"]

F = TypeVar("F", bound=Callable[..., int | None])

#: Optional packages a command imports only when it needs them (import name → pip name). A command that finds one
#: missing says so in one line with the pip command; the others run without it.
OPTIONAL_PACKAGES: dict[str, str] = {
    "av": "av",
    "bitsandbytes": "bitsandbytes",
    "datasets": "datasets",
    "deepspeed": "deepspeed",
    "flash_attn": "flash-attn",
    "Levenshtein": "Levenshtein",
}


#: Stands in for a flag value that failed its type or choices check (reported once parsing ends).
_BAD_VALUE = object()


class CliParser(argparse.ArgumentParser):
    """``argparse`` that reports bad flags as one :class:`ConfigError` line (exit 1) instead of usage + exit 2.

    Abbreviations are off: a typo such as ``--use_lor`` must not silently match a longer flag. Descriptions and epilogs
    keep their line breaks (every command's epilog is a block of examples). Subparsers made with
    ``add_subparsers().add_parser`` are of this class too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing the usage (the handler prints one line), with every bad value found so far."""
        # argparse names a flag by all its spellings (--output_dir/--out_dir/--out): name the primary one
        message = re.sub(r"^argument (--[\w-]+)(?:/--[\w-]+)+: ", r"argument \1: ", message)
        raise_all([*getattr(self, "_bad_values", []), f"{message} (see {self.prog} --help)"])
        raise AssertionError("unreachable")  # raise_all raised: it has a problem to report

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        """Parse, reporting every bad flag value at once (argparse stops at the first)."""
        self._bad_values: list[str] = []
        self._bad_dests: set[str] = set()
        parsed, extras = super().parse_known_args(args, namespace)
        if self._bad_values:
            bad = [*self._bad_values[:-1], f"{self._bad_values[-1]} (see {self.prog} --help)"]
            if getattr(self, "_collecting", None) is None:
                raise_all(bad)
            self._collecting = bad
            for action in self._actions:  # a bad value keeps its default, so the command can still map the rest
                if action.dest in self._bad_dests:
                    setattr(parsed, action.dest, action.default)
        return parsed, extras

    def parse_collecting(self, args: Any = None) -> tuple[argparse.Namespace, list[str]]:
        """Parse, returning the bad flag values instead of raising them, so a command that validates its config
        reports them with every other problem at once (an unknown flag or a missing value still raises at once).

        Returns:
            The flags (a bad value replaced by its default) and one message per bad value.
        """
        self._collecting: list[str] | None = []
        try:
            parsed = self.parse_args(args)
            return parsed, list(self._collecting)
        finally:
            self._collecting = None

    def _get_value(self, action: argparse.Action, arg_string: str) -> Any:
        # A bad value is noted and parsing goes on, so `--learning_rate 5 --lora_rank 0` reports both.
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError as exc:
            self._bad_values.append(_named(action, exc))
            self._bad_dests.add(action.dest)
            return _BAD_VALUE

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if value is _BAD_VALUE:
            return
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as exc:
            self._bad_values.append(_named(action, exc))
            self._bad_dests.add(action.dest)


def _named(action: argparse.Action, exc: argparse.ArgumentError) -> str:
    """The error under the flag's primary spelling (argparse joins every alias: ``--gpus/--count/--nproc_per_node``)."""
    name = action.option_strings[0] if action.option_strings else action.dest
    return f"argument {name}: {exc.message}"


def debug_enabled() -> bool:
    """``PHI3V_DEBUG`` is set to something other than ``0``: errors keep their traceback."""
    return os.environ.get("PHI3V_DEBUG", "") not in ("", "0")


class _StdoutGuard:
    """``sys.stdout`` for commands whose product is files: a reader that went away (``| head -1``) stops the printing,
    never the work; said once on stderr."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._gone = False

    def _lost(self) -> None:
        if not self._gone:
            self._gone = True
            _silence_stdout()  # what is still buffered goes to /dev/null, also at exit
            print(
                "note: standard output was closed by its reader; the command goes on and writes its files, "
                "the rest of its printed output is dropped",
                file=sys.stderr,
            )

    def write(self, text: str) -> int:
        """Write, or drop once the reader is gone."""
        if not self._gone:
            try:
                return self._stream.write(text)
            except (BrokenPipeError, ValueError):
                self._lost()
        return len(text)

    def flush(self) -> None:
        """Flush, or drop once the reader is gone."""
        if not self._gone:
            try:
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                self._lost()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def keep_working_without_stdout() -> None:
    """For a command whose product is files: its work goes on when the stdout reader goes away (said on stderr)."""
    if sys.stdout is not None and not isinstance(sys.stdout, _StdoutGuard):
        sys.stdout = _StdoutGuard(sys.stdout)


def _reopen_closed_std_fds() -> None:
    """Put /dev/null on a closed stdin/stdout/stderr (``>&-``): the next file opened would take its number, and a
    print would then write into it (a lock file, a result)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the process's stdout, open until exit
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115


def _flush_stdout() -> None:
    """Flush stdout, naming it when that fails (``> /dev/full``); a closed pipe stays a quiet BrokenPipeError."""
    if sys.stdout is None:
        return
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


def _missing_optional_package(exc: BaseException) -> str | None:
    """The one line for an optional package this command needs and cannot import; ``None`` for any other error."""
    if not isinstance(exc, ModuleNotFoundError):
        return None
    package = OPTIONAL_PACKAGES.get((exc.name or "").partition(".")[0])
    if package is None:
        return None
    return f"this command needs the optional package {package}, which is not installed: pip install {package}"


def handle_errors(main: F) -> F:
    """Decorate a CLI ``main``: every error becomes one ``error: ...`` line on stderr and exit code 1.

    User errors keep their message; OS and storage errors are translated to name the path and the cause (full disk,
    file-size limit, read-only, permission); anything else (a bug) is named with its type and the hint to set
    ``PHI3V_DEBUG=1``, which re-raises every error with its traceback.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int | None:
        _reopen_closed_std_fds()
        try:
            with stop_on_signals():
                result = main(*args, **kwargs)
            _flush_stdout()  # a full disk or closed stdout shows only here, at the last write
            return result
        except KeyboardInterrupt as exc:
            # SIGTERM/SIGHUP/SIGINT: every cleanup has run (locks released, transactions finished or rolled back).
            signum = exc.signum if isinstance(exc, Stopped) else 2
            print(f"error: {exc or 'interrupted'}; cleaned up, nothing half-written", file=sys.stderr)
            sys.exit(128 + signum)
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
            missing = _missing_optional_package(exc)
            if missing is not None:
                _fail(missing)
            _fail(f"{type(exc).__name__}: {exc} (set PHI3V_DEBUG=1 for the traceback)")
        return None  # unreachable: every branch exits

    return wrapper  # type: ignore[return-value]
