"""The CUDA caching allocator's block rules, and a replay of a real training step's allocations through them.

:func:`allocation_replay` records every allocation and free of a few real micro-steps on fake tensors (the model is
built as in :func:`planner.trace.trace_activations`) and replays them through :class:`CachingAllocatorModel`, which
shows how much the allocator would reserve over the tensors from fragmentation alone. No GPU is needed.
"""

from __future__ import annotations

import bisect
import contextlib
import time
import weakref
from dataclasses import replace
from typing import Any

from planner.estimate import SampleShape
from planner.trace import build_batch, prepare_model, uses_autocast
from planner.train_setup import TrainSetup

__all__ = ["CachingAllocatorModel", "allocation_replay"]


class CachingAllocatorModel:
    """The block rules of PyTorch's CUDA caching allocator, for replaying an allocation stream (no GPU needed).

    Modelled (``c10/cuda/CUDACachingAllocator.cpp``, default settings): sizes rounded up to 512 B; requests up to
    1 MiB served from a small pool carved out of 2 MiB segments, larger ones from a large pool (new segments: 20 MiB
    for requests under 10 MiB, else the request rounded up to 2 MiB); best fit (the smallest cached block that is
    large enough); a block is split when the remainder is at least 512 B (small pool) or above 1 MiB (large pool);
    freed blocks merge with free neighbours of the same segment; nothing is returned to the driver, as on a card
    that never runs short (an allocator under pressure frees its cache and retries). Not modelled: streams and
    events, ``max_split_size_mb``, expandable segments, memory outside the allocator (context, cuBLAS, NCCL).
    """

    SMALL = 2**20
    SMALL_SEGMENT = 2 * 2**20
    LARGE_SEGMENT = 20 * 2**20
    MIN_LARGE_ALLOC = 10 * 2**20
    ROUND_LARGE = 2 * 2**20

    class _Block:
        __slots__ = ("addr", "free", "next", "prev", "size")

        def __init__(self, size: int, addr: int) -> None:
            self.size, self.addr, self.free = size, addr, True
            self.prev: CachingAllocatorModel._Block | None = None
            self.next: CachingAllocatorModel._Block | None = None

    def __init__(self) -> None:
        self._pools: dict[bool, list[tuple[int, int, Any]]] = {True: [], False: []}  # small? -> (size, addr, block)
        self._live: dict[Any, tuple[Any, bool]] = {}
        self._next_addr = 0
        self.reserved = self.allocated = self.peak_reserved = self.peak_allocated = 0

    @staticmethod
    def round_size(nbytes: int) -> int:
        """Request size after the allocator's 512-byte rounding."""
        return 512 * max(1, -(-nbytes // 512))

    def segment_size(self, size: int) -> int:
        """Bytes the allocator asks the driver for when no cached block fits ``size``."""
        if size <= self.SMALL:
            return self.SMALL_SEGMENT
        if size < self.MIN_LARGE_ALLOC:
            return self.LARGE_SEGMENT
        return self.ROUND_LARGE * -(-size // self.ROUND_LARGE)

    def malloc(self, key: Any, nbytes: int) -> None:
        """Allocate ``nbytes`` under ``key``."""
        size = self.round_size(nbytes)
        small = size <= self.SMALL
        pool = self._pools[small]
        index = bisect.bisect_left(pool, (size, -1))
        if index < len(pool):
            block = pool.pop(index)[2]
        else:
            segment = self.segment_size(size)
            block = self._Block(segment, self._next_addr)
            self._next_addr += segment + 1  # +1: segments never touch, so they never merge
            self.reserved += segment
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        remainder = block.size - size
        if remainder >= 512 if small else remainder > self.SMALL:
            rest = self._Block(remainder, block.addr + size)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, size
            bisect.insort(pool, (rest.size, rest.addr, rest))
        block.free = False
        self._live[key] = (block, small)
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)

    def free(self, key: Any) -> None:
        """Free the allocation made under ``key`` (its block goes back to the cache, merged with free neighbours)."""
        block, small = self._live.pop(key)
        pool = self._pools[small]
        self.allocated -= block.size
        block.free = True
        for neighbour in (block.prev, block.next):
            if neighbour is None or not neighbour.free:
                continue
            pool.pop(bisect.bisect_left(pool, (neighbour.size, neighbour.addr)))
            first, second = (neighbour, block) if neighbour is block.prev else (block, neighbour)
            first.size += second.size
            first.next = second.next
            if second.next is not None:
                second.next.prev = first
            block = first
        bisect.insort(pool, (block.size, block.addr, block))


class _AllocationRecorder:
    """Feeds the allocator model every tensor storage an operator creates, and frees it when the storage dies."""

    def __init__(self, allocator: CachingAllocatorModel) -> None:
        from torch.utils.weak import WeakIdKeyDictionary

        self.allocator = allocator
        self.seen: Any = WeakIdKeyDictionary()
        self.next_key = 0
        self.events = 0

    def _on_free(self, key: int, _ref: Any) -> None:
        self.events += 1
        self.allocator.free(key)

    def track(self, tensor: Any) -> None:
        """Allocate ``tensor``'s storage in the model unless it is already tracked (or empty)."""
        import torch

        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        if storage in self.seen or storage.nbytes() == 0:
            return
        self.next_key += 1
        self.events += 1
        self.allocator.malloc(self.next_key, storage.nbytes())
        self.seen[storage] = weakref.ref(storage, lambda ref, key=self.next_key: self._on_free(key, ref))

    def mode(self) -> Any:
        """A dispatch mode that tracks every operator's outputs while it is active."""
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        track = self.track

        class Recorder(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
                out = func(*args, **(kwargs or {}))
                for tensor in tree_flatten(out)[0]:
                    track(tensor)
                return out

        return Recorder()


def allocation_replay(
    model: str,
    setup: TrainSetup,
    workloads: list[SampleShape],
    grad_accum: int,
    steps: int = 2,
) -> dict[str, Any]:
    """Record every allocation and free of real training micro-steps and replay them through the allocator model.

    The model is built on fake tensors as in :func:`trace_activations`; parameters (and DDP's 25 MB gradient
    buckets when ``world_size > 1``) are allocated first, then ``steps`` optimizer steps of ``grad_accum``
    micro-steps run, cycling through ``workloads`` (samples of different lengths, as in a real epoch), with the
    Trainer's gradient clipping. QLoRA is recorded as LoRA.

    Returns:
        ``peak_allocated`` and ``peak_reserved`` (bytes), their ``ratio``, ``events`` and ``seconds``.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from phi3v_core.config import get_config
    from planner.shapes import load_shape

    shape = load_shape(model)
    allocator = CachingAllocatorModel()
    recorder = _AllocationRecorder(allocator)
    track = recorder.track

    traced_setup = replace(setup, method=setup.spec.trace_name)
    attention = "sdpa" if setup.attn == "flash_attention_2" else setup.attn
    config = get_config(model, attn_implementation=attention)
    start = time.perf_counter()
    with torch.device("meta"):
        net = prepare_model(config, traced_setup)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    with FakeTensorMode(allow_non_fake_inputs=True):
        net.to_empty(device="cpu")
        for tensor in [*net.parameters(), *net.buffers()]:
            track(tensor)
        params = [p for p in net.parameters() if p.requires_grad]
        buckets = []
        if setup.world_size > 1 and setup.zero == 0:
            remaining = sum(p.numel() * p.element_size() for p in params)
            while remaining > 0:
                buckets.append(torch.empty(min(remaining, 25 * 2**20), dtype=torch.uint8))
                track(buckets[-1])
                remaining -= 25 * 2**20
        batches = [build_batch(shape, workload, setup.micro_batch) for workload in workloads]
        optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=setup.optimizer_foreach)
        autocast = (
            torch.autocast("cpu", dtype=dtypes[setup.precision])
            if uses_autocast(traced_setup)
            else contextlib.nullcontext()
        )
        with recorder.mode():
            for micro_step in range(steps * grad_accum):
                with autocast:
                    loss = net(**batches[micro_step % len(batches)]).loss
                loss.backward()
                del loss
                if (micro_step + 1) % grad_accum == 0:
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
    del net, optimizer, buckets, batches
    return {
        "peak_allocated": allocator.peak_allocated,
        "peak_reserved": allocator.peak_reserved,
        "ratio": allocator.peak_reserved / max(allocator.peak_allocated, 1),
        "events": recorder.events,
        "seconds": round(time.perf_counter() - start, 1),
    }
