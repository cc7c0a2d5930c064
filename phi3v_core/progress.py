"""Progress on stderr for the slow parts of a command that would otherwise be silent (torch-free).

:class:`Counter` counts a job of known size (evaluation questions, images checked): a rich bar on a terminal, plain
lines otherwise (a pipe, a log file, ``--json``), each ``done/total`` with the time so far and an ETA, at most one
every ``every_s`` seconds; a job that finishes within ``quiet_s`` prints nothing, so quick reads stay quiet.
:func:`stage` says that a step of unknown length (building the model) started and how long it took. stdout is never
touched: it may carry a JSON result.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

__all__ = ["Counter", "LiveBar", "format_seconds", "stage"]

_Bar = TypeVar("_Bar", bound="LiveBar")


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 m 05 s``, ``1 h 02 m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} m {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} m"


class LiveBar:
    """The rich bar of a progress reporter: drawn while the ``with`` block runs, once :meth:`_open_bar` made one
    (subclasses call it only when the stream is a terminal and print plain lines otherwise)."""

    _bar: Any = None
    _task: Any = None

    def _open_bar(self, stream: TextIO, description: str, total: int, *columns: Any, **fields: Any) -> None:
        """A transient bar on ``stream``: the description, the bar, then ``columns``; ``fields`` are the task's own."""
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), *columns, console=Console(file=stream),
                             transient=True)
        self._task = self._bar.add_task(description, total=total, **fields)

    def __enter__(self: _Bar) -> _Bar:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


class Counter(LiveBar):
    """``description: done/total`` on stderr while a countable job runs.

    Args:
        total: Units of work.
        description: What is counted (``eval before``, ``checking images``).
        enabled: False prints nothing.
        live: Draw a rich bar when the stream is a terminal (plain lines otherwise).
        stream: Where it goes (stderr by default).
        clock: Monotonic clock (tests pass a fake one).
        every_s: Fewest seconds between two plain lines.
        quiet_s: A job done within this many seconds prints nothing.
    """

    def __init__(
        self,
        total: int,
        description: str,
        *,
        enabled: bool = True,
        live: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        every_s: float = 5.0,
        quiet_s: float = 2.0,
    ) -> None:
        self.total, self.description, self.enabled = total, description, enabled and total > 0
        self.stream = stream or sys.stderr
        self.clock, self.every_s, self.quiet_s = clock, every_s, quiet_s
        self.done = 0
        self.started = clock()
        self._last: float | None = None
        if self.enabled and live and self.stream.isatty():
            from rich.progress import MofNCompleteColumn, TimeElapsedColumn

            self._open_bar(self.stream, description, total, MofNCompleteColumn(), TimeElapsedColumn())

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self._bar is None and self._last is not None and exc[0] is None:  # it said something: say that it finished
            self._print(f"{self.done}/{self.total} in {format_seconds(self.clock() - self.started)}")

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more units done."""
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.advance(self._task, n)
            return
        now = self.clock()
        elapsed = now - self.started
        if elapsed < self.quiet_s or (self._last is not None and now - self._last < self.every_s):
            return
        self._last = now
        left = elapsed * (self.total - self.done) / self.done if self.done else None
        eta = f", ETA {format_seconds(left)}" if left is not None else ""
        self._print(f"{self.done}/{self.total} ({format_seconds(elapsed)}{eta})")

    def _print(self, text: str) -> None:
        print(f"{self.description}: {text}", file=self.stream, flush=True)


@contextmanager
def stage(description: str, *, enabled: bool = True, stream: TextIO | None = None,
          clock: Callable[[], float] = time.monotonic) -> Iterator[Callable[[], None]]:
    """Print ``description…`` now and ``description: done in N s`` when the block (or the returned ``done()``,
    whichever comes first) ends."""
    stream = stream or sys.stderr
    started = clock()
    finished = False

    def done() -> None:
        nonlocal finished
        if enabled and not finished:
            print(f"{description}: done in {format_seconds(clock() - started)}", file=stream, flush=True)
        finished = True

    if enabled:
        print(f"{description}…", file=stream, flush=True)
    try:
        yield done
    except BaseException:
        finished = True  # the error says what happened; no "done"
        raise
    done()
