"""What the memory model returns (a breakdown by part and phase) and what a GPU adds on top (pure dataclasses).

:mod:`planner.estimate` builds these; they live here so that the estimate module stays one purpose (the tally).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["GIB", "MemoryEstimate", "MemoryItem", "Overheads"]

GIB = 2**30


@dataclass(frozen=True)
class Overheads:
    """What a GPU adds on top of the tensors autograd and the optimizer hold (fitted constants; none on CPU).

    Attributes:
        cache_fraction: Reserved/allocated excess of PyTorch's caching allocator plus unmodelled buffers, as a share
            of the allocated peak (this is what nvidia-smi shows above the tensors).
        min_cache_fraction: The smallest excess a run survives with (the allocator frees its cache and retries
            before it fails): decides "fits".
        cuda_context_gib: CUDA context, cuBLAS/cuDNN workspaces.
        nccl_gib: NCCL buffers when more than one rank.
        headroom_fraction: Share of the usable memory a recommended plan leaves free (the stated margin).
    """

    cache_fraction: float = 0.0
    min_cache_fraction: float = 0.0
    cuda_context_gib: float = 0.0
    nccl_gib: float = 0.0
    headroom_fraction: float = 0.0

    @classmethod
    def cpu(cls) -> Overheads:
        """No allocator cache or context: what MemTracker counts."""
        return cls()


@dataclass
class MemoryItem:
    """One line of a memory breakdown (bytes)."""

    name: str
    bytes: float
    note: str = ""

    @property
    def gib(self) -> float:
        """Size in GiB."""
        return self.bytes / GIB


@dataclass
class MemoryEstimate:
    """Peak memory of one GPU, as a breakdown.

    Attributes:
        items: Tensors alive at the peak, by kind (sums to ``allocated``).
        phase: The moment of the step where the peak falls.
        allocated: Peak of tensor memory (``torch.cuda.max_memory_allocated``; MemTracker's total).
        cache: Allocator cache and unmodelled buffers at the expected peak.
        context: CUDA context and NCCL buffers.
        phases: Allocated bytes at every moment considered.
    """

    items: list[MemoryItem]
    phase: str
    allocated: float
    cache: float
    context: float
    min_cache: float
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def reserved(self) -> float:
        """Expected peak as nvidia-smi shows it (before capping at the card's size)."""
        return self.allocated + self.cache + self.context

    @property
    def required(self) -> float:
        """Least memory the step runs in (allocated + minimum cache + context)."""
        return self.allocated + self.min_cache + self.context

    def expected_peak(self, capacity: float | None = None) -> float:
        """What nvidia-smi will show: the caching allocator grows up to the card's size but no further."""
        return self.reserved if capacity is None else min(self.reserved, max(capacity, self.required))

    def to_dict(self, capacity: float | None = None) -> dict[str, Any]:
        """JSON-ready form (GiB, rounded)."""
        return {
            "phase": self.phase,
            "items_gib": {item.name: round(item.gib, 3) for item in self.items},
            "notes": {item.name: item.note for item in self.items if item.note},
            "allocated_gib": round(self.allocated / GIB, 3),
            "cache_gib": round(self.cache / GIB, 3),
            "context_gib": round(self.context / GIB, 3),
            "required_gib": round(self.required / GIB, 3),
            "expected_peak_gib": round(self.expected_peak(capacity) / GIB, 3),
            "phases_gib": {k: round(v / GIB, 3) for k, v in self.phases.items()},
        }
