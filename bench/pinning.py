"""One GPU for one process: the environment a single-process benchmark or selfcheck worker starts with.

A single-process run on a node with several GPUs would otherwise see all of them, and ``TrainConfig`` refuses a
single process that sees more than one GPU (it cannot tell whether the user wanted data parallelism). So the
parent pins the worker to the first device the user's own environment makes visible - the device that process
would have used as ``cuda:0`` anyway - through ``CUDA_VISIBLE_DEVICES``. Torch-free: NVML only
(:mod:`phi3v_core.nvml`), so the parent never creates a CUDA context.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from phi3v_core.nvml import parse_visible_devices, visible_devices

__all__ = ["first_visible_device", "single_process_env"]


def first_visible_device(environ: Mapping[str, str] | None = None, nvml: Any | None = None) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` value that keeps only the first device ``environ`` makes visible.

    * ``CUDA_VISIBLE_DEVICES`` set: its first entry, verbatim (an index, a ``GPU-…`` UUID or a ``MIG-…`` UUID, or
      a UUID prefix) - CUDA takes exactly that entry as device 0, so the pinned job keeps the user's choice.
    * unset, first device a MIG instance: that instance's ``MIG-…`` UUID from NVML (MIG instances are only
      addressable by UUID).
    * unset otherwise: ``"0"`` - CUDA's own device 0 in CUDA's own order (``CUDA_DEVICE_ORDER`` is inherited).

    Returns None when there is nothing to pin: no GPU (or no NVML) here, or ``CUDA_VISIBLE_DEVICES`` already hides
    every GPU (the user asked for that).
    """
    environ = os.environ if environ is None else environ
    entries = parse_visible_devices(environ.get("CUDA_VISIBLE_DEVICES"))
    if entries is not None:
        return entries[0] if entries else None
    report = visible_devices(nvml, environ)
    if not report.devices:
        return None
    first = report.devices[0]
    if first.mig and first.uuid:
        return first.uuid
    return "0"


def single_process_env(environ: Mapping[str, str] | None = None, nvml: Any | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default ``os.environ``) pinned to one GPU (see :func:`first_visible_device`)."""
    env = dict(os.environ if environ is None else environ)
    device = first_visible_device(env, nvml)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env
