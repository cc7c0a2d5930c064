"""Progress of ``phi3v-bench run`` on stderr: repeat i/N, step j/M and an ETA, in every mode.

Rank 0 of each repeat's worker writes its state to ``progress.json`` in the repeat's scratch folder
(:class:`bench.worker.ProgressFile`: the phase, the last finished optimizer step and the steps of the repeat); the
runner reads it while it waits (:func:`read_progress`) and hands it to a :class:`RunProgress`, which draws a rich bar
on a terminal and prints plain lines otherwise (a pipe, a log file, ``--json``), at most one every
``min_interval_s`` unless the repeat or the phase changes. stdout is never touched: it carries the result.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from phi3v_core.progress import LiveBar, format_seconds

__all__ = ["PROGRESS_FILE", "RunProgress", "read_progress"]

#: The file rank 0 of a repeat writes in the repeat's scratch folder.
PROGRESS_FILE = "progress.json"


def read_progress(folder: Path) -> dict[str, Any] | None:
    """The worker's last state in ``folder`` (None before it wrote one, or while it is being replaced)."""
    try:
        return json.loads((folder / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None


class RunProgress(LiveBar):
    """Turns the runner's ``(repeat, state)`` reports into a bar (terminal) or plain lines (otherwise).

    Args:
        repeats: Repeats of the run (N).
        live: Draw a rich bar (only when stderr is a terminal; otherwise plain lines are printed anyway).
        stream: Where plain lines go (stderr by default).
        clock: Monotonic clock (tests pass a fake one).
        min_interval_s: Fewest seconds between two plain lines of the same repeat and phase.
    """

    def __init__(
        self,
        repeats: int,
        *,
        live: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        min_interval_s: float = 10.0,
    ) -> None:
        self.repeats = repeats
        self.stream = stream or sys.stderr
        self.clock = clock
        self.min_interval_s = min_interval_s
        self.started = clock()
        # Each repeat is a fresh process (start, model build, steps): once one has finished, the time left is the
        # repeats still to run at the finished ones' mean length, less what the current repeat has already taken.
        self._repeat: int | None = None
        self._repeat_started = self.started
        self._finished: list[float] = []
        self._last_key: tuple[Any, ...] | None = None
        self._last_line = float("-inf")
        if live and self.stream.isatty():
            from rich.progress import TextColumn

            self._open_bar(self.stream, "starting…", repeats, TextColumn("{task.fields[eta]}"), eta="")

    def describe(self, repeat: int, state: dict[str, Any] | None) -> tuple[str, float]:
        """The text for ``repeat`` (0-based) in ``state``, and the share of the run done."""
        head = f"repeat {repeat + 1}/{self.repeats}"
        state = state or {}
        phase, step, total = state.get("phase", "starting"), int(state.get("step") or 0), state.get("total")
        done = repeat / self.repeats
        if phase == "done":
            return f"{head} · finished", (repeat + 1) / self.repeats
        if phase != "training" or not total:
            what = "building the model" if phase == "building" else "starting a fresh process"
            return f"{head} · {what}", done
        done += step / int(total) / self.repeats
        warmup = int(state.get("warmup") or 0)
        label = f"step {step}/{total}" + (" (warmup)" if 0 < step <= warmup else "")
        return f"{head} · {label}", done

    def eta(self, done: float) -> str:
        """``ETA 3 m 05 s``: from the finished repeats' mean length once one has finished, before that from the time
        so far and the share of steps done (a share of 0 has none yet)."""
        now = self.clock()
        elapsed = now - self.started
        if self._finished and self._repeat is not None:
            mean = sum(self._finished) / len(self._finished)
            current_done = len(self._finished) > self._repeat
            left = mean * (self.repeats - self._repeat - (1 if current_done else 0))
            left -= 0 if current_done else now - self._repeat_started
            return f"elapsed {format_seconds(elapsed)}, ETA {format_seconds(max(left, 0.0))}"
        if done <= 0:
            return f"elapsed {format_seconds(elapsed)}, ETA after the first step"
        return f"elapsed {format_seconds(elapsed)}, ETA {format_seconds(elapsed * (1 - done) / done)}"

    def _track(self, repeat: int, state: dict[str, Any] | None) -> None:
        """Note when ``repeat`` started and, once, how long it took."""
        now = self.clock()
        if repeat != self._repeat:
            self._repeat = repeat
            self._repeat_started = self._repeat_started if repeat == 0 else now
        if (state or {}).get("phase") == "done" and len(self._finished) == repeat:
            self._finished.append(now - self._repeat_started)

    def update(self, repeat: int, state: dict[str, Any] | None) -> None:
        """Report ``repeat`` (0-based) in ``state`` (:func:`read_progress`'s dict, or ``{"phase": "done"}``)."""
        self._track(repeat, state)
        text, done = self.describe(repeat, state)
        eta = self.eta(done) if done < 1 else f"elapsed {format_seconds(self.clock() - self.started)}"
        if self._bar is not None:
            self._bar.update(self._task, description=text, completed=done * self.repeats, eta=eta)
            return
        key = (repeat, (state or {}).get("phase"), (state or {}).get("step"))
        now = self.clock()
        phase_changed = self._last_key is None or key[:2] != self._last_key[:2]
        if key == self._last_key or (not phase_changed and now - self._last_line < self.min_interval_s):
            return
        self._last_key, self._last_line = key, now
        print(f"phi3v-bench run: {text} · {eta}", file=self.stream, flush=True)
