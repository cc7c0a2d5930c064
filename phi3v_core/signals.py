"""One stop policy for every command: SIGTERM, SIGHUP and SIGINT run the same cleanup as an exception.

Torch-free. Python's default for SIGTERM (what SLURM, ``timeout`` and ``kill`` send) and SIGHUP is to die at once,
skipping every ``finally`` block: locks, temporary folders and half-done replacements would be left behind.
:func:`stop_on_signals` turns them into :class:`Stopped`, a ``KeyboardInterrupt`` (what Ctrl-C raises), so one
cleanup path serves all of them. A second signal while that cleanup runs is noted and ignored, so the cleanup is
not cut short (SIGKILL still stops the process; the journaled transactions of :mod:`phi3v_core.transaction` are
finished by the next command).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["STOP_SIGNALS", "Stopped", "stop_on_signals", "stops_deferred"]

#: Signals turned into :class:`Stopped`.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class Stopped(KeyboardInterrupt):
    """The process was asked to stop by a signal; cleanup runs as for any exception.

    Attributes:
        signum: The signal number (the exit code is ``128 + signum``, as a shell reports a process killed by it).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


_state: dict[str, Any] = {"installed": 0, "stopping": False, "deferring": 0, "pending": None}


def _handler(signum: int, _frame: Any) -> None:
    if _state["deferring"]:
        _state["pending"] = _state["pending"] or signum  # raised when the critical section ends
        return
    if _state["stopping"]:
        print(f"note: {signal.Signals(signum).name} received again; still cleaning up", file=sys.stderr)
        return
    _state["stopping"] = True
    raise Stopped(signum)


@contextlib.contextmanager
def stops_deferred() -> Iterator[None]:
    """A few steps that must not be cut in the middle (a folder swap's renames): a stop lands right after them.

    Works whichever thread the kernel delivered the signal to (a mask alone does not: Python runs its handlers in
    the main thread when any thread received the signal).
    """
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
    if not _state["deferring"] and _state["pending"] is not None:
        signum, _state["pending"] = _state["pending"], None
        _handler(signum, None)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM/SIGHUP/SIGINT raise :class:`Stopped` (once; later ones are ignored).

    Nests (an inner use changes nothing) and does nothing outside the main thread (Python delivers signals there).
    """
    if threading.current_thread() is not threading.main_thread() or _state["installed"]:
        yield
        return
    previous = {sig: signal.signal(sig, _handler) for sig in STOP_SIGNALS}
    _state["installed"] = 1
    _state["stopping"] = False
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _state["installed"] = 0
        _state["stopping"] = False
