"""What a failed benchmark repeat was: out of memory (GPU or host), killed, timed out, or an error.

Statuses (stored in results; :data:`bench.matrix.FINISHED_STATUSES` says which a re-run of a sweep skips):

* ``oom``: the GPU ran out of memory - in any spelling torch, NCCL, the CUDA driver, cuBLAS or cuDNN use
  (:data:`OOM_MARKERS`, case-insensitive);
* ``host_oom``: the host ran out (``MemoryError``, torch's CPU allocator, the kernel's OOM killer naming the worker);
* ``killed``: a worker died from a signal and nothing says it ran out of memory - never guessed from SIGKILL alone,
  which a scheduler or a user sends too;
* ``timeout``: the runner killed the repeat at ``--timeout``;
* ``error``: anything else (the first failing rank's message).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from typing import Any

from phi3v_core.cli.vocabulary import plural

__all__ = [
    "HOST_OOM",
    "HOST_OOM_MARKERS",
    "KILLED",
    "OOM",
    "OOM_MARKERS",
    "RepeatOutcome",
    "classify_repeat",
    "kernel_log_lines",
    "killing_signal",
    "last_error_line",
    "looks_like_oom",
    "oom_status",
    "rank_failure",
    "run_notes",
]

#: Statuses of a failed repeat besides ``error`` and ``timeout``: ``oom`` is the GPU running out of memory,
#: ``host_oom`` the host (RAM) running out, ``killed`` a worker that died from a signal with no out-of-memory evidence
#: (never guessed from the signal alone: the OOM killer, a scheduler and a user all send SIGKILL).
OOM, HOST_OOM, KILLED = "oom", "host_oom", "killed"
#: How the host running out of memory shows up (checked before :data:`OOM_MARKERS`: the kernel's "Out of memory:
#: Killed process" line would otherwise read as a GPU OOM). Regular expressions, matched case-insensitively.
HOST_OOM_MARKERS = (
    r"out of memory: kill(ed)? process",  # the kernel's OOM killer (dmesg)
    r"oom-kill(er)?\b.*\bkilled",
    r"defaultcpuallocator: (can't allocate|not enough) memory",  # torch's CPU allocator
    r"\bmemoryerror\b",  # Python's MemoryError (not torch's OutOfMemoryError: no word boundary inside it)
    r"cannot allocate memory",  # ENOMEM (fork, mmap)
    r"std::bad_alloc",
)
#: How a GPU out-of-memory failure shows up in a worker's message or log (torch, NCCL, the CUDA driver, cuBLAS,
#: cuDNN), matched case-insensitively; the last one catches older spellings ("RuntimeError: out of memory").
OOM_MARKERS = (
    r"outofmemoryerror",
    r"cuda out of memory",
    r"cuda error: out of memory",
    r"cuda failure \d+ 'out of memory'",  # NCCL
    r"cuda driver error: out of memory",
    r"cublas_status_alloc_failed",
    r"cudnn_status_alloc_failed",
    r"cudaerrormemoryallocation",
    r"\bout of memory\b",
)
_HOST_RE = re.compile("|".join(HOST_OOM_MARKERS), re.IGNORECASE)
_GPU_RE = re.compile("|".join(OOM_MARKERS), re.IGNORECASE)
# torchrun's report of a worker that died from a signal: "Signal 9 (SIGKILL) received by PID 123".
_TORCHRUN_SIGNAL_RE = re.compile(r"Signal (\d+) \((SIG[A-Z0-9]+)\) received", re.IGNORECASE)
_TORCHRUN_EXIT_RE = re.compile(r"exitcode\s*:\s*-(\d+)")


def oom_status(text: str) -> str | None:
    """``"host_oom"`` or ``"oom"`` (GPU) when ``text`` (an exception message or a log) reports running out of
    memory in any of the known forms (case-insensitive), else ``None``."""
    if _HOST_RE.search(text):
        return HOST_OOM
    if _GPU_RE.search(text):
        return OOM
    return None


def looks_like_oom(text: str) -> bool:
    """Whether ``text`` reports running out of memory, GPU or host (see :func:`oom_status`)."""
    return oom_status(text) is not None



@dataclass
class RepeatOutcome:
    """What one repeat left behind, as the runner saw it.

    Attributes:
        payloads: The ranks' ``rank<R>.json`` payloads that were written.
        log: The tail of the launched commands' output.
        timed_out: The runner killed the repeat at its timeout.
        return_codes: Exit codes of the launched commands (negative: killed by that signal).
        wall_s: Seconds from launch to exit.
        kernel_log: Kernel log lines naming a worker PID (the OOM killer's), when ``dmesg`` is readable.
    """

    payloads: list[dict[str, Any]]
    log: str
    timed_out: bool
    return_codes: list[int | None]
    wall_s: float | None = None
    kernel_log: str = ""


def last_error_line(log: str) -> str:
    """The last line of ``log`` that mentions an error (what a worker that wrote no result died of)."""
    for line in reversed(log.strip().splitlines()):
        if "Error" in line or "error" in line:
            return line.strip()[:300]
    return "worker exited without a result (see the log)"


def rank_failure(payloads: list[dict[str, Any]], log: str) -> tuple[str, str, int | None] | None:
    """``(status, message, failed_at_step)`` of the first rank that reported a failure (an ``error`` whose message
    or log shows an OOM becomes ``oom``/``host_oom``), ``None`` when every payload is ``ok``."""
    bad = [p for p in payloads if p.get("status") != "ok"]
    if not bad:
        return None
    first = bad[0]
    status = first.get("status", "error")
    message = first.get("message", "")
    if status == "error":
        status = oom_status(message) or oom_status(log) or status
    return status, message or last_error_line(log), first.get("failed_at_step")


def killing_signal(repeat: RepeatOutcome) -> str | None:
    """The name of the signal that killed a worker (its exit code, or torchrun's report of it), else ``None``."""
    numbers = [-code for code in repeat.return_codes if code is not None and code < 0]
    numbers += [int(m.group(1)) for m in _TORCHRUN_SIGNAL_RE.finditer(repeat.log)]
    numbers += [int(m.group(1)) for m in _TORCHRUN_EXIT_RE.finditer(repeat.log)]
    for number in numbers:
        try:
            return signal.Signals(number).name
        except ValueError:
            return f"signal {number}"
    return None


def classify_repeat(repeat: RepeatOutcome, timeout_s: float | None) -> tuple[str, str, int | None] | None:
    """``(status, message, failed_at_step)`` of a failed repeat, ``None`` for a good one.

    A worker that died from a signal is ``killed`` with the signal's name, unless the evidence - its log or the
    kernel's OOM-killer line naming its PID - says it ran out of memory (then ``host_oom``/``oom``).
    """
    failure = rank_failure(repeat.payloads, repeat.log)
    if repeat.timed_out:
        if failure is not None:  # a rank failed and the others waited for it in a collective until the timeout
            return failure[0], f"{failure[1]} (the other ranks then hung until the timeout)", failure[2]
        return "timeout", f"repeat killed after the {timeout_s:g} s timeout (--timeout); a hung collective?", None
    if failure is None and not repeat.payloads and any(repeat.return_codes):
        failure = ("error", last_error_line(repeat.log), None)
    signal_name = killing_signal(repeat)
    if signal_name is None or (failure is not None and failure[0] != "error"):
        return failure
    reported = any(p.get("status") != "ok" for p in repeat.payloads)
    if reported and signal_name in ("SIGTERM", "SIGINT"):
        return failure  # torchrun stops the other workers with SIGTERM after one rank failed: the rank's error stands
    step = failure[2] if failure is not None else None
    also = f" ({failure[1]})" if reported and failure is not None else ""
    evidence = oom_status(repeat.kernel_log) or oom_status(repeat.log)
    if evidence is not None:
        source = "the kernel's OOM killer named it" if oom_status(repeat.kernel_log) else "its log reports out of memory"
        return evidence, f"worker killed by {signal_name}; {source}{also}", step
    # The kernel's OOM killer sends SIGKILL only: name it as a possible sender of that signal alone.
    senders = (
        "the kernel's OOM killer, a scheduler or a user may have sent it; `dmesg` tells which"
        if signal_name == "SIGKILL"
        else "a scheduler, a user or a parent that was stopped sent it"
    )
    return KILLED, f"worker killed by {signal_name} with no out-of-memory message in its log ({senders}){also}", step


def kernel_log_lines(pids: list[int]) -> str:
    """Kernel log lines that name one of ``pids`` (the OOM killer's "Killed process <pid>"); ``""`` where ``dmesg``
    cannot be read (most containers, unprivileged users)."""
    if not pids or shutil.which("dmesg") is None:
        return ""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    wanted = re.compile(r"\b(" + "|".join(str(pid) for pid in pids) + r")\b")
    return "\n".join(line for line in out.splitlines() if wanted.search(line))


def run_notes(result: Any) -> list[str]:
    """Lines to print under a run's numbers: where its time went, fp16 loss-scaler skips (and whether any fell in the
    timed window), and when the NVML peak is the whole device's memory. ``result`` is a :class:`bench.results.BenchResult`."""
    s, notes = result.summary, []
    if s.wall_s:
        steps = f"; warm-up + timed steps {s.steps_s:.1f} s ({s.steps_s / s.wall_s:.0%})" if s.steps_s else ""
        notes.append(f"run took {s.wall_s:.1f} s{steps}")
    skipped = [(i, r.skipped_timed_steps) for i, r in enumerate(result.metrics.repeats, 1) if r.skipped_timed_steps]
    if s.skipped_steps:
        where = "; ".join(f"repeat {i}: timed steps {steps}" for i, steps in skipped) or "none in the timed window"
        notes.append(f"the fp16 loss scaler skipped {plural(s.skipped_steps, 'step')} (no weight update): {where}")
    from bench.dataload import data_wait_note

    metrics = result.metrics
    samples = metrics.repeats[0].step_samples[0] if metrics.repeats and metrics.repeats[0].step_samples else None
    wait = data_wait_note(metrics.repeats, metrics.processor_samples_per_s, samples)
    if wait:
        notes.append(wait)
    if any(m.nvml_source == "device_used" for r in result.metrics.repeats for m in r.memory):
        notes.append("NVML peak is the device's used memory (no per-process numbers here, e.g. a container)")
    return notes
