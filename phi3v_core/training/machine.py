"""``Machine``: what this machine and process offer a training run, read before anything is built.

Torch-free to import: :meth:`Machine.detect` imports torch to ask CUDA; :meth:`Machine.without_torch` reads what needs
no torch (installed packages, ``WORLD_SIZE``, and whether torch is a CPU build), so a command can judge its settings
before torch is loaded.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace

from phi3v_core.software import BnbLibrary, bnb_library, offload_build_problem, torch_is_cpu_build
from phi3v_core.training.distributed_env import env_int

__all__ = ["Machine"]


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _world_size() -> int:
    return max(env_int("WORLD_SIZE", 1), 1)  # a malformed value is reported by distributed_env_problems


@dataclass(frozen=True)
class Machine:
    """What the machine offers; :meth:`detect` reads it, tests construct it to simulate other machines.

    Attributes:
        cuda: A CUDA device is usable.
        capability: Compute capability of the first CUDA device, e.g. ``(8, 0)``.
        device_count: Visible CUDA devices.
        world_size: Processes in the job (``WORLD_SIZE`` from torchrun; 1 otherwise).
        flash_attn: The ``flash_attn`` package is importable.
        deepspeed: The ``deepspeed`` package is importable.
        bitsandbytes: The ``bitsandbytes`` package is importable.
        bnb: The CUDA library bitsandbytes will load with this torch (:func:`phi3v_core.software.bnb_library`;
            None: unknown, no CUDA, or not installed).
        offload_problem: Why DeepSpeed could not build its CPU Adam here (None: it can, or not checked).
        probed: Whether CUDA is known (False: :meth:`unprobed`; ``cuda``, ``capability``, ``device_count``, ``bnb``
            and ``offload_problem`` are unknown, and the checks that read them wait for :meth:`detect`).
    """

    cuda: bool = False
    capability: tuple[int, int] | None = None
    device_count: int = 0
    world_size: int = 1
    flash_attn: bool = False
    deepspeed: bool = True
    bitsandbytes: bool = True
    bnb: BnbLibrary | None = None
    offload_problem: str | None = None
    probed: bool = True

    @classmethod
    def detect(cls) -> Machine:
        """Probe this machine and process (no CUDA context is created beyond the capability query)."""
        import torch  # here, not at the top: validating a configuration needs no torch until the machine is asked

        cuda = torch.cuda.is_available()
        bitsandbytes = _installed("bitsandbytes")
        return cls(
            cuda=cuda,
            capability=torch.cuda.get_device_capability(0) if cuda else None,
            device_count=torch.cuda.device_count() if cuda else 0,
            world_size=_world_size(),
            flash_attn=_installed("flash_attn"),
            deepspeed=_installed("deepspeed"),
            bitsandbytes=bitsandbytes,
            bnb=bnb_library(torch.version.cuda) if cuda and bitsandbytes else None,
            offload_problem=offload_build_problem(),
        )

    @classmethod
    def unprobed(cls) -> Machine:
        """What is known without importing torch: the installed packages and ``WORLD_SIZE``; CUDA is not asked
        (``probed=False``). Judging a configuration against it reports every problem that does not depend on the GPU."""
        return cls(
            world_size=_world_size(),
            flash_attn=_installed("flash_attn"),
            deepspeed=_installed("deepspeed"),
            bitsandbytes=_installed("bitsandbytes"),
            probed=False,
        )

    @classmethod
    def without_torch(cls) -> Machine:
        """This machine as far as it is known without importing torch: with a CPU build of torch
        (:func:`torch_is_cpu_build`) exactly what :meth:`detect` finds (no CUDA), else :meth:`unprobed`."""
        unprobed = cls.unprobed()
        if not torch_is_cpu_build():
            return unprobed
        return replace(unprobed, probed=True, offload_problem=offload_build_problem())  # no CUDA: nothing else to ask
