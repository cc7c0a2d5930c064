"""NVML, read in one place: the GPUs a job on this machine will see (torch-free, fast, works without CUDA).

Uses ``pynvml`` from the ``nvidia-ml-py`` package. Every other module asks this one, so ``CUDA_VISIBLE_DEVICES``,
MIG and permission handling are done once.

API:

* :func:`visible_devices` → :class:`NvmlReport`: the devices CUDA will enumerate, in CUDA's order, after
  ``CUDA_VISIBLE_DEVICES`` (integer indices, ``GPU-…`` UUIDs or unique UUID prefixes, ``MIG-…`` UUIDs; like CUDA,
  the list stops at the first entry that matches nothing, and an empty value hides every GPU). A GPU in MIG mode
  contributes its MIG instances (each with its own memory), not the parent. Each device has its NVML index, CUDA
  ordinal, UUID, name, memory total, compute capability and active NVLinks. Every query that fails - e.g. with
  ``NVMLError_NoPermission`` inside a container - becomes a warning on the report and a ``None`` field, never a
  failed detection; only "no driver / no NVML" gives an empty report with ``error`` set.
* :func:`process_memory_bytes` ``(device_index, pid)``: the GPU memory NVML attributes to process ``pid`` on
  CUDA device ``device_index`` (the ordinal a job uses, ``CUDA_VISIBLE_DEVICES`` applied); None when unknown.
* :class:`ProcessMemoryReader`: the same for repeated reads (a sampling loop): NVML is initialised and the device
  resolved once; each read is one query. Where no process matches (a container without the host PID namespace),
  it falls back to the device's used memory and says so (``source``).

Both take ``nvml=`` (an object with pynvml's API; tests pass a fake) and ``environ=`` (default ``os.environ``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEVICE_USED",
    "PROCESS",
    "NvmlDevice",
    "NvmlReport",
    "ProcessMemoryReader",
    "import_nvml",
    "parse_visible_devices",
    "process_memory_bytes",
    "visible_devices",
]


@dataclass(frozen=True)
class NvmlDevice:
    """One device as a CUDA job will see it.

    Attributes:
        cuda_index: Its CUDA ordinal inside the job (position after ``CUDA_VISIBLE_DEVICES``).
        nvml_index: NVML index of the physical GPU (the parent for a MIG instance).
        uuid: ``GPU-…`` or ``MIG-…`` UUID (None if NVML would not say).
        name: Product name (a MIG instance's name includes its profile, e.g. ``… MIG 3g.40gb``).
        memory_total_bytes: Memory this device offers (a MIG instance's own slice); None if unreadable.
        compute_capability: (major, minor), None if unreadable.
        mig: Whether this is a MIG instance.
        nvlink_active: Active NVLink links of the physical GPU (0 on PCIe cards or when unreadable).
    """

    cuda_index: int
    nvml_index: int
    uuid: str | None
    name: str
    memory_total_bytes: int | None
    compute_capability: tuple[int, int] | None
    mig: bool = False
    nvlink_active: int = 0


@dataclass(frozen=True)
class NvmlReport:
    """What :func:`visible_devices` found.

    Attributes:
        devices: Visible devices in CUDA order.
        driver: Driver version.
        cuda_driver: Highest CUDA version the driver supports (``12.4``).
        error: Why nothing could be read (NVML missing, no driver); None otherwise.
        warnings: Queries that failed but did not stop detection (permissions, unsupported calls, bad entries).
    """

    devices: tuple[NvmlDevice, ...] = ()
    driver: str | None = None
    cuda_driver: str | None = None
    error: str | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)


def import_nvml() -> Any | None:
    """``pynvml`` if nvidia-ml-py is installed, else None."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _is_not_supported(exc: Exception) -> bool:
    return "not supported" in (_text(exc) + type(exc).__name__).lower().replace("_", " ")


class _Queries:
    """Runs NVML queries, turning failures into warnings."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.warnings: list[str] = []

    def ask(self, what: str, fn: str | Callable[..., Any], *args: Any, quiet_unsupported: bool = True) -> Any | None:
        """Call ``fn`` (a pynvml function or its name); a failure - or a function this pynvml lacks - is None."""
        if isinstance(fn, str):
            found = getattr(self.nvml, fn, None)
            if found is None:  # an older nvidia-ml-py: the same as "not supported"
                if not quiet_unsupported:
                    self.warnings.append(f"NVML: {what} is not available in this pynvml; left unknown")
                return None
            fn = found
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - NVMLError_NoPermission, _NotSupported, ...: degrade, don't abort
            if not (quiet_unsupported and _is_not_supported(exc)):
                self.warnings.append(f"NVML: {what} failed ({_text(exc) or type(exc).__name__}); left unknown")
            return None


def parse_visible_devices(value: str | None) -> list[str] | None:
    """Entries of ``CUDA_VISIBLE_DEVICES`` (None: unset, all devices visible; []: none visible)."""
    if value is None:
        return None
    return [entry.strip() for entry in value.split(",") if entry.strip()] if value.strip() else []


def _physical(q: _Queries, index: int) -> list[NvmlDevice]:
    """The CUDA-visible device(s) of one physical GPU: itself, or its MIG instances."""
    nvml = q.nvml
    handle = q.ask(f"handle of GPU {index}", "nvmlDeviceGetHandleByIndex", index, quiet_unsupported=False)
    if handle is None:
        return []
    name = q.ask(f"name of GPU {index}", "nvmlDeviceGetName", handle)
    name = _text(name) if name is not None else f"GPU {index}"
    uuid = q.ask(f"UUID of GPU {index}", "nvmlDeviceGetUUID", handle) if hasattr(nvml, "nvmlDeviceGetUUID") else None
    cc = q.ask(f"compute capability of GPU {index}", "nvmlDeviceGetCudaComputeCapability", handle)
    cc = (int(cc[0]), int(cc[1])) if cc is not None else None
    links = 0
    for link in range(int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))):
        try:
            links += 1 if nvml.nvmlDeviceGetNvLinkState(handle, link) else 0
        except Exception:  # noqa: BLE001 - NotSupported on PCIe cards / past the last link
            break
    mig_mode = None
    if hasattr(nvml, "nvmlDeviceGetMigMode"):
        mode = q.ask(f"MIG mode of GPU {index}", "nvmlDeviceGetMigMode", handle)
        mig_mode = int(mode[0]) if mode is not None else None
    if mig_mode:
        instances = []
        count = q.ask(f"MIG slots of GPU {index}", "nvmlDeviceGetMaxMigDeviceCount", handle) or 0
        for slot in range(int(count)):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except Exception:  # noqa: BLE001 - NotFound: an empty slot
                continue
            memory = q.ask(f"memory of MIG {index}/{slot}", "nvmlDeviceGetMemoryInfo", mig)
            mig_name = q.ask(f"name of MIG {index}/{slot}", "nvmlDeviceGetName", mig)
            mig_uuid = q.ask(f"UUID of MIG {index}/{slot}", "nvmlDeviceGetUUID", mig)
            instances.append(
                NvmlDevice(
                    cuda_index=-1,
                    nvml_index=index,
                    uuid=_text(mig_uuid) if mig_uuid is not None else None,
                    name=_text(mig_name) if mig_name is not None else f"{name} MIG {slot}",
                    memory_total_bytes=int(memory.total) if memory is not None else None,
                    compute_capability=cc,
                    mig=True,
                    nvlink_active=0,  # MIG instances do not use NVLink for peer traffic
                )
            )
        return instances
    memory = q.ask(f"memory of GPU {index}", "nvmlDeviceGetMemoryInfo", handle, quiet_unsupported=False)
    return [
        NvmlDevice(
            cuda_index=-1,
            nvml_index=index,
            uuid=_text(uuid) if uuid is not None else None,
            name=name,
            memory_total_bytes=int(memory.total) if memory is not None else None,
            compute_capability=cc,
            nvlink_active=links,
        )
    ]


def _select(devices: list[NvmlDevice], entries: list[str] | None, warnings: list[str]) -> list[NvmlDevice]:
    """Apply ``CUDA_VISIBLE_DEVICES`` the way CUDA does (stop at the first entry that matches nothing)."""
    if entries is None:
        return devices
    chosen: list[NvmlDevice] = []
    for entry in entries:
        match: NvmlDevice | None = None
        if entry.lstrip("-").isdigit():
            index = int(entry)
            physical = [d for d in devices if not d.mig]
            match = physical[index] if 0 <= index < len(physical) else None
        else:
            wanted = entry.lower()
            candidates = [d for d in devices if d.uuid and d.uuid.lower().startswith(wanted)]
            match = candidates[0] if len(candidates) == 1 else None
        if match is None:
            warnings.append(
                f"CUDA_VISIBLE_DEVICES entry {entry!r} matches no device: CUDA ignores it and every entry after it"
            )
            break
        if match not in chosen:
            chosen.append(match)
    return chosen


def visible_devices(nvml: Any | None = None, environ: Mapping[str, str] | None = None) -> NvmlReport:
    """The devices a CUDA job started with ``environ`` will see (see the module docstring)."""
    nvml = nvml if nvml is not None else import_nvml()
    if nvml is None:
        return NvmlReport(error="pynvml (nvidia-ml-py) is not installed")
    environ = os.environ if environ is None else environ
    try:
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, _DriverNotLoaded, ... all mean "no GPU here"
        return NvmlReport(error=f"no NVIDIA driver/NVML on this machine ({_text(exc) or type(exc).__name__})")
    try:
        return _report(nvml, environ)
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down a half-initialised NVML is best effort
            pass


def _report(nvml: Any, environ: Mapping[str, str]) -> NvmlReport:
    """:func:`visible_devices` on an NVML that is already initialised."""
    q = _Queries(nvml)
    driver = q.ask("driver version", "nvmlSystemGetDriverVersion")
    version = q.ask("CUDA driver version", "nvmlSystemGetCudaDriverVersion")
    cuda = f"{int(version) // 1000}.{(int(version) % 1000) // 10}" if version is not None else None
    count = q.ask("device count", "nvmlDeviceGetCount", quiet_unsupported=False)
    if count is None:
        return NvmlReport(driver=_text(driver) if driver else None, cuda_driver=cuda, error=q.warnings[-1])
    devices = [device for index in range(int(count)) for device in _physical(q, index)]
    entries = parse_visible_devices(environ.get("CUDA_VISIBLE_DEVICES"))
    selected = _select(devices, entries, q.warnings)
    ordered = tuple(NvmlDevice(**{**d.__dict__, "cuda_index": position}) for position, d in enumerate(selected))
    return NvmlReport(
        devices=ordered,
        driver=_text(driver) if driver is not None else None,
        cuda_driver=cuda,
        warnings=tuple(q.warnings),
    )


#: :attr:`ProcessMemoryReader.source` when the reading is the process's own memory.
PROCESS = "process"
#: :attr:`ProcessMemoryReader.source` when NVML listed no process with our PID and the reading is the device's used
#: memory (every process on it included).
DEVICE_USED = "device_used"


class ProcessMemoryReader:
    """Read the GPU memory of one process on one device, many times, cheaply (the benchmark's sampling loop).

    NVML is initialised once and the device handle resolved once, here; :meth:`read` makes one NVML query. The
    first reading decides what is read from then on (:attr:`source`): the process's own memory when NVML lists
    our PID on the device, else - a container without the host PID namespace sees host PIDs, some MIG setups
    list no usage - the device's used memory, which includes every other process on the device. That fallback is
    logged once and labelled (``source == DEVICE_USED``, :attr:`warning`), never silent.

    Args:
        device_index: CUDA ordinal as the job sees it (``CUDA_VISIBLE_DEVICES`` applied).
        pid: Process to read (default: this one).
        nvml: An object with pynvml's API (default: the installed ``pynvml``); tests pass a fake.
        environ: Environment holding ``CUDA_VISIBLE_DEVICES`` (default ``os.environ``).
        fallback: Fall back to the device's used memory when no process matches (otherwise read None).
    """

    def __init__(
        self,
        device_index: int,
        pid: int | None = None,
        nvml: Any | None = None,
        environ: Mapping[str, str] | None = None,
        *,
        fallback: bool = True,
    ) -> None:
        self.nvml = nvml if nvml is not None else import_nvml()
        self.pid = os.getpid() if pid is None else pid
        self.device_index = device_index
        self.fallback = fallback
        self.source: str | None = None
        self.warning: str | None = None
        self._handle: Any | None = None
        self._initialised = False
        if self.nvml is None:
            return
        try:
            self.nvml.nvmlInit()
        except Exception:  # noqa: BLE001 - no driver: nothing to read
            return
        self._initialised = True
        report = _report(self.nvml, os.environ if environ is None else environ)
        if not 0 <= device_index < len(report.devices):
            return
        device = report.devices[device_index]
        try:
            if device.uuid and hasattr(self.nvml, "nvmlDeviceGetHandleByUUID"):
                self._handle = self.nvml.nvmlDeviceGetHandleByUUID(device.uuid)
            else:
                self._handle = self.nvml.nvmlDeviceGetHandleByIndex(device.nvml_index)
        except Exception:  # noqa: BLE001 - NoPermission / NotFound: unknown, not an error
            self._handle = None

    @property
    def available(self) -> bool:
        """Whether the device was found (a reading may still be None)."""
        return self._handle is not None

    def read(self) -> int | None:
        """Bytes in use (see :attr:`source`), or None when NVML cannot say."""
        if self._handle is None:
            return None
        try:
            if self.source == DEVICE_USED:
                return int(self.nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            processes = self.nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception:  # noqa: BLE001 - NoPermission / NotSupported: unknown, not an error
            return None
        used = [p.usedGpuMemory for p in processes if int(p.pid) == self.pid and p.usedGpuMemory is not None]
        if used:
            self.source = PROCESS
            return int(sum(used))
        if self.source == PROCESS or not self.fallback:
            return None  # keep one meaning for every reading of a peak
        return self._fall_back()

    def _fall_back(self) -> int | None:
        try:
            value = int(self.nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        except Exception:  # noqa: BLE001 - unknown
            return None
        self.source = DEVICE_USED
        self.warning = (
            f"NVML lists no process with PID {self.pid} on CUDA device {self.device_index} (a container without the "
            "host PID namespace?): NVML memory is the device's used memory, every process on it included"
        )
        logging.getLogger(__name__).warning(self.warning)
        return value

    def total_energy_mj(self) -> int | None:
        """The device's total-energy counter in millijoules (``nvmlDeviceGetTotalEnergyConsumption``: energy since
        the driver loaded, Volta and newer), or None where the counter is missing (older GPUs, MIG instances,
        permissions, an nvidia-ml-py without the call). Only differences of two readings mean anything."""
        if self._handle is None:
            return None
        query = getattr(self.nvml, "nvmlDeviceGetTotalEnergyConsumption", None)
        if query is None:
            return None
        try:
            return int(query(self._handle))
        except Exception:  # noqa: BLE001 - NotSupported / NoPermission: not available, not an error
            return None

    def close(self) -> None:
        """Release NVML (idempotent)."""
        if self._initialised:
            self._initialised = False
            self._handle = None
            try:
                self.nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - best effort
                pass


def process_memory_bytes(
    device_index: int, pid: int | None = None, nvml: Any | None = None, environ: Mapping[str, str] | None = None
) -> int | None:
    """GPU memory NVML attributes to ``pid`` (default: this process) on CUDA device ``device_index``.

    Returns None when NVML is missing, the device is not visible, or the driver does not report per-process memory
    (containers without the host PID namespace, some MIG setups). For repeated reads use
    :class:`ProcessMemoryReader`.
    """
    reader = ProcessMemoryReader(device_index, pid, nvml, environ, fallback=False)
    try:
        return reader.read()
    finally:
        reader.close()
