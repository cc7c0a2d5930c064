"""GPU and Azure tables (``planner/data/*.json``) and NVML-based detection.

Detection goes through :mod:`phi3v_core.nvml` (the project's one NVML reader) and never touches CUDA through torch,
so it is fast and works without a CUDA toolkit. The NVML module is a parameter (``nvml=``), so tests pass a fake one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from importlib import resources
from types import ModuleType
from typing import Any

from phi3v_core.constants import supports_bf16, supports_flash_attention
from phi3v_core.errors import ConfigError
from phi3v_core.nvml import import_nvml, visible_devices
from phi3v_core.software import QLORA_MIN_COMPUTE_CAPABILITY, qlora_unsupported_reason

__all__ = [
    "AzureSku",
    "DetectedGpu",
    "Detection",
    "GpuSpec",
    "QLORA_MIN_COMPUTE_CAPABILITY",
    "architecture_of",
    "azure_skus",
    "detect",
    "custom_gpu",
    "find_gpu",
    "gpu_table",
    "match_spec",
    "qlora_unsupported_reason",
    "supports_bf16",
    "supports_flash_attention",
]


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model (a row of ``planner/data/gpus.json``, or what NVML says about an unknown card).

    Attributes:
        key: Table key (``A100-80GB``).
        name: Marketing name.
        architecture: Volta, Turing, Ampere, Ada, Hopper, Blackwell (or Pascal/unknown).
        compute_capability: (major, minor).
        memory_gib: Memory in GiB.
        bandwidth_gbs: Memory bandwidth, GB/s (None if unknown).
        tflops_fp16: Dense fp16 tensor-core TFLOP/s (None if unknown).
        tflops_bf16: Dense bf16 TFLOP/s (None: no native bf16).
        bf16_native: Native bf16 tensor cores (compute capability ≥ 8.0).
        flash_attention_2: FlashAttention-2 supported (Ampere or newer).
        nvlink_gbs: NVLink bandwidth per GPU, both directions (None: PCIe only).
        pcie_gbs: PCIe bandwidth per GPU, both directions.
        source: Provenance of the numbers.
        detected: Built from NVML rather than the table.
    """

    key: str
    name: str
    architecture: str
    compute_capability: tuple[int, int]
    memory_gib: float
    bandwidth_gbs: float | None = None
    tflops_fp16: float | None = None
    tflops_bf16: float | None = None
    bf16_native: bool = False
    flash_attention_2: bool = False
    nvlink_gbs: float | None = None
    pcie_gbs: float | None = None
    aliases: tuple[str, ...] = ()
    nvml_match: str = ""
    source: str = ""
    detected: bool = False

    @property
    def memory_bytes(self) -> float:
        """Memory in bytes."""
        return self.memory_gib * 2**30

    def peak_tflops(self, precision: str) -> float | None:
        """Dense tensor-core peak for ``precision`` (fp32 training uses the fp16/bf16 figure only via AMP)."""
        if precision == "bf16":
            return self.tflops_bf16
        if precision == "fp16":
            return self.tflops_fp16
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``--json``)."""
        out = asdict(self)
        out["compute_capability"] = f"{self.compute_capability[0]}.{self.compute_capability[1]}"
        out.pop("aliases")
        out.pop("nvml_match")
        return out


def architecture_of(major: int, minor: int) -> str:
    """Architecture name from an NVIDIA compute capability."""
    if major >= 10:
        return "Blackwell"
    return {
        (9, 0): "Hopper",
        (8, 9): "Ada",
        (8, 0): "Ampere",
        (8, 6): "Ampere",
        (8, 7): "Ampere",
        (7, 5): "Turing",
        (7, 0): "Volta",
        (7, 2): "Volta",
    }.get((major, minor), "Pascal" if major == 6 else f"unknown (sm_{major}{minor})")


@cache
def _load(name: str) -> dict[str, Any]:
    return json.loads(resources.files("planner").joinpath(f"data/{name}").read_text())


@cache
def gpu_table() -> tuple[GpuSpec, ...]:
    """All GPUs of ``planner/data/gpus.json``."""
    specs = []
    for row in _load("gpus.json")["gpus"]:
        values = dict(row)
        values["compute_capability"] = tuple(values["compute_capability"])
        values["aliases"] = tuple(values.get("aliases", ()))
        specs.append(GpuSpec(**values))
    return tuple(specs)


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


#: Words of NVML / nvidia-smi names that no table key carries (``NVIDIA GeForce RTX 4090``, ``Tesla V100-SXM2-32GB``).
_VENDOR_WORDS = re.compile(r"\b(nvidia|geforce|tesla|quadro)\b", re.IGNORECASE)


def find_gpu(name: str) -> GpuSpec:
    """Look a GPU up by key, alias or its NVML / nvidia-smi name, ignoring case and punctuation.

    One rule for every name: it must fit exactly one row. A key or alias fits its row (``a100-80gb``,
    ``H100 SXM5``); a prefix fits the rows it starts (``RTX40`` → RTX4090); an NVML name (``NVIDIA GeForce RTX 4090``,
    ``NVIDIA A100-SXM4-80GB``, ``NVIDIA H100 80GB HBM3``) fits the rows whose NVML pattern it matches, the most
    specific pattern first, then the memory it states. A name that fits several rows (``A100``, ``H100``) is
    ambiguous and names them.

    Raises:
        ConfigError: Unknown or ambiguous name (the message lists candidates).
    """
    wanted = _norm(name)
    table = gpu_table()
    for spec in table:
        if wanted in {_norm(spec.key), *(_norm(a) for a in spec.aliases)}:
            return spec
    fits = [spec for spec in table if _norm(spec.key).startswith(wanted)] or _nvml_fits(name)
    if len(fits) == 1:
        return fits[0]
    if fits:
        raise ConfigError(f"--gpu {name!r} is ambiguous: {', '.join(s.key for s in fits)}; name one of them")
    raise ConfigError(
        f"unknown GPU {name!r}; known: {', '.join(s.key for s in table)} (see phi3v-plan --list-gpus); for another "
        "card pass --gpu_memory_gib (and --tflops, --bandwidth for a speed estimate)"
    )


def _nvml_fits(name: str) -> list[GpuSpec]:
    """The rows an NVML / nvidia-smi device name fits (most specific pattern, then the memory the name states)."""
    if not _VENDOR_WORDS.search(name) and not re.search(r"\d+\s*GB", name, re.IGNORECASE):
        return []  # a bare family name (``H100``) is not an NVML name: the prefix rule judged it
    fits = [s for s in gpu_table() if s.nvml_match and re.search(s.nvml_match, name, re.IGNORECASE)]
    if not fits:
        return []
    longest = max(len(s.nvml_match) for s in fits)
    fits = [s for s in fits if len(s.nvml_match) == longest]
    memory = re.search(r"(\d+)\s*GB", name, re.IGNORECASE)
    if memory and len(fits) > 1:
        same = [s for s in fits if abs(s.memory_gib - int(memory.group(1))) < 4]
        fits = same or fits
    return fits


def custom_gpu(name: str | None, memory_gib: float, tflops: float | None, bandwidth_gbs: float | None) -> GpuSpec:
    """A card that is not in the table, from the numbers the user states (``--gpu_memory_gib``, ``--tflops``,
    ``--bandwidth``); a tabulated ``name`` keeps its other properties. Unknown compute capability is taken as 8.0
    (bf16 and FlashAttention-2), which the source says."""
    try:
        base = find_gpu(name) if name else None
    except ConfigError:
        base = None
    stated = f"stated: {memory_gib:g} GiB" + (f", {tflops:g} TFLOP/s" if tflops else "") + (
        f", {bandwidth_gbs:g} GB/s" if bandwidth_gbs else ""
    )
    if base is not None:
        return replace(
            base,
            memory_gib=memory_gib,
            tflops_fp16=tflops or base.tflops_fp16,
            tflops_bf16=(tflops or base.tflops_bf16) if base.bf16_native else None,
            bandwidth_gbs=bandwidth_gbs or base.bandwidth_gbs,
            source=f"{base.source}; {stated}",
        )
    return GpuSpec(
        key=name or "custom",
        name=name or "custom GPU",
        architecture="unknown",
        compute_capability=(8, 0),
        memory_gib=memory_gib,
        bandwidth_gbs=bandwidth_gbs,
        tflops_fp16=tflops,
        tflops_bf16=tflops,
        bf16_native=True,
        flash_attention_2=True,
        pcie_gbs=32,
        source=f"{stated} (not in planner/data/gpus.json; bf16 and FlashAttention-2 assumed"
        + ("; speed needs --tflops and --bandwidth" if not (tflops and bandwidth_gbs) else "")
        + ")",
    )


@dataclass(frozen=True)
class AzureSku:
    """One Azure ND-series VM size (a row of ``planner/data/azure.json``)."""

    family: str
    vm_size: str
    gpu: str
    gpus_per_vm: int
    gpu_memory_gib: float
    intra_node: str
    inter_node: str
    inter_node_gbit: float
    vcpus: int | None
    host_memory_gib: float | None
    source: str

    @property
    def inter_node_gbs(self) -> float:
        """InfiniBand bandwidth per VM in GB/s."""
        return self.inter_node_gbit / 8

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``--json``)."""
        return asdict(self)


@cache
def azure_skus() -> tuple[AzureSku, ...]:
    """All SKUs of ``planner/data/azure.json``."""
    return tuple(AzureSku(**row) for row in _load("azure.json")["skus"])


# -- detection -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectedGpu:
    """What NVML reports about one device."""

    index: int
    name: str
    memory_bytes: int
    compute_capability: tuple[int, int]
    nvlink_active: int
    spec: GpuSpec
    uuid: str | None = None


@dataclass(frozen=True)
class Detection:
    """The result of :func:`detect`.

    Attributes:
        gpus: One entry per visible device (empty when NVML is unavailable).
        driver: Driver version string.
        cuda_driver: Highest CUDA version the driver supports (``12.4``).
        error: Why nothing was detected (None on success).
    """

    gpus: tuple[DetectedGpu, ...] = ()
    driver: str | None = None
    cuda_driver: str | None = None
    error: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """At least one GPU was found."""
        return bool(self.gpus)

    @property
    def count(self) -> int:
        """Number of visible GPUs."""
        return len(self.gpus)

    @property
    def spec(self) -> GpuSpec | None:
        """The weakest visible GPU (least memory, then lowest peak): a data-parallel job runs at its pace."""
        if not self.gpus:
            return None
        return min(
            (g.spec for g in self.gpus),
            key=lambda s: (s.memory_gib, s.tflops_bf16 or s.tflops_fp16 or 0.0),
        )

    @property
    def homogeneous(self) -> bool:
        """All GPUs are the same model."""
        return len({g.spec.key for g in self.gpus}) <= 1

    @property
    def nvlink(self) -> bool:
        """Every GPU has at least one active NVLink."""
        return bool(self.gpus) and all(g.nvlink_active > 0 for g in self.gpus)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``--json``)."""
        return {
            "gpus": [
                {
                    "index": g.index,
                    "name": g.name,
                    "memory_gib": round(g.memory_bytes / 2**30, 2),
                    "compute_capability": f"{g.compute_capability[0]}.{g.compute_capability[1]}",
                    "architecture": g.spec.architecture,
                    "nvlink_active_links": g.nvlink_active,
                    "table_key": None if g.spec.detected else g.spec.key,
                    "uuid": g.uuid,
                }
                for g in self.gpus
            ],
            "driver": self.driver,
            "cuda_driver": self.cuda_driver,
            "error": self.error,
            "notes": list(self.notes),
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def match_spec(name: str, memory_bytes: int, cc: tuple[int, int]) -> GpuSpec:
    """The table row for an NVML device name, disambiguated by memory; a synthetic spec for unknown cards."""
    candidates = [s for s in gpu_table() if s.nvml_match and re.search(s.nvml_match, name, re.IGNORECASE)]
    # "H100 PCIe" and "H100 NVL" also match the generic "H100" pattern: prefer the most specific pattern.
    if candidates:
        longest = max(len(s.nvml_match) for s in candidates)
        specific = [s for s in candidates if len(s.nvml_match) == longest]
        gib = memory_bytes / 2**30
        return min(specific, key=lambda s: abs(s.memory_gib - gib))
    architecture = architecture_of(*cc)
    # Architecture-level estimate: the slowest tabulated card of the same architecture (a lower bound, labelled).
    relatives = [s for s in gpu_table() if s.architecture == architecture and (s.tflops_fp16 or 0) > 0]
    slowest = min(relatives, key=lambda s: s.tflops_fp16 or 0.0) if relatives else None
    return GpuSpec(
        key=name,
        name=name,
        architecture=architecture,
        compute_capability=cc,
        memory_gib=round(memory_bytes / 2**30, 2),
        bandwidth_gbs=slowest.bandwidth_gbs if slowest else None,
        tflops_fp16=slowest.tflops_fp16 if slowest else None,
        tflops_bf16=slowest.tflops_bf16 if slowest and supports_bf16(cc) else None,
        bf16_native=supports_bf16(cc),
        flash_attention_2=supports_flash_attention(cc),
        pcie_gbs=32,
        source=(
            f"NVML (name, memory, compute capability); not in planner/data/gpus.json: speed is an architecture-level "
            f"estimate with the peak and bandwidth of the slowest tabulated {architecture} card ({slowest.key})"
            if slowest
            else f"NVML; not in planner/data/gpus.json and no tabulated {architecture} card: speed cannot be predicted"
        ),
        detected=True,
    )


def _import_nvml() -> ModuleType | None:
    return import_nvml()


def detect(nvml: ModuleType | Any | None = None, environ: Mapping[str, str] | None = None) -> Detection:
    """The GPUs a job on this machine will see, through :func:`phi3v_core.nvml.visible_devices`.

    ``CUDA_VISIBLE_DEVICES`` (indices and UUIDs) and MIG instances are honoured; a query that fails (permissions)
    is a note, not a failed detection. Memory always comes from NVML; the GPU table adds peak and bandwidth.

    Args:
        nvml: An object with pynvml's API (``nvmlInit``, ``nvmlDeviceGetCount``, …); None imports ``pynvml``.
        environ: Environment to read ``CUDA_VISIBLE_DEVICES`` from (default ``os.environ``).

    Returns:
        A :class:`Detection`; without NVML/driver it holds no GPUs and says why in ``error``.
    """
    nvml = nvml if nvml is not None else _import_nvml()
    if nvml is None:
        return Detection(error="pynvml (nvidia-ml-py) is not installed")
    report = visible_devices(nvml, environ)
    if report.error:
        return Detection(error=report.error, driver=report.driver, cuda_driver=report.cuda_driver)
    gpus = []
    notes = list(report.warnings)
    for device in report.devices:
        cc = device.compute_capability or (0, 0)
        if device.compute_capability is None:
            notes.append(f"GPU {device.cuda_index} ({device.name}): compute capability unknown")
        memory = device.memory_total_bytes or 0
        spec = match_spec(device.name, memory, cc)
        if memory and not spec.detected:
            # what NVML reports is what the job gets (MIG slices, ECC, vGPU): the table keeps peak and bandwidth
            spec = replace(spec, memory_gib=round(memory / 2**30, 2), source=f"{spec.source}; memory from NVML")
        if spec.detected:
            notes.append(
                f"GPU {device.cuda_index} ({device.name}) is not in the GPU table: memory from NVML, speed an "
                f"architecture-level estimate from its compute capability"
            )
        if device.mig:
            notes.append(f"GPU {device.cuda_index} is a MIG instance ({device.name}, {memory / 2**30:.1f} GiB)")
        gpus.append(DetectedGpu(device.cuda_index, device.name, memory, cc, device.nvlink_active, spec, device.uuid))
    if not gpus:
        return Detection(
            driver=report.driver,
            cuda_driver=report.cuda_driver,
            error="NVML found no GPU visible to CUDA (check CUDA_VISIBLE_DEVICES)"
            + (f"; {'; '.join(report.warnings)}" if report.warnings else ""),
            notes=tuple(notes),
        )
    return Detection(gpus=tuple(gpus), driver=report.driver, cuda_driver=report.cuda_driver, notes=tuple(notes))
