"""Fail first: everything ``phi3v-bench run``/``matrix`` check before a measurement starts, and the lock they hold.

Bounds on the protocol fields, model folders, writable result folders (:func:`preflight_problems`); one writer per
results folder (:func:`one_writer`); and the error for a finished measurement whose file could not be written
(:func:`unsaved_result_error`), which keeps a copy of the numbers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.config import BenchConfig
from phi3v_core.errors import ConfigError
from phi3v_core.fs import FolderLock, describe_os_error, model_folder_problems, writable_problem

__all__ = [
    "LIMITS", "kernel_problems", "limit_problems", "one_writer", "package_problems", "preflight_problems",
    "refuse_unusable_gpu",
    "unsaved_result_error",
]

#: Upper bounds on the protocol and layout fields, checked before anything runs: a typo such as ``--steps 10**9``
#: would otherwise start a benchmark that never ends (or a launch of thousands of processes).
LIMITS: dict[str, int] = {
    "steps": 100_000,
    "warmup": 10_000,
    "repeats": 100,
    "gpus": 64,
    "nodes": 1024,
    "global_batch": 1_000_000,
    "micro_batch": 4096,
    "seed": 2**32 - 1,
}

_LIMIT_WHY = {
    "steps": "a benchmark needs tens of steps, not millions",
    "warmup": "a few warmup steps are enough",
    "repeats": "a handful of fresh processes is enough for compare",
    "gpus": "no node has that many GPUs",
    "nodes": "no job spans that many nodes",
    "global_batch": "no run uses a batch that large",
    "micro_batch": "no GPU holds a micro-batch that large",
    "seed": "seeds are 32-bit",
}


def limit_problems(cells: Sequence[BenchConfig]) -> list[str]:
    """One line per field of :data:`LIMITS` that a cell exceeds (the largest offending value, and why)."""
    problems = []
    for name, limit in LIMITS.items():
        values = [getattr(c, name) for c in cells]
        too_big = sorted({v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > limit})
        if too_big:
            problems.append(f"{name} {too_big[-1]} is above the limit of {limit} ({_LIMIT_WHY[name]}); use a smaller value")
    return problems


def package_problems(cells: Sequence[BenchConfig]) -> list[str]:
    """One line per optional package that a cell needs and this Python cannot import, with the pip command.

    bitsandbytes for QLoRA and the 8-bit optimizers, DeepSpeed for ``--offload optimizer`` and for full/frozen_vision
    over several processes (ZeRO-2). Found before any worker starts; a run that needs neither never imports them.
    """
    missing = [name for name in ("bitsandbytes", "deepspeed") if importlib.util.find_spec(name) is None]
    if not missing:
        return []
    from phi3v_core.methods import get_method  # only when a package is missing: the registry imports torch

    needs: dict[str, str] = {}
    for c in cells:
        if c.method == "qlora":
            needs.setdefault("bitsandbytes", "--method qlora")
        if c.optim != "adamw":
            needs.setdefault("bitsandbytes", f"--optim {c.optim}")
        if c.offload == "optimizer":
            needs.setdefault("deepspeed", "--offload optimizer")
        elif get_method(c.method).supports_deepspeed and c.gpus * c.nodes > 1:
            needs.setdefault("deepspeed", f"--method {c.method} on {c.gpus * c.nodes} processes (DeepSpeed ZeRO-2)")
    return [
        f"{why} needs {name}, which is not installed: pip install {name}"
        for name, why in needs.items()
        if name in missing
    ]


def kernel_problems(cells: Sequence[BenchConfig]) -> list[str]:
    """``--kernels liger`` needs a CUDA GPU (Triton) and the liger-kernel package: said once, before any worker."""
    if not any(c.kernels == "liger" for c in cells):
        return []
    import torch

    if not torch.cuda.is_available():
        return ["--kernels liger needs a CUDA GPU (Liger's kernels are Triton, which runs on GPUs only); "
                "use --kernels none on this machine"]
    if importlib.util.find_spec("liger_kernel") is None:
        return ["--kernels liger needs liger-kernel, which is not installed: pip install 'phi3v-bench[liger]'"]
    return []


def preflight_problems(cells: Sequence[BenchConfig], hardware: str | None = None, *, writes: bool = True) -> list[str]:
    """Every problem that would stop ``cells`` after their measurement, found before it (empty when none).

    Checks the bounds in :data:`LIMITS`, the optional packages the cells need (:func:`package_problems`), that
    DeepSpeed can build its CPU Adam where a cell offloads the optimizer
    (:func:`phi3v_core.software.offload_build_problem`), each model folder's type and weight headers, and that
    every result folder (``<out>/<release>/<hardware>``; ``<out>`` when ``hardware`` is None) can be created and
    written. Creates nothing.

    Args:
        cells: Validated configurations.
        hardware: The hardware folder name results go to on this machine.
        writes: Whether this process writes results (a cluster node other than node 0 does not).
    """
    from bench.store import result_path

    problems = limit_problems(cells) + package_problems(cells) + kernel_problems(cells)
    if not problems and any(c.offload == "optimizer" for c in cells):
        from phi3v_core.software import offload_build_problem

        # DeepSpeed would JIT-build its CPU Adam after the model is built, and fail there with a raw error
        build = offload_build_problem()
        if build:
            problems.append("--" + build)
    for model in dict.fromkeys(c.model for c in cells):
        problems += model_folder_problems(Path(model), f"--model {model}")
    if not writes:
        return problems
    folders = dict.fromkeys(
        Path(c.out) if hardware is None else result_path(c.out, c.release, hardware, c).parent for c in cells
    )
    for out in dict.fromkeys(c.out for c in cells):
        problem = writable_problem(Path(out), "--out")
        if problem:
            problems.append(problem)
            folders = {}  # the same cause, said once
    for folder in folders:
        problem = writable_problem(folder, "--out")
        if problem:
            problems.append(problem)
    return problems


@contextlib.contextmanager
def one_writer(out: str, command: str, enabled: bool = True) -> Iterator[None]:
    """Hold ``<out>/.phi3v.lock`` for the whole measurement, and turn SIGTERM/SIGHUP into a clean exit meanwhile.

    Two sweeps into one results folder would time each other's contended runs and keep whichever wrote last; the
    second refuses at once, naming the holder. A lock left by a process that no longer runs is taken over.
    """
    from bench import runner

    if not enabled:  # a cluster node other than node 0 writes nothing
        yield
        return
    lock = FolderLock(out, command=command, flag="--out")
    with lock:
        if lock.took_over is not None:
            held = lock.took_over
            print(f"warning: took over a stale lock on --out {out} left by pid {held.get('pid')} on "
                  f"{held.get('host')} ({held.get('command')}), which no longer runs", file=sys.stderr)
        from bench.store import recover_stranded

        recover_stranded(out)  # under the lock: a hidden .json.<x>.tmp is a dead writer's, never a live one's
        # The runner does the same while a repeat runs; here it also covers the gaps between repeats and cells,
        # so that the lock is released and no temp folder is left when the command is killed.
        with runner.terminate_on_signals():
            yield


def unsaved_result_error(result: Any, exc: OSError) -> str:
    """The one-line error for a measurement whose result file could not be written; keeps a copy when it can."""
    from bench.store import result_path
    from phi3v_core.io import atomic_write_text

    cfg = result.config
    target = result_path(cfg.out, cfg.release, result.environment.hardware, cfg)  # where save_result writes

    cause = describe_os_error(OSError(exc.errno, exc.strerror), target)
    message = f"the measurement finished but its result could not be written: {cause}"
    copy = Path(tempfile.gettempdir()) / f"phi3v-bench-unsaved-{result.config.cell_id()}-{os.getpid()}.json"
    try:
        atomic_write_text(copy, result.to_json())
    except (OSError, ValueError):
        return message + " (the numbers are printed above)"
    return message + f" (the numbers are printed above; a copy of the result is in {copy})"


def refuse_unusable_gpu() -> None:
    """A GPU that NVML sees but torch cannot use is refused before anything is built (never replaced by the CPU)."""
    from phi3v_core.software import torch_gpu_refusal

    problem = torch_gpu_refusal()
    if problem:
        raise ConfigError(problem)
