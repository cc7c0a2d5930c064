"""The measurement protocol of one repeat, hooked into the real Trainer loop through callbacks.

The protocol (the order is the contract; :attr:`InstrumentedSteps.events` records it and tests check it):

1. **Timed window opens** at the start of the first timed step, *before its clock starts* (the worker lists
   :class:`InstrumentedSteps` ahead of the :class:`~phi3v_core.training.callbacks.StepTimer`; :class:`TimedWindow`
   holds the pair in that order for the worker and the selfcheck alike): the device is
   synchronised and the window's trackers start, one per concern (:class:`Tracker`): a background NVML sampler
   (:class:`NvmlMemory`, period <= 100 ms, one NVML query per sample: :class:`phi3v_core.nvml.ProcessMemoryReader`),
   CUDA's peak statistics (:class:`CudaPeaks`, reset), the energy counter (:class:`GpuEnergy`) and the host's peak
   RSS (:class:`HostRss`).
2. Timed steps are plain training steps (only :class:`~phi3v_core.training.callbacks.StepTimer` runs, with device
   synchronisation).
3. **Timed window closes** at the end of the last timed step: the device is synchronised and the trackers stop in
   reverse order (energy, CUDA peaks, NVML sampler, RSS), *before anything else runs*. These are the stored peaks.
4. Instrumented work comes after, and can neither change a stored peak nor turn an ``ok`` repeat into ``oom``:

   * a **memory step** (CPU only) under :class:`LiveTensorBytes` (:class:`TensorPeak`): peak bytes of live tensor storage, the CPU
     counterpart of ``torch.cuda.max_memory_allocated`` (torch's ``MemTracker`` cannot attach to models whose frozen
     parameters do not require gradients, which is every LoRA/QLoRA model);
   * the **FLOP count** of one step, on rank 0 (:mod:`bench.flop_count`: analytic by default, or the fake-tensor
     trace with ``--flops trace``); it costs no GPU memory.
"""

from __future__ import annotations

import atexit
import os
import resource
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import TrainerCallback

__all__ = [
    "NVML_PERIOD_S",
    "CudaPeaks",
    "GpuEnergy",
    "HostRss",
    "InstrumentedSteps",
    "LiveTensorBytes",
    "NvmlMemory",
    "NvmlReader",
    "PeakSampler",
    "TensorPeak",
    "TimedWindow",
    "Tracker",
    "cpu_rss_peak_bytes",
    "gpu_memory",
    "nvml_process_reader",
]

#: NVML sampling period of the timed window (the issue asks for <= 100 ms).
NVML_PERIOD_S = 0.05


class LiveTensorBytes(TorchDispatchMode):
    """Track the bytes of tensor storages alive while the mode is active, and their peak.

    Storages that exist on entry (weights, gradients, optimizer states) are counted once through ``baseline``;
    every storage an op creates is added when it appears and subtracted when it is freed (a weakref callback).
    """

    def __init__(self, baseline: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self._alive: dict[int, tuple[int, weakref.ref]] = {}
        self.current = 0
        self.peak = 0
        for tensor in baseline or []:
            self._add(tensor)
        self.peak = self.current

    def _add(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or wrapper subclasses
            return
        key = storage.data_ptr()
        if key == 0 or key in self._alive:
            return
        size = storage.nbytes()

        def release(_ref: weakref.ref, key: int = key, size: int = size) -> None:
            if self._alive.pop(key, None) is not None:
                self.current -= size

        self._alive[key] = (size, weakref.ref(storage, release))
        self.current += size
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self._add(tensor)
        return out


def _state_tensors(model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = []
    if model is not None:
        for param in model.parameters():
            tensors.append(param)
            if param.grad is not None:
                tensors.append(param.grad)
        tensors.extend(model.buffers())
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return tensors


def cpu_rss_peak_bytes() -> int:
    """Peak resident set size of this process (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def gpu_memory(device: torch.device) -> tuple[int | None, int | None]:
    """``(max allocated, max reserved)`` bytes on a CUDA device since the last reset; ``(None, None)`` elsewhere."""
    if device.type != "cuda":
        return None, None
    return int(torch.cuda.max_memory_allocated(device)), int(torch.cuda.max_memory_reserved(device))


@dataclass(frozen=True)
class NvmlReader:
    """What :attr:`InstrumentedSteps.nvml_reader` returns: ``read()`` bytes, ``close()``, and ``source()``.

    ``source()`` says what the readings are: ``"process"`` (this process's memory) or ``"device_used"`` (NVML
    listed no process with our PID - a container - so the device's used memory); ``None`` when nothing was read.
    ``energy_mj()`` reads the device's total-energy counter (millijoules; ``None`` where it is missing). A plain
    ``(read, close)`` tuple is accepted too and read as process memory, without energy.
    """

    read: Callable[[], int | None]
    close: Callable[[], None]
    source: Callable[[], str | None] = lambda: "process"
    warning: Callable[[], str | None] = lambda: None
    energy_mj: Callable[[], int | None] = lambda: None


# One NVML reader per device and CUDA_VISIBLE_DEVICES for the life of the process: NVML is initialised and the
# device resolved once, however many windows are opened (selfcheck opens several in one process).
_NVML_READERS: dict[tuple[int, str | None, int], Any] = {}


def _close_nvml_readers() -> None:
    for reader in _NVML_READERS.values():
        reader.close()
    _NVML_READERS.clear()


atexit.register(_close_nvml_readers)


def nvml_process_reader(device: torch.device) -> NvmlReader | None:
    """An :class:`NvmlReader` of the GPU memory NVML attributes to this process on ``device``; ``None`` off CUDA.

    ``read()`` returns the bytes NVML reports for this process (CUDA context, NCCL and cuBLAS workspaces included),
    the device's used memory where NVML lists no process with our PID (containers; ``source()`` says so), or
    ``None`` when NVML cannot say. The device ordinal is mapped to the physical GPU by :mod:`phi3v_core.nvml`, the
    project's one NVML reader (``CUDA_VISIBLE_DEVICES`` indices, UUIDs and MIG instances). The reader lives for the
    whole process (closed at exit), so ``close()`` is a no-op.
    """
    if device.type != "cuda":
        return None
    from phi3v_core.nvml import ProcessMemoryReader, import_nvml

    nvml = import_nvml()
    if nvml is None:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, os.environ.get("CUDA_VISIBLE_DEVICES"), id(nvml))
    reader = _NVML_READERS.get(key)
    if reader is None:
        reader = _NVML_READERS[key] = ProcessMemoryReader(index, os.getpid(), nvml)
    return NvmlReader(read=reader.read, close=lambda: None, source=lambda: reader.source,
                      warning=lambda: reader.warning, energy_mj=reader.total_energy_mj)


class PeakSampler:
    """Sample ``read()`` on a background thread every ``period_s`` seconds and keep the maximum.

    Used for NVML process memory during the timed window: NVML has no peak counter, so a single read after training
    shows whatever the allocator holds at that moment, not the peak. One sample is taken on :meth:`start` and one on
    :meth:`stop`, so even a window shorter than the period has two samples.

    Attributes:
        samples: Number of successful (non-``None``) readings.
        peak: Largest reading, ``None`` when no reading succeeded.
    """

    def __init__(self, read: Callable[[], int | None], period_s: float = NVML_PERIOD_S) -> None:
        if not 0 < period_s <= 0.1:
            raise ValueError(f"period_s must be in (0, 0.1] seconds, got {period_s}")
        self._read = read
        self.period_s = period_s
        self.peak: int | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        value = self._read()
        if value is not None:
            self.samples += 1
            self.peak = value if self.peak is None else max(self.peak, value)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def start(self) -> None:
        """Take a first sample and start the background thread."""
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="phi3v-bench-nvml", daemon=True)
        self._thread.start()

    def stop(self) -> int | None:
        """Stop the thread, take a last sample and return the peak."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        return self.peak


class Tracker(Protocol):
    """One concern measured over the timed window: ``start()`` when it opens, ``stop()`` when it closes."""

    def start(self) -> None:
        """Begin measuring (the window is open and the device synchronised)."""

    def stop(self) -> None:
        """Finish measuring and keep the result (the device is synchronised, the last timed step done)."""


@dataclass
class CudaPeaks:
    """``torch.cuda``'s allocator peaks over the window: reset when it opens, read when it closes (CUDA only).

    Attributes:
        allocated_bytes: ``max_memory_allocated`` over the window (None off CUDA).
        reserved_bytes: ``max_memory_reserved`` over the window (None off CUDA).
    """

    device: torch.device
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None

    def start(self) -> None:
        """Reset the device's peak statistics."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> None:
        """Read the peaks since the reset."""
        self.allocated_bytes, self.reserved_bytes = gpu_memory(self.device)


@dataclass
class HostRss:
    """The process's peak resident set size when the window closes (``ru_maxrss`` has no reset)."""

    peak_bytes: int | None = None

    def start(self) -> None:
        """Nothing to reset: the kernel keeps the process's peak."""

    def stop(self) -> None:
        """Read the peak."""
        self.peak_bytes = cpu_rss_peak_bytes()


@dataclass
class NvmlMemory:
    """NVML's memory of this process, sampled on a thread (:class:`PeakSampler`): NVML keeps no peak of its own.

    Attributes:
        peak_bytes: Largest sample (None without one).
        samples: Successful samples behind ``peak_bytes``.
        source: ``"process"``, or ``"device_used"`` where NVML listed no process with our PID (containers).
        warning: The reader's note on what it read, if any.
    """

    reader: NvmlReader
    peak_bytes: int | None = None
    samples: int = 0
    source: str | None = None
    warning: str | None = None
    _sampler: PeakSampler | None = None

    def start(self) -> None:
        """Take a first sample and start sampling."""
        self._sampler = PeakSampler(self.reader.read)
        self._sampler.start()

    def stop(self) -> None:
        """Stop sampling (a last sample) and keep the peak and what it is."""
        if self._sampler is None:
            return
        self.peak_bytes, self.samples = self._sampler.stop(), self._sampler.samples
        self._sampler = None
        self.source = self.reader.source() if self.peak_bytes is not None else None
        self.warning = self.reader.warning()


@dataclass
class GpuEnergy:
    """Joules the GPU drew over the window: the difference of NVML's total-energy counter at its two ends.

    Attributes:
        joules: The difference (None where the counter is missing or went backwards, e.g. a driver reload).
    """

    reader: NvmlReader
    joules: float | None = None
    _start_mj: int | None = None

    def start(self) -> None:
        """Read the counter."""
        self._start_mj = self.reader.energy_mj()

    def stop(self) -> None:
        """Read the counter again and keep the difference."""
        end = self.reader.energy_mj() if self._start_mj is not None else None
        self.joules = (end - self._start_mj) / 1000.0 if end is not None and end >= self._start_mj else None
        self._start_mj = None


@dataclass
class TensorPeak:
    """The memory probe (one step after the window, CPU): peak bytes of live tensor storage under
    :class:`LiveTensorBytes`, the weights, gradients and optimizer states counted from the start.

    Attributes:
        peak_bytes: The peak (None until the probe step ends).
    """

    peak_bytes: int | None = None
    _mode: LiveTensorBytes | None = None

    def start(self, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None) -> None:
        """Count ``model``'s and ``optimizer``'s tensors and follow every storage an op creates."""
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        self._mode = LiveTensorBytes(_state_tensors(model, inner))
        self._mode.__enter__()

    def stop(self) -> None:
        """Leave the dispatch mode and keep its peak."""
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.peak_bytes = int(self._mode.peak)
            self._mode = None


NvmlFactory = Callable[[torch.device], NvmlReader | tuple[Callable[[], int | None], Callable[[], None]] | None]


@dataclass
class InstrumentedSteps(TrainerCallback):
    """The timed window and the memory probe of one repeat (see the module docstring for the order): the callback
    that composes one tracker per concern (:class:`CudaPeaks`, :class:`HostRss`, :class:`NvmlMemory`,
    :class:`GpuEnergy` over the window; :class:`TensorPeak` for the probe step) and reads their results.

    Attributes:
        first_timed_step: 1-based global step that opens the timed window (peaks reset, NVML sampler started).
        last_timed_step: 1-based global step that closes it (peaks read, sampler stopped).
        memory_step: 1-based global step measured under :class:`LiveTensorBytes` (``None`` = skip); must come after
            ``last_timed_step``.
        nvml_reader: Factory of an NVML ``(read, close)`` pair for a device (:func:`nvml_process_reader`; tests
            pass a fake one).
        window_opened_at: ``time.perf_counter()`` once the window was open (sync, reset, first NVML sample done);
            the first timed step's clock must start after it.
        notes: What the readers said about their readings (e.g. NVML read the device, not the process).
        events: ``(event, step)`` in the order they happened; the protocol's audit trail.
    """

    first_timed_step: int = 1
    last_timed_step: int = 1
    memory_step: int | None = None
    nvml_reader: NvmlFactory = nvml_process_reader
    window_opened_at: float | None = None
    notes: list[str] = field(default_factory=list)
    events: list[tuple[str, int]] = field(default_factory=list)
    _cuda: CudaPeaks | None = None
    _rss: HostRss | None = None
    _nvml_memory: NvmlMemory | None = None
    _energy: GpuEnergy | None = None
    _tensors: TensorPeak = field(default_factory=TensorPeak)
    _window: list[Tracker] = field(default_factory=list)
    _reader: NvmlReader | None = None

    def __post_init__(self) -> None:
        if self.memory_step is not None and self.memory_step <= self.last_timed_step:
            raise ValueError("the memory probe step must come after the timed window")

    def event(self, name: str, step: int) -> None:
        """Append ``(name, step)`` to :attr:`events`."""
        self.events.append((name, step))

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: ANN001, ANN201
        step = state.global_step + 1  # the step about to run
        if step == self.first_timed_step:
            self._open_window(args.device)
        if step == self.memory_step:
            self.event("memory_probe_start", step)
            self._tensors.start(model, optimizer)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        step = state.global_step
        self.event("step_end", step)
        if step == self.last_timed_step:
            self._close_window(args.device, step)
        if step == self.memory_step:
            self._tensors.stop()
            self.event("memory_probe_end", step)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        # A run that stopped inside the window (e.g. max_steps reached early) still releases NVML.
        if self._window:
            self._close_window(args.device, state.global_step)

    def _open_window(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        opened = self.nvml_reader(device)
        self._reader = None if opened is None else opened if isinstance(opened, NvmlReader) else NvmlReader(*opened)
        self._cuda, self._rss = CudaPeaks(device), HostRss()
        self._nvml_memory = None if self._reader is None else NvmlMemory(self._reader)
        self._energy = None if self._reader is None else GpuEnergy(self._reader)
        # Started in this order and stopped in the reverse one: the energy counter is read last before the clock
        # and first after the sync that ends it; the allocator peaks are read before anything else can allocate.
        self._window = [t for t in (self._rss, self._nvml_memory, self._cuda, self._energy) if t is not None]
        for tracker in self._window:
            tracker.start()
        self.event("window_open", self.first_timed_step)
        self.window_opened_at = time.perf_counter()

    def _close_window(self, device: torch.device, step: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        for tracker in reversed(self._window):
            tracker.stop()
        self._window = []
        if self._nvml_memory is not None and self._nvml_memory.warning not in (None, *self.notes):
            self.notes.append(self._nvml_memory.warning)
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self.event("peaks_read", step)

    # ---- the trackers' results --------------------------------------------------------------------------------
    @property
    def gpu_allocated_bytes(self) -> int | None:
        """``max_memory_allocated`` over the timed window (CUDA only)."""
        return self._cuda.allocated_bytes if self._cuda else None

    @property
    def gpu_reserved_bytes(self) -> int | None:
        """``max_memory_reserved`` over the timed window (CUDA only)."""
        return self._cuda.reserved_bytes if self._cuda else None

    @property
    def cpu_rss_bytes(self) -> int | None:
        """Peak resident set size of the process when the window closed."""
        return self._rss.peak_bytes if self._rss else None

    @property
    def nvml_peak_bytes(self) -> int | None:
        """Maximum NVML process memory sampled during the timed window."""
        return self._nvml_memory.peak_bytes if self._nvml_memory else None

    @property
    def nvml_samples(self) -> int:
        """Number of NVML samples behind :attr:`nvml_peak_bytes`."""
        return self._nvml_memory.samples if self._nvml_memory else 0

    @property
    def nvml_source(self) -> str | None:
        """What :attr:`nvml_peak_bytes` is (:attr:`NvmlMemory.source`); None without a reading."""
        return self._nvml_memory.source if self._nvml_memory else None

    @property
    def energy_j(self) -> float | None:
        """Energy the GPU drew over the timed window (None off CUDA or where the counter is missing)."""
        return self._energy.joules if self._energy else None

    @property
    def tensor_peak_bytes(self) -> int | None:
        """Result of the memory probe (CPU)."""
        return self._tensors.peak_bytes


@dataclass
class TimedWindow:
    """The callbacks of one measured run, in the protocol's order: the one way the worker and selfcheck time steps.

    :class:`InstrumentedSteps` comes *before* the :class:`~phi3v_core.training.StepTimer` in :attr:`callbacks`, so
    the window (device sync, peak reset, first NVML sample) opens before the first timed step's clock starts, and
    its cost is never inside a timed step (the Trainer calls callbacks in list order).

    Attributes:
        probes: The timed window and memory probe.
        timer: The per-step clock (its records carry the loss and the fp16 skip flag).
    """

    probes: InstrumentedSteps
    timer: Any

    @classmethod
    def for_layout(cls, layout: dict[str, int | None]) -> TimedWindow:
        """A window over ``layout`` (:func:`bench.worker.plan_steps`: ``first_timed``, ``last_timed``, ``memory_step``)."""
        from phi3v_core.training import StepTimer

        probes = InstrumentedSteps(
            first_timed_step=int(layout["first_timed"] or 1),
            last_timed_step=int(layout["last_timed"] or 1),
            memory_step=layout["memory_step"],
        )
        return cls(probes, StepTimer())

    @property
    def callbacks(self) -> list[TrainerCallback]:
        """``[probes, timer]``: pass to ``phi3v_core.training.train(..., callbacks=...)`` as they are."""
        return [self.probes, self.timer]

    def timed_records(self) -> list[Any]:
        """The timer's records of the timed steps (``first_timed_step`` .. ``last_timed_step``), in order."""
        first, last = self.probes.first_timed_step, self.probes.last_timed_step
        return [r for r in self.timer.records if first <= r.step <= last]

    @property
    def window_before_clock(self) -> bool:
        """Whether the window was open before the first timed step's clock started (the protocol's rule)."""
        timed = self.timed_records()
        opened = self.probes.window_opened_at
        return opened is not None and bool(timed) and opened <= timed[0].began
