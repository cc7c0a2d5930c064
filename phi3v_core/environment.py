"""Where a measurement was taken: package versions, git commit, GPUs, driver, CPU and memory.

Recorded by every ``phi3v-bench`` result and by ``phi3v-plan --validate --save``.

Read without creating a CUDA context (NVML first), so a sweep's parent process can describe the machine before its
workers start.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

__all__ = ["TRACKED_PACKAGES", "GpuInfo", "RunEnvironment", "capture_environment", "cpu_hardware_name", "ram_bytes", "utc_now"]

#: Distributions whose versions decide performance; recorded in every result.
TRACKED_PACKAGES: tuple[str, ...] = (
    "phi3v-bench",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "deepspeed",
    "bitsandbytes",
    "flash-attn",
    "numpy",
    "nvidia-ml-py",
)


@dataclass
class GpuInfo:
    """One visible GPU."""

    index: int
    name: str
    compute_capability: str
    total_memory_bytes: int


@dataclass
class RunEnvironment:
    """Where a result was measured.

    Attributes:
        python: Python version.
        platform: ``platform.platform()``.
        packages: Installed versions of :data:`TRACKED_PACKAGES` (``None`` = not installed).
        git_sha: Commit of the phi3v-bench source tree (``None`` outside git or before the first commit).
        git_dirty: Whether tracked files differed from that commit.
        cuda_version: CUDA version torch was built with.
        driver_version: NVIDIA driver (from NVML).
        gpus: Visible GPUs of the node that wrote the result.
        cpu: CPU model name.
        cpu_count: Logical CPUs.
        ram_bytes: Physical memory.
    """

    python: str = ""
    platform: str = ""
    packages: dict[str, str | None] = field(default_factory=dict)
    git_sha: str | None = None
    git_dirty: bool | None = None
    cuda_version: str | None = None
    driver_version: str | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    cpu: str = ""
    cpu_count: int | None = None
    ram_bytes: int | None = None

    @property
    def gpu_name(self) -> str | None:
        """Name of the first GPU, or ``None`` on a CPU-only machine."""
        return self.gpus[0].name if self.gpus else None

    @property
    def hardware(self) -> str:
        """Folder name for this machine: ``<count>x<gpu>`` (e.g. ``8xA100-SXM4-80GB``) or ``cpu-<model>-<n>t``.

        CPU machines are named by CPU model and logical CPU count (e.g. ``cpu-Intel-Xeon-Platinum-8375C-2t``), as
        GPUs are, so results of two different CPU machines never share a folder. Results written before this rule
        live in ``cpu/`` and still load: the folder name is not read back.
        """
        if not self.gpus:
            return cpu_hardware_name(self.cpu, self.cpu_count)
        name = re.sub(r"^NVIDIA\s+", "", self.gpus[0].name.strip())
        name = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-") or "gpu"
        return f"{len(self.gpus)}x{name}"


def cpu_hardware_name(model: str, threads: int | None) -> str:
    """``cpu-<model slug>-<threads>t``: trademarks, "CPU", clock and "with ... Graphics" suffixes dropped.

    Example: ``"Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"`` with 2 threads -> ``cpu-Intel-Xeon-Platinum-8375C-2t``.
    """
    name = re.sub(r"\((R|TM|tm|r)\)", "", model or "")
    name = re.sub(r"@.*$", "", name)
    name = re.sub(r"\b(CPU|Processor|\d+-Core)\b", "", name)
    name = re.sub(r"\bwith\b.*$", "", name)
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-") or "unknown"
    return f"cpu-{slug}-{threads or 0}t"


def capture_environment() -> RunEnvironment:
    """Describe the current machine and software (cheap; no GPU work beyond reading properties).

    Returns:
        A :class:`RunEnvironment`. Fields that cannot be read here (no GPU, no git) are ``None``/empty.
    """
    packages: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    sha, dirty = _git_state(Path(__file__).resolve().parents[1])
    env = RunEnvironment(
        python=platform.python_version(),
        platform=platform.platform(),
        packages=packages,
        git_sha=sha,
        git_dirty=dirty,
        cpu=_cpu_name(),
        cpu_count=os.cpu_count(),
        ram_bytes=ram_bytes(),
    )
    nvml = _nvml_gpus()
    if nvml is not None:
        env.gpus, env.driver_version = nvml
    if packages.get("torch"):
        import torch

        env.cuda_version = torch.version.cuda
        if nvml is None and torch.cuda.is_available():
            # Without NVML only torch can name the GPUs; this initializes CUDA in this process.
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                env.gpus.append(GpuInfo(i, props.name, f"{props.major}.{props.minor}", int(props.total_memory)))
    return env


def _nvml_gpus() -> tuple[list[GpuInfo], str | None] | None:
    """Return the GPUs visible to CUDA and the driver version via NVML, or ``None`` when NVML cannot say.

    NVML is used rather than ``torch.cuda`` because it creates no CUDA context: a sweep's parent process must not hold
    GPU memory or initialize CUDA before its workers start. :mod:`phi3v_core.nvml` applies ``CUDA_VISIBLE_DEVICES``
    (indices, UUIDs, MIG instances) as CUDA does.
    """
    from phi3v_core.nvml import visible_devices

    report = visible_devices()
    if report.error is not None:
        return None
    gpus = [
        GpuInfo(
            d.cuda_index,
            d.name,
            ".".join(map(str, d.compute_capability)) if d.compute_capability else "?",
            int(d.memory_total_bytes or 0),
        )
        for d in report.devices
    ]
    return gpus, report.driver


def _git_state(root: Path) -> tuple[str | None, bool | None]:
    # --no-optional-locks: reading the state must never rewrite .git/index under a concurrent git command.
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "--no-optional-locks", "-C", str(root), *args],
                capture_output=True, text=True, timeout=10, check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    sha = git("rev-parse", "HEAD")
    if not sha:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return sha, (bool(status) if status is not None else None)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ram_bytes() -> int | None:
    """This machine's RAM (``psutil.virtual_memory().total``; None without psutil)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return None


def utc_now() -> str:
    """Return the current UTC time as ISO-8601 with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
