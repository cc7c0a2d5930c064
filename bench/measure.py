"""Measurement probes that hook into the real Trainer loop through callbacks.

The timed steps are plain training steps (only :class:`~phi3v_core.training.callbacks.StepTimer` runs, with device
synchronisation). Instrumented steps come after them and are never timed:

* a **memory step** (CPU only) under :class:`LiveTensorBytes`: peak bytes of live tensor storage, the CPU
  counterpart of ``torch.cuda.max_memory_allocated`` (torch's ``MemTracker`` cannot attach to models whose frozen
  parameters do not require gradients, which is every LoRA/QLoRA model);
* a **FLOP step** under ``FlopCounterMode`` with gradient checkpointing switched off, so the count is model FLOPs
  (no recompute) of exactly the work the model does — only real image crops, real sequence lengths.
"""

from __future__ import annotations

import os
import resource
import sys
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode
from transformers import TrainerCallback

__all__ = ["InstrumentedSteps", "LiveTensorBytes", "cpu_rss_peak_bytes", "gpu_memory", "nvml_process_bytes"]


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


def nvml_process_bytes(device: torch.device) -> int | None:
    """GPU memory NVML attributes to this process (context, NCCL and cuBLAS workspaces included), if readable."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            from bench.results import _visible_handles  # the one CUDA_VISIBLE_DEVICES → NVML mapping

            index = device.index if device.index is not None else torch.cuda.current_device()
            # NVML numbers devices physically; CUDA_VISIBLE_DEVICES may hold indices or UUIDs (MIG: not mappable).
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            visible = _visible_handles(handles, os.environ.get("CUDA_VISIBLE_DEVICES"), pynvml.nvmlDeviceGetUUID)
            if visible is None or index >= len(visible):
                return None
            handle = visible[index]
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                    return int(proc.usedGpuMemory)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVML is best effort (containers often hide per-process numbers)
        return None
    return None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DeepSpeed / DDP / PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


@dataclass
class InstrumentedSteps(TrainerCallback):
    """Run the memory probe and the FLOP probe on the given (untimed) optimizer steps.

    Attributes:
        memory_step: 1-based global step measured under :class:`LiveTensorBytes` (``None`` = skip).
        flop_step: 1-based global step counted under ``FlopCounterMode`` (``None`` = skip).
        first_timed_step: Step at which CUDA peak statistics are reset (the start of the timed window).
        tensor_peak_bytes: Result of the memory probe.
        flops: Result of the FLOP probe (this rank's micro-batches).
    """

    memory_step: int | None = None
    flop_step: int | None = None
    first_timed_step: int | None = None
    tensor_peak_bytes: int | None = None
    flops: int | None = None
    notes: list[str] = field(default_factory=list)
    _mem_tracker: LiveTensorBytes | None = None
    _flop_counter: FlopCounterMode | None = None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: ANN001, ANN201
        step = state.global_step + 1  # the step about to run
        if step == self.first_timed_step and args.device.type == "cuda":
            torch.cuda.synchronize(args.device)
            torch.cuda.reset_peak_memory_stats(args.device)
        if step == self.memory_step:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
            tracker = LiveTensorBytes(_state_tensors(model, inner))
            tracker.__enter__()
            self._mem_tracker = tracker
        if step == self.flop_step:
            core = _unwrap(model)
            if getattr(core, "is_gradient_checkpointing", False):
                # Count model FLOPs, not the recompute that checkpointing adds.
                core.gradient_checkpointing_disable()
            self._flop_counter = FlopCounterMode(display=False)
            self._flop_counter.__enter__()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        step = state.global_step
        if step == self.memory_step and self._mem_tracker is not None:
            self._mem_tracker.__exit__(None, None, None)
            self.tensor_peak_bytes = int(self._mem_tracker.peak)
            self._mem_tracker = None
        if step == self.flop_step and self._flop_counter is not None:
            self._flop_counter.__exit__(None, None, None)
            self.flops = int(self._flop_counter.get_total_flops())
            self._flop_counter = None
