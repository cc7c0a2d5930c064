"""What the installed software lets this machine run, read without importing torch or building anything.

Four questions a GPU run asks before a model is built, each answered one way for ``phi3v-plan``, ``phi3v-bench``
and ``phi3v-finetune``:

* **Can torch use the GPU NVML sees?** (:func:`torch_gpu_problem`): a CPU build of torch, or a CUDA build newer
  than the driver, makes ``torch.cuda.is_available()`` False while NVML lists the GPUs; without this check a
  4-billion-parameter model would start training on the CPU.
* **Which bitsandbytes library will load, and which GPUs does it hold?** (:func:`bnb_library`,
  :func:`qlora_unsupported_reason`): bitsandbytes ships one CUDA library per toolkit and loads the one named after
  ``torch.version.cuda``; each is built for a range of compute capabilities.
* **Can DeepSpeed build its CPU Adam?** (:func:`offload_build_problem`): ``--offload optimizer`` JIT-compiles it
  after the model is built unless a prebuilt op ships with DeepSpeed.
* **Is flash-attn installed?** (:attr:`Software.flash_attn`).

:meth:`Software.detect` reads all of it (a few milliseconds: file reads and one ``c++ --version``); tests build a
:class:`Software` by hand.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "QLORA_MIN_COMPUTE_CAPABILITY",
    "WHAT_IF_BNB_TOOLKIT",
    "BnbLibrary",
    "Software",
    "bnb_library",
    "bnb_arch_range",
    "driver_for_cuda",
    "fatbin_architectures",
    "offload_build_problem",
    "qlora_unsupported_reason",
    "torch_cuda_build",
    "torch_is_cpu_build",
    "torch_gpu_problem",
    "torch_gpu_refusal",
]

#: Least compute capability any bitsandbytes NF4 build supports (its installation guide, v0.48 to v0.50: "NVIDIA
#: CUDA" table, NF4/FP4 quantization at 6.0+). Which library loads narrows it (:class:`BnbLibrary`).
QLORA_MIN_COMPUTE_CAPABILITY = (6, 0)

#: The toolkit a what-if plan assumes for bitsandbytes: the one ``pip install torch`` brings today (CUDA 13.0).
WHAT_IF_BNB_TOOLKIT = (13, 0)


def bnb_arch_range(toolkit: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(least, most) compute capability of bitsandbytes' library for CUDA ``toolkit`` (None: no upper bound).

    bitsandbytes 0.50's wheels (the architectures its build script passes per toolkit, checked against the
    libraries themselves): ``cuda118`` … ``cuda126`` hold sm 6.0-9.0, ``cuda128``/``cuda129`` sm 7.0-12.0,
    ``cuda130``/``cuda132`` sm 7.5 and newer only (CUDA 13 dropped Maxwell, Pascal and Volta).
    """
    if toolkit >= (13, 0):
        return (7, 5), None
    if toolkit >= (12, 8):
        return (7, 0), (12, 0)
    return (6, 0), (9, 0)


def fatbin_architectures(data: bytes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(SASS, PTX) architectures of the CUDA fat binaries inside a shared library (``80`` = sm_80).

    A fat binary starts with the magic ``0xBA55ED50`` (a 16-byte header: magic, version 1, header size, payload
    size); each entry has a kind (1 PTX, 2 ELF/SASS), its header size, its payload size and, at byte 28, the
    architecture. That is all ``cuobjdump --list-elf`` reads; no CUDA is needed.
    """
    sass: set[int] = set()
    ptx: set[int] = set()
    magic = struct.pack("<I", 0xBA55ED50)
    at = data.find(magic)
    while at != -1 and at + 16 <= len(data):
        _magic, version, header, size = struct.unpack_from("<IHHQ", data, at)
        if version == 1 and header == 16:
            entry, end = at + header, min(at + header + size, len(data))
            while entry + 32 <= end:
                kind, _v, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
                if not 32 <= entry_header <= 1024:
                    break
                arch = struct.unpack_from("<I", data, entry + 28)[0]
                (ptx if kind == 1 else sass).add(arch)
                entry += entry_header + payload
        at = data.find(magic, at + 4)
    return tuple(sorted(sass)), tuple(sorted(ptx))


@dataclass(frozen=True)
class BnbLibrary:
    """The bitsandbytes CUDA library that will load with this torch.

    Attributes:
        name: File name (``libbitsandbytes_cuda130.so``).
        toolkit: CUDA toolkit it was built for, (major, minor).
        present: The file is in the installed bitsandbytes package.
        source: Why this one (``torch.version.cuda 13.0`` or ``BNB_CUDA_VERSION=126``).
        sass: Architectures it holds machine code for, read from the file (``75`` = sm_75); empty when not read.
        ptx: Architectures it holds PTX for (the driver compiles those for newer GPUs).
    """

    name: str
    toolkit: tuple[int, int]
    present: bool
    source: str
    sass: tuple[int, ...] = ()
    ptx: tuple[int, ...] = ()

    def runs_on(self, cc: tuple[int, int]) -> bool:
        """Whether its kernels run on compute capability ``cc`` (the file's architectures, else the table)."""
        if not (self.sass or self.ptx):
            least, most = bnb_arch_range(self.toolkit)
            return least <= cc and (most is None or cc <= most)
        # a cubin runs on its major version at the same or a higher minor; PTX is compiled for any newer GPU
        sm = cc[0] * 10 + cc[1]
        return any(a // 10 == cc[0] and a % 10 <= cc[1] for a in self.sass) or any(p <= sm for p in self.ptx)

    def describe(self) -> str:
        """``libbitsandbytes_cuda130.so (sm 75, 80, 86, 89, 90, 100, 120)`` (or the table's range)."""
        if self.sass:
            return f"{self.name} (sm {', '.join(map(str, self.sass))})"
        least, most = bnb_arch_range(self.toolkit)
        span = f"{least[0]}.{least[1]}" + (f"-{most[0]}.{most[1]}" if most else "+")
        return f"{self.name} (sm {span})"


def _version_tuple(text: str | None) -> tuple[int, int] | None:
    match = re.match(r"^\s*(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _torch_version_text(torch_dir: Path | None) -> str | None:
    """The text of the installed torch's ``torch/version.py`` (or ``torch_dir``'s); None without torch or when unreadable.

    Read rather than imported: importing torch takes seconds, and the planner and the commands' first answers must not.
    """
    folder = torch_dir if torch_dir is not None else _package_dir("torch")
    if folder is None:
        return None
    try:
        return (folder / "version.py").read_text(encoding="utf-8")
    except OSError:
        return None


def torch_cuda_build(torch_dir: Path | None = None) -> str | None:
    """``torch.version.cuda`` of the installed torch (``"13.0"``), None for a CPU build or no torch (read, not imported)."""
    text = _torch_version_text(torch_dir)
    match = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE) if text else None
    return match.group(1) if match else None


def torch_is_cpu_build(torch_dir: Path | None = None) -> bool:
    """The installed torch (or ``torch_dir``'s) is built for neither CUDA nor ROCm, so ``torch.cuda.is_available()``
    is False, read without importing torch. False when unsure (no torch, an unreadable or unexpected file)."""
    text = _torch_version_text(torch_dir)
    # both must be stated as None: a file this does not recognise says nothing
    return text is not None and all(
        re.search(rf"^{name}\s*(?::[^=]*)?=\s*None\s*$", text, re.MULTILINE) for name in ("cuda", "hip")
    )


def bnb_library(
    torch_cuda: str | None, package_dir: Path | None = None, environ: Mapping[str, str] | None = None
) -> BnbLibrary | None:
    """The library bitsandbytes loads: ``libbitsandbytes_cuda<MAJOR><MINOR>.so`` from ``torch.version.cuda``.

    ``BNB_CUDA_VERSION`` (e.g. ``126``) overrides it, as in bitsandbytes' ``get_cuda_bnb_library_path``.

    Args:
        torch_cuda: torch's CUDA build (None: a CPU build, nothing CUDA loads).
        package_dir: The installed ``bitsandbytes`` folder (default: found by import machinery; None if absent).
        environ: Environment (default ``os.environ``).

    Returns:
        The library, or None when bitsandbytes is not installed or torch has no CUDA.
    """
    environ = os.environ if environ is None else environ
    folder = package_dir if package_dir is not None else _package_dir("bitsandbytes")
    if folder is None:
        return None
    override = environ.get("BNB_CUDA_VERSION", "").strip()
    if override.isdigit() and len(override) >= 3:
        toolkit, source = (int(override[:-1]), int(override[-1])), f"BNB_CUDA_VERSION={override}"
    else:
        parsed = _version_tuple(torch_cuda)
        if parsed is None:
            return None
        toolkit, source = parsed, f"torch.version.cuda {torch_cuda}"
    name = f"libbitsandbytes_cuda{toolkit[0]}{toolkit[1]}.so"
    try:
        sass, ptx = fatbin_architectures((folder / name).read_bytes())
    except OSError:
        return BnbLibrary(name, toolkit, False, source)
    return BnbLibrary(name, toolkit, True, source, sass, ptx)


def qlora_unsupported_reason(cc: tuple[int, int] | None, library: BnbLibrary | None = None) -> str | None:
    """Why QLoRA cannot run on a GPU of compute capability ``cc`` (None when it can).

    The one QLoRA support rule (``phi3v-plan``, ``phi3v-bench selfcheck``, ``phi3v-finetune``). With ``library``
    (a detected machine) the range of the library that will load decides; without it, any bitsandbytes build
    (compute capability 6.0+; a what-if plan states which torch build that assumes).
    """
    if cc is None:
        return None
    cc = (int(cc[0]), int(cc[1]))
    if library is None:
        if cc >= QLORA_MIN_COMPUTE_CAPABILITY:
            return None
        least = ".".join(map(str, QLORA_MIN_COMPUTE_CAPABILITY))
        return (
            f"QLoRA needs bitsandbytes NF4 kernels: compute capability {least} or newer (bitsandbytes installation "
            f"guide); this GPU is {cc[0]}.{cc[1]}"
        )
    if not library.present:
        return (
            f"QLoRA: bitsandbytes would load {library.name} ({library.source}), which the installed bitsandbytes "
            f"does not ship; install a bitsandbytes release built for CUDA {library.toolkit[0]}.{library.toolkit[1]} "
            "or a torch build it has a library for"
        )
    if not library.runs_on(cc):
        newer = library.sass and cc[0] * 10 + cc[1] > max(library.sass)
        fix = (
            "install a newer bitsandbytes, or a torch build for CUDA 13"
            if newer
            else "install a torch build for CUDA 12.6 (pip install torch --index-url "
            "https://download.pytorch.org/whl/cu126), whose bitsandbytes library holds it"
        )
        return (
            f"QLoRA: bitsandbytes loads {library.describe()} for {library.source}, which has no kernels for compute "
            f"capability {cc[0]}.{cc[1]}; {fix}"
        )
    return None


#: Least NVIDIA driver for each CUDA major version of a torch build (CUDA minor-version compatibility; CUDA
#: release notes, "CUDA Toolkit and Minimum Required Driver Version"): 13.x needs 580, 12.x 525, 11.x 450.
_DRIVER_FOR_CUDA_MAJOR = {13: "580", 12: "525", 11: "450"}


def driver_for_cuda(torch_cuda: str) -> str | None:
    """The least driver version that runs a torch built for ``torch_cuda`` (None when not tabulated)."""
    parsed = _version_tuple(torch_cuda)
    return _DRIVER_FOR_CUDA_MAJOR.get(parsed[0]) if parsed else None


def torch_gpu_problem(
    gpus: int, driver: str | None, driver_cuda: str | None, torch_cuda: str | None, cuda_available: bool | None
) -> str | None:
    """Why torch cannot use the GPUs NVML sees (None when it can, or when NVML sees none).

    Args:
        gpus: GPUs NVML lists (after ``CUDA_VISIBLE_DEVICES``).
        driver: The driver's version (NVML).
        driver_cuda: The highest CUDA version the driver supports (NVML), e.g. ``12.4``.
        torch_cuda: ``torch.version.cuda`` (None: a CPU build).
        cuda_available: ``torch.cuda.is_available()``; None when torch was not asked (``phi3v-plan`` does not
            import it): then only a CPU build or a CUDA build newer than the driver is a problem.
    """
    needed, have = _version_tuple(torch_cuda), _version_tuple(driver_cuda)
    if cuda_available is None:
        cuda_available = torch_cuda is not None and not (needed and have and needed > have)
    if gpus == 0 or cuda_available:
        return None
    seen = f"NVML sees {gpus} GPU(s) (driver {driver or '?'}, CUDA {driver_cuda or '?'})"
    hide = "; or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on the CPU on purpose"
    builds = "pytorch.org/get-started/locally names the --index-url of each CUDA build"
    if torch_cuda is None:
        return (
            f"{seen} but torch is a CPU build: nothing would run on the GPU; install a torch build for CUDA <= "
            f"{driver_cuda or 'the driver'} ({builds}){hide}"
        )
    if needed and have and needed > have:
        least = driver_for_cuda(torch_cuda)
        return (
            f"{seen} but torch is built for CUDA {torch_cuda}, newer than the driver supports: torch cannot use the "
            f"GPU; update the driver{f' to >= {least}' if least else ''} (for CUDA {torch_cuda}), or install a torch "
            f"build for CUDA <= {driver_cuda} ({builds}){hide}"
        )
    return (
        f"{seen} but torch (CUDA {torch_cuda} build) reports no usable GPU: check the driver installation; "
        f"python -c 'import torch; torch.cuda.init()' prints CUDA's own error{hide}"
    )


def torch_gpu_refusal(report: Any = None) -> str | None:
    """:func:`torch_gpu_problem` for this process: NVML's visible GPUs against the imported torch.

    Call it before anything is built. A CPU build of torch, or a CUDA build newer than the driver, is known from
    ``torch/version.py`` without importing torch (which takes seconds, tens of seconds on a busy host), so those
    refusals come at once; otherwise torch is imported and ``torch.cuda.is_available()`` asked (it initialises the
    CUDA driver API in this process but creates no context and holds no GPU memory: workers started afterwards are
    unaffected). A torch already imported is asked directly.

    Args:
        report: A :class:`phi3v_core.nvml.NvmlReport` (default: read now).
    """
    from phi3v_core.nvml import visible_devices

    report = report if report is not None else visible_devices()
    if report.error is not None or not report.devices:
        return None
    seen = (len(report.devices), report.driver, report.cuda_driver)
    imported = sys.modules.get("torch")
    known = torch_gpu_problem(*seen, imported.version.cuda if imported else torch_cuda_build(), None)
    if known:
        return known
    import torch

    return torch_gpu_problem(*seen, torch.version.cuda, torch.cuda.is_available())


def _run_version(command: list[str]) -> str | None:
    """None when ``command`` runs and exits 0; else why not."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{' '.join(command)} failed ({type(exc).__name__}: {exc})"
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        return f"{' '.join(command)} exited {done.returncode} {last[0]}".rstrip()
    return None


def _prebuilt_cpu_adam(deepspeed_dir: Path | None) -> bool:
    """DeepSpeed was installed with its CPU Adam op prebuilt (``DS_BUILD_CPU_ADAM=1``)."""
    return deepspeed_dir is not None and any((deepspeed_dir / "ops" / "adam").glob("cpu_adam_op*.so"))


def offload_build_problem(
    deepspeed_dir: Path | None = None,
    which: Callable[[str], str | None] = shutil.which,
    find_module: Callable[[str], Any] = importlib.util.find_spec,
    run: Callable[[list[str]], str | None] = _run_version,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """Why DeepSpeed could not build its CPU Adam here (None: it can, or a prebuilt one ships).

    ``--offload optimizer`` runs Adam on the host with DeepSpeed's ``cpu_adam`` op, JIT-compiled at the first step
    unless prebuilt: the JIT needs the ``ninja`` package (DeepSpeed imports it) and binary (torch runs it) and a C++
    compiler that runs (``$CXX`` or ``c++``). Checked before the model is built; each problem names its fix.
    """
    environ = os.environ if environ is None else environ
    folder = deepspeed_dir if deepspeed_dir is not None else _package_dir("deepspeed")
    if folder is None and find_module("deepspeed") is None:
        return "offload optimizer needs DeepSpeed: pip install deepspeed"
    if _prebuilt_cpu_adam(folder):
        return None
    problems = []
    if find_module("ninja") is None or which("ninja") is None:
        problems.append("ninja (pip install ninja, with its bin folder on PATH)")
    compiler = environ.get("CXX", "c++")
    if which(compiler) is None:
        problems.append(f"a C++ compiler ({compiler} is not on PATH: apt-get install g++, or set CXX)")
    else:
        failed = run([compiler, "--version"])
        if failed:
            problems.append(f"a working C++ compiler ({failed}: reinstall it, or set CXX to one that runs)")
    if not problems:
        return None
    return (
        f"offload optimizer JIT-builds DeepSpeed's CPU Adam, which needs {' and '.join(problems)}; or install "
        "DeepSpeed with the op prebuilt (DS_BUILD_CPU_ADAM=1 pip install deepspeed)"
    )


@dataclass(frozen=True)
class Software:
    """What the installed packages offer on this machine (:meth:`detect`; tests build one by hand).

    Attributes:
        flash_attn: The flash-attn package is installed.
        torch_cuda: torch's CUDA build (``"13.0"``); None for a CPU build.
        bitsandbytes: bitsandbytes is installed.
        bnb: The CUDA library bitsandbytes will load (None: not installed, or a CPU build of torch).
        offload_problem: Why ``--offload optimizer`` cannot build here (None: it can).
    """

    flash_attn: bool = False
    torch_cuda: str | None = None
    bitsandbytes: bool = False
    bnb: BnbLibrary | None = None
    offload_problem: str | None = None

    @classmethod
    def detect(cls) -> Software:
        """Read this machine's packages (file reads and one compiler call; no torch import, no CUDA)."""
        torch_cuda = torch_cuda_build()
        return cls(
            flash_attn=importlib.util.find_spec("flash_attn") is not None,
            torch_cuda=torch_cuda,
            bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
            bnb=bnb_library(torch_cuda),
            offload_problem=offload_build_problem(),
        )


class _KnownNotice(logging.Filter):
    """Drops the notices :func:`quiet_known_notices` names (by how they start); every other record passes."""

    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


#: logger → how each notice it must not print starts.
_KNOWN_NOTICES: dict[str, tuple[str, ...]] = {
    "kernels._internals.hf_hub": ("Skipping publisher trust check",),
    "transformers.modeling_rope_utils": (
        "This model config has set a `rope_parameters['original_max_position_embeddings']`",
    ),
}


def quiet_known_notices() -> None:
    """Silence notices known to be harmless that would otherwise print on every run (issue #24 §4).

    bitsandbytes' CPU backend looks for an optional kernel package (``kernels-community/quantization-bitsandbytes``)
    when it is imported: on CPUs without it, it warns that the package is missing, and in offline mode (this
    project's rule: nothing comes from the Hub at run time) the ``kernels`` package warns that it skips the
    publisher trust check. Neither says anything about the run; bitsandbytes' 4-bit path works without the kernel.
    transformers warns on every Phi-3 LongRoPE config (the official ones included) that it prefers a ``factor``
    field to ``original_max_position_embeddings``; it derives the same factor from the two, so the model is the same.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    for name, starts in _KNOWN_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownNotice) for f in logger.filters):
            logger.addFilter(_KnownNotice(*starts))
