"""``--trace``: measure activation and temporary memory of the real training step with torch's ``MemTracker``.

The exact model (:class:`phi3v_core.model.Phi3VForCausalLM`, full size) is built on fake tensors on the CPU, the
fine-tuning method is applied through ``phi3v_core.methods`` (PEFT for LoRA), and one real step runs — forward,
backward, AdamW — under :class:`torch.distributed._tools.mem_tracker.MemTracker`. Fakes cost no memory, so the
4.1 B-parameter model traces on a laptop. What fakes cannot show is added analytically by :func:`apply_trace`:
ZeRO-2 sharding and DeepSpeed buckets (:mod:`planner.estimate`), the CUDA context and the allocator cache.

Stand-ins (what fake tensors cannot run):

* FlashAttention-2 has no CPU kernel; SDPA is traced instead. On the CPU it takes PyTorch's flash kernel, which
  keeps the same tensors for backward (output + logsumexp, no S² buffers).
* bitsandbytes 4-bit kernels cannot run on fakes; QLoRA is traced as LoRA over a 16-bit base and the closed-form
  difference (4-bit weights, bitsandbytes' saved inputs, one dequantized weight) is added.

:func:`planner.allocator.allocation_replay` records every allocation and free of a few real micro-steps the same way
and replays them through PyTorch's CUDA caching-allocator block rules, which shows how much the allocator would reserve
over the tensors from fragmentation alone.

Traces are cached as JSON under ``$PHI3V_CACHE/traces`` (default ``~/.cache/phi3v-bench/traces``), keyed by
everything that changes the result (shapes, method, dtypes, attention, workload, micro-batch, checkpointing,
torch/transformers/peft versions).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from phi3v_core.device import default_dtype
from phi3v_core.io import atomic_write_json, remove_dead_temps
from planner.estimate import SampleShape, activation_terms, dequant_transient, model_state_bytes
from planner.memory_types import MemoryEstimate, MemoryItem, Overheads
from planner.shapes import ModelShape, image_token_count
from planner.trace_cache import read_cached_trace
from planner.train_setup import METHODS, TrainSetup

__all__ = [
    "TRACE_VERSION",
    "apply_trace",
    "build_batch",
    "cache_dir",
    "measure_step",
    "prepare_model",
    "trace_activations",
    "uses_autocast",
]

#: Bump when the tracing procedure changes (invalidates cached traces).
TRACE_VERSION = 2


def cache_dir() -> Path:
    """Where traces are cached: ``$PHI3V_CACHE/traces``, else ``$XDG_CACHE_HOME/phi3v-bench/traces``."""
    root = os.environ.get("PHI3V_CACHE")
    if root:
        return Path(root) / "traces"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "phi3v-bench" / "traces"


def _mem_tracker_class() -> type:
    """``MemTracker`` adapted to frozen parameters and to models with thousands of modules.

    Two changes, both to private hooks of torch's class (guarded so that a torch without them falls back to the
    stock behaviour):

    * it cannot register gradient hooks on frozen parameters (LoRA, frozen vision) and raises; frozen parameters get
      no-op handles instead, since they never receive a gradient;
    * after every operator it updates per-module peaks of *every* module seen (≈1,500 here), which makes a
      full-size step take minutes. We only need the global peak and the peak of activation + temporary memory, so
      the lean version records those two and the phase they occurred in.
    """
    from torch.distributed._tools import mem_tracker as mt_module

    base = mt_module.MemTracker

    class _NoHook:
        def remove(self) -> None:
            """Nothing was registered."""

    class LeanMemTracker(base):  # type: ignore[misc, valid-type]
        """MemTracker that also reports the peak of activations + temporaries (see :func:`_mem_tracker_class`)."""

        def __init__(self) -> None:
            super().__init__()
            self.phase = "forward"
            self.dynamic_peak: dict[Any, int] = {}
            self.dynamic_snapshot: dict[Any, dict[str, int]] = {}
            self.dynamic_phase: dict[Any, str] = {}

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):  # noqa: ANN001, ANN202
            for param in module.parameters():
                if not param.requires_grad:
                    self._param_to_grad_hook_handles.setdefault(param, (_NoHook(), _NoHook()))
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _update_peak_stats(self, peak_state):  # noqa: ANN001, ANN202
            snap = getattr(self, "_curr_mem_snap", None)
            if snap is None or not hasattr(self, "_peak_mem"):
                return super()._update_peak_stats(peak_state)
            act, temp = mt_module._MemRefType.ACT, mt_module._MemRefType.TEMP
            for dev, dev_snap in snap.items():
                total = dev_snap[mt_module._TOTAL_KEY]
                if self._peak_mem.get(dev, 0) < total:
                    self._peak_mem[dev] = total
                    self._peak_mem_snap[dev] = dict(dev_snap)
                dynamic = dev_snap.get(act, 0) + dev_snap.get(temp, 0)
                if self.dynamic_peak.get(dev, -1) < dynamic:
                    self.dynamic_peak[dev] = dynamic
                    self.dynamic_snapshot[dev] = dict(dev_snap)
                    self.dynamic_phase[dev] = self.phase
            return None

    return LeanMemTracker


def _category_name(key: Any) -> str:
    value = getattr(key, "value", key)
    return str(value)


def build_batch(shape: ModelShape, workload: SampleShape, micro_batch: int = 1) -> dict[str, Any]:
    """A training batch shaped like ``workload``: placeholder runs of negative ids, pixel slots and labels.

    Works in any tensor mode (real, fake, meta): only factory functions are used. Each sample holds
    ``workload.images`` images of grid ``workload.crop_grid``; the last ``workload.supervised_tokens`` (else 32)
    text tokens are supervised.
    """
    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    rows, cols = workload.crop_grid or (1, 1)
    images = workload.images
    per_image = image_token_count(rows, cols, shape.num_img_tokens) if images else 0
    seq = max(workload.seq_len, images * (per_image + 1) + 2)
    slots = (workload.num_crops or rows * cols) + 1
    ids = torch.full((micro_batch, seq), 100, dtype=torch.long)
    position = 1
    for k in range(images):
        ids[:, position : position + per_image] = -(k + 1)
        position += per_image + 1
    supervised = min(32 if workload.supervised_tokens is None else workload.supervised_tokens, seq - position)
    with unset_fake_temporarily():  # real labels inside a fake trace: the model reads where to compute logits
        labels = torch.full((micro_batch, seq), -100, dtype=torch.long)
        if supervised > 0:
            labels[:, seq - supervised :] = 100
    batch: dict[str, Any] = {"input_ids": ids, "labels": labels}
    if images:
        size = shape.image_size
        batch["pixel_values"] = torch.zeros(micro_batch * images, slots, 3, size, size, dtype=torch.float32)
        batch["image_sizes"] = [(size * rows, size * cols)] * (micro_batch * images)
    return batch


def prepare_model(config: Any, setup: TrainSetup) -> Any:
    """Build ``Phi3VForCausalLM(config)`` in the stored weight dtype and apply the method (on the current device).

    The model is created directly in its dtype rather than cast afterwards. QLoRA is prepared as LoRA (see the
    module docstring).
    """
    import torch

    from phi3v_core.methods import MethodOptions, get_method
    from phi3v_core.model import Phi3VForCausalLM

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    with default_dtype(dtypes[setup.stored_weight_dtype]):
        model = Phi3VForCausalLM(config)
    model.supervised_logits = setup.logits == "supervised"
    if setup.gradient_checkpointing:
        from phi3v_core.model.checkpointing import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    method = setup.spec.trace_name
    options = MethodOptions(
        lora_rank=setup.lora_rank,
        lora_lm_head=setup.lora_lm_head,
        freeze_vision=not setup.lora_vision,
        compute_dtype=dtypes[setup.precision],
    )
    model, _report = get_method(method).prepare(model, options)
    model.train()
    return model


def uses_autocast(setup: TrainSetup) -> bool:
    """AMP (autocast) runs wherever weights and compute dtype differ: fp32 masters, or fp32 LoRA adapters."""
    if setup.precision == "fp32":
        return False
    return setup.spec.uses_lora or setup.stored_weight_dtype != setup.precision


def measure_step(model: Any, batch: dict[str, Any], setup: TrainSetup) -> dict[str, Any]:
    """Run one warm-up step (creates AdamW state) and one tracked step; return MemTracker's numbers (bytes).

    Returns:
        ``peak`` (category → bytes at the global peak), ``dynamic`` (activations + temporaries at their own peak),
        ``dynamic_snapshot`` and ``dynamic_phase`` (forward, backward or optimizer).
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if setup.optim == "adamw_8bit":
        import bitsandbytes as bnb

        for module in model.modules():  # as the HF Trainer does: 32-bit states for embeddings
            if isinstance(module, torch.nn.Embedding):
                bnb.optim.GlobalOptimManager.get_instance().register_module_override(module, "weight", {"optim_bits": 32})
        optimizer = bnb.optim.AdamW8bit(params, lr=1e-5)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=setup.optimizer_foreach)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    autocast = (
        torch.autocast("cpu", dtype=dtypes[setup.precision]) if uses_autocast(setup) else contextlib.nullcontext()
    )
    tracker = None

    def step() -> None:
        if tracker is not None:
            tracker.phase = "forward"
        with autocast:
            # Keep only the loss, like HF Trainer's compute_loss: the fp32 logits die before backward.
            loss = model(**batch).loss
        if tracker is not None:
            tracker.phase = "backward"
        loss.backward()
        del loss
        if tracker is not None:
            tracker.phase = "optimizer"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW creates its state lazily on the first step
    tracker = _mem_tracker_class()()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    peak = tracker.get_tracker_snapshot("peak")
    device = next(iter(peak))
    dyn_device = next(iter(tracker.dynamic_peak), device)
    return {
        "peak": {_category_name(k): int(v) for k, v in peak[device].items()},
        "dynamic": int(tracker.dynamic_peak.get(dyn_device, 0)),
        "dynamic_snapshot": {
            _category_name(k): int(v) for k, v in tracker.dynamic_snapshot.get(dyn_device, {}).items()
        },
        "dynamic_phase": tracker.dynamic_phase.get(dyn_device, ""),
    }


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("torch", "transformers", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "?"
    return out


def trace_key(shape: ModelShape, setup: TrainSetup, workload: SampleShape) -> str:
    """Cache key of a trace (hash of everything the measurement depends on)."""
    payload = {
        "version": TRACE_VERSION,
        "shape": shape.to_dict() | {"name": ""},
        # QLoRA is traced as LoRA but its stored result includes the 4-bit adjustment: it needs its own key
        "method": setup.method,
        "precision": setup.precision,
        "weights": setup.stored_weight_dtype,
        "attention": "sdpa" if setup.attn == "flash_attention_2" else setup.attn,
        "gc": setup.gradient_checkpointing,
        "micro_batch": setup.micro_batch,
        "logits": setup.logits,
        "lora": [setup.lora_rank, setup.lora_lm_head, setup.lora_vision],
        "workload": asdict(workload),
        "libs": _versions(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _trace_record(
    key: str, model: str, setup: TrainSetup, workload: SampleShape, attention: str, result: dict[str, Any],
    dynamic: int, notes: list[str], start: float,
) -> dict[str, Any]:
    """The JSON-ready trace: what was traced, the measured bytes, timing and library versions."""
    import torch

    return {
        "key": key,
        "model": model,
        "method": setup.method,
        "precision": setup.precision,
        "weights": setup.stored_weight_dtype,
        "attention": setup.attn,
        "traced_attention": attention,
        "micro_batch": setup.micro_batch,
        "gradient_checkpointing": setup.gradient_checkpointing,
        "seq_len": workload.seq_len,
        "vision_crops": workload.vision_crops,
        "dynamic": dynamic,
        "dynamic_phase": result["dynamic_phase"],
        "dynamic_snapshot": result["dynamic_snapshot"],
        "peak": result["peak"],
        "seconds": round(time.perf_counter() - start, 1),
        "libs": _versions(),
        "torch_threads": torch.get_num_threads(),
        "notes": notes,
        "cached": False,
    }


def trace_activations(
    model: str,
    setup: TrainSetup,
    workload: SampleShape,
    cache: Path | None = None,
    refresh: bool = False,
) -> dict[str, Any]:
    """Trace one training step of ``model`` on fake tensors (or return the cached trace).

    Args:
        model: Preset name or checkpoint folder (``phi3v_core.config.get_config``).
        setup: Method, dtypes, attention, micro-batch, checkpointing.
        workload: Sample shape (``SampleShape.from_images`` fills in the crop grid).
        cache: Cache folder (default :func:`cache_dir`).
        refresh: Ignore a cached trace.

    Returns:
        A JSON-ready dict: ``dynamic`` bytes (activations + temporaries at their peak, batch included), the
        snapshots, the phase, timing and the cache key.
    """
    from planner.shapes import load_shape

    if setup.method not in METHODS:
        raise ValueError(setup.method)
    shape = load_shape(model)
    key = trace_key(shape, setup, workload)
    path = (cache or cache_dir()) / f"{key}.json"
    cached = None if refresh else read_cached_trace(path, key)
    if cached is not None:
        return cached

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from phi3v_core.config import get_config

    traced_setup = replace(setup, method=setup.spec.trace_name)
    attention = "sdpa" if setup.attn == "flash_attention_2" else setup.attn
    start = time.perf_counter()
    config = get_config(model, attn_implementation=attention)
    # Build and adapt on the meta device, then materialise as fakes (torchtitan's pattern): PEFT moves adapters
    # with ``.to()``, which cannot swap parameters that are already fake.
    with torch.device("meta"):
        net = prepare_model(config, traced_setup)
    with FakeTensorMode(allow_non_fake_inputs=True):  # the meta parameters are its inputs here
        net.to_empty(device="cpu")
        batch = build_batch(shape, workload, setup.micro_batch)
        result = measure_step(net, batch, traced_setup)
    del net
    notes = []
    if setup.attn == "flash_attention_2":
        notes.append("FlashAttention-2 traced as SDPA (CPU flash kernel: same saved tensors)")
    dynamic = result["dynamic"]
    if setup.spec.trace_name != setup.method:  # QLoRA: traced as LoRA
        lora_acts = activation_terms(shape, traced_setup, workload)
        qlora_acts = activation_terms(shape, setup, workload)
        extra = (qlora_acts["lm_saved"] + qlora_acts["vision_saved"]) - (
            lora_acts["lm_saved"] + lora_acts["vision_saved"]
        )
        dynamic += extra + dequant_transient(shape, setup)
        notes.append("QLoRA traced as LoRA; bitsandbytes' saved inputs and one dequantized weight added in closed form")
    data = _trace_record(key, model, setup, workload, attention, result, dynamic, notes, start)
    for left in remove_dead_temps(path.parent, "*.json"):  # a publish killed before its rename
        print(f"note: removed {left}, a trace cache write left by a killed phi3v-plan --trace", file=sys.stderr)
    atomic_write_json(path, data)
    return data


def apply_trace(
    memory: MemoryEstimate,
    shape: ModelShape,
    setup: TrainSetup,
    workload: SampleShape,
    overheads: Overheads,
    trace: dict[str, Any],
) -> MemoryEstimate:
    """Replace the closed-form activations of ``memory`` by a trace, keeping the analytic model states.

    The trace was taken at its own micro-batch; activations scale linearly with the micro-batch. Model states come
    from :func:`planner.estimate.model_state_bytes` (ZeRO-2 shards and buckets included); the optimizer-step phase
    of the closed form is kept, since a single unsharded trace cannot show it for ZeRO.
    """
    states = model_state_bytes(shape, setup)
    zero2 = setup.zero == 2 and setup.spec.trains_base
    static = {k: v for k, v in states.items() if k not in ("gradients", "ddp_buckets")}
    grads = states.get("gradients", 0.0) + states.get("ddp_buckets", 0.0)
    if zero2:
        static["gradients"] = states["gradients"]
        grads = 0.0
    scale = setup.micro_batch / max(int(trace.get("micro_batch", 1)), 1)
    dynamic = trace["dynamic"] * scale
    snapshot_grads = float(trace.get("dynamic_snapshot", {}).get("Gradient", 0)) * (0.0 if zero2 else 1.0)
    in_forward = grads if setup.grad_accum > 1 else min(snapshot_grads, grads)
    traced_total = sum(static.values()) + in_forward + dynamic
    phases = {"traced step (MemTracker)": traced_total, "optimizer step": memory.phases.get("optimizer step", 0.0)}
    phase = max(phases, key=phases.__getitem__)
    items = [MemoryItem(k, v, next((i.note for i in memory.items if i.name == k), "")) for k, v in static.items()]
    if phase == "optimizer step":
        items = [i for i in memory.items]
    else:
        if in_forward:
            items.append(MemoryItem("gradients (accumulated)", in_forward))
        items.append(
            MemoryItem(
                "activations + temporaries (traced)",
                dynamic,
                f"MemTracker on fake tensors, peak in {trace.get('dynamic_phase', '?')}"
                + (f", x{scale:g} micro-batch" if scale != 1 else ""),
            )
        )
    allocated = phases[phase]
    return MemoryEstimate(
        items=items,
        phase=phase,
        allocated=allocated,
        cache=overheads.cache_fraction * allocated,
        context=memory.context,
        min_cache=overheads.min_cache_fraction * allocated,
        phases={**memory.phases, **phases},
    )
