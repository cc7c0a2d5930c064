"""Host RAM of one training process, and the part of this machine's RAM a new run may take (issue #24 §2).

``phi3v-bench run``, every ``matrix`` cell and ``phi3v-finetune`` check the same two numbers before a model is built
(:mod:`bench.fit`, :mod:`planner.fit_check`):

* **needed**, per process (:func:`process_host_bytes`): its runtime besides tensors (:data:`PROCESS_BASELINE_BYTES`);
  on a CPU every tensor of the step as well (the planner's allocated peak, :func:`planner.estimate.estimate_memory`);
  with ``--offload optimizer`` the fp32 optimizer states the host keeps (:func:`planner.estimate.host_memory_bytes`).
* **usable**: what psutil calls available, less :func:`system_reserve_bytes` for the kernel and the other processes.

Measured with ``scripts/measure_host_ram.py`` (results/validation/host-ram-cpu-Intel-Xeon-2t-20261207*.json): the
benchmark's CPU worker on Phi-3.5-vision at real width with 1, 2 and 3 decoder layers (CLIP 2 layers, 4 crops)
peaked at 3.00, 3.48 and 3.94 GiB RSS; the tensors it tracked peaked at 1.81, 2.28 and 2.75 GiB, which the planner's
allocated peak matches within 1 % (0.469 GiB per decoder layer predicted, 0.473 measured). The rest, 1.19 GiB at
every depth, is the runtime that the former 1.0 GiB allowance undercounted. The model is built once, in place: RSS
after the build equals the weights, with no transient copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from planner.estimate import SampleShape
    from planner.shapes import ModelShape
    from planner.train_setup import TrainSetup

__all__ = [
    "PROCESS_BASELINE_BYTES", "SYSTEM_RESERVE_FRACTION", "process_host_bytes", "shortfall",
    "system_reserve_bytes",
]

GIB = 1 << 30
#: Peak RSS of the benchmark's CPU worker minus its tensors' peak, the same (1.19 GiB) at decoder depth 1, 2 and 3:
#: Python with torch, transformers and peft imported (0.44 GiB), the processor and the encoded examples, the Trainer,
#: and the allocator's slack.
PROCESS_BASELINE_BYTES = 1.2 * GIB
#: Share of the machine's RAM a run leaves to the kernel (its watermarks, 0.1 GiB here; the mapped code of the running
#: programs, 0.8 GiB here, which psutil counts as available page cache) and to the machine's other processes while it
#: grows to its peak over minutes. Without it a run predicted just under the available RAM starts and is killed (issue
#: #24: lora on phi-3.5-vision, 21.2 GiB predicted of 22.3 GiB available on a 24 GB host, killed after 100 s: mid-build,
#: as its fp32 weights take minutes to initialise on 2 cores, so the RAM ran out around the run, not inside it).
SYSTEM_RESERVE_FRACTION = 0.05


def process_host_bytes(shape: ModelShape, setup: TrainSetup, workload: SampleShape, cuda: bool) -> float:
    """Host RAM one training process needs at its peak (bytes): runtime, offloaded optimizer, on a CPU every tensor.

    Args:
        shape: Model dimensions.
        setup: The step's layout (method, precision, micro-batch, optimizer, offload).
        workload: Tokens and crops per sample (a CPU step's activations live in host RAM).
        cuda: It trains on a GPU (its tensors in device memory) rather than on the CPU.
    """
    from planner.estimate import estimate_memory, host_memory_bytes

    host = host_memory_bytes(shape, setup) + PROCESS_BASELINE_BYTES
    if not cuda:
        host += estimate_memory(shape, setup, workload).allocated
    return host


def system_reserve_bytes(total_bytes: float | None) -> float:
    """RAM a run leaves to the kernel and the other processes: :data:`SYSTEM_RESERVE_FRACTION` of the node's RAM."""
    return SYSTEM_RESERVE_FRACTION * (total_bytes or 0.0)


def shortfall(need: float, available: float | None, total: float | None, what: str = "host RAM") -> str | None:
    """``"21.9 GiB of host RAM, 22.3 GiB available (21.1 GiB usable, 1.2 GiB left to the system)"`` when ``need`` is
    more than the usable RAM; None when it fits or nothing is known."""
    if available is None:
        return None
    reserve = system_reserve_bytes(total)
    usable = max(0.0, available - reserve)
    if need <= usable:
        return None
    return (f"{need / GIB:.1f} GiB of {what}, {available / GIB:.1f} GiB available ({usable / GIB:.1f} GiB usable, "
            f"{reserve / GIB:.1f} GiB left to the system)")
