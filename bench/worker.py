"""One rank of one benchmark repeat: ``python -m bench.worker --config cfg.json --out DIR`` (also under torchrun).

It drives the real fine-tuning core — ``phi3v_core.training.train`` with the real Trainer, method and collator —
and writes ``rank<R>.json`` with this rank's step times, memory peaks, FLOPs and workload counts. Failures (an OOM
included) are written there too, so the runner can record them as rows instead of crashing the sweep. The order of
measurements is :mod:`bench.measure`'s protocol: peaks are read when the timed window closes; the CPU memory probe
and the FLOP trace (fake tensors, no GPU memory) come after and can only add notes, never change a peak or a status.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from bench.config import BenchConfig
from bench.dataload import measure_processor_rate
from bench.flop_count import FlopCache, count_step_flops, step_micro_batches
from bench.measure import InstrumentedSteps, TimedWindow
from bench.progress import PROGRESS_FILE
from bench.runner import FLOP_CACHE_ENV
from bench.status import HOST_OOM, OOM, oom_status
from bench.updates import ChangedWeights
from phi3v_core.device import local_device
from phi3v_core.io import atomic_write_text
from phi3v_core.processing import PAD_TOKEN_ID, Phi3VDataCollator
from phi3v_core.software import quiet_known_notices
from phi3v_core.training.workload import to_train_config

__all__ = [
    "gather_payloads", "main", "peak_flops", "plan_steps", "processor_for", "to_train_config", "workload_samples",
]


def plan_steps(cfg: BenchConfig, cuda: bool) -> dict[str, int | None]:
    """Lay out the optimizer steps of one repeat: warmup, timed window, then the untimed CPU memory step.

    FLOPs are not counted on a training step (they are counted from the shapes, or traced on fake tensors, after
    training), so ``total`` is the last step that trains.
    """
    first_timed = cfg.warmup + 1
    last_timed = cfg.warmup + cfg.steps
    memory_step = None if cuda else last_timed + 1  # CUDA has exact allocator peaks; CPU needs a tensor probe
    total = memory_step or last_timed
    return {"first_timed": first_timed, "last_timed": last_timed, "memory_step": memory_step, "total": total}


def workload_samples(cfg: BenchConfig, total_steps: int) -> int:
    """Samples the whole job trains on: the global batch for each of ``total_steps`` optimizer steps."""
    return cfg.global_batch * total_steps


def processor_for(cfg: BenchConfig) -> Any:
    """The processor of ``cfg``'s model: the folder's own, or the offline tokenizer for presets."""
    from phi3v_core.processing import Phi3VProcessor

    folder = Path(cfg.model)
    if folder.is_dir() and (folder / "tokenizer.json").exists():
        return Phi3VProcessor.from_pretrained(folder, num_crops=cfg.num_crops)
    # Presets have random weights; the offline tokenizer has the same special tokens and ids.
    return Phi3VProcessor.tiny(num_crops=cfg.num_crops)


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of this GPU at ``precision`` from the planner's GPU table (``None`` on CPU/unknown)."""
    if device.type != "cuda":
        return None
    try:
        from planner.hardware import match_spec

        props = torch.cuda.get_device_properties(device)
        spec = match_spec(props.name, props.total_memory, (props.major, props.minor))
    except Exception:  # noqa: BLE001 - MFU is optional; an unknown GPU just has none
        return None
    # fp32 runs use TF32/fp32 units whose peak the table does not list: no MFU rather than a wrong one.
    tflops = {"bf16": spec.tflops_bf16, "fp16": spec.tflops_fp16}.get(precision)
    return tflops * 1e12 if tflops else None


class ProgressFile(TrainerCallback):
    """Rank 0 writes its phase and last finished step to ``<out>/progress.json`` for the runner's progress line.

    Written in ``on_step_end`` after the :class:`~phi3v_core.training.StepTimer`'s (it comes later in the callback
    list), so never inside a timed step; a small file replaced with ``os.replace``, no fsync (nothing depends on it
    surviving a crash).
    """

    def __init__(self, out_dir: Path, total: int, warmup: int, rank: int) -> None:
        self.path, self.total, self.warmup, self.enabled = out_dir / PROGRESS_FILE, total, warmup, rank == 0

    def write(self, phase: str, step: int = 0) -> None:
        """Replace the file with ``phase`` and ``step``."""
        if not self.enabled:
            return
        tmp = self.path.with_name(f".{PROGRESS_FILE}.tmp")
        tmp.write_text(json.dumps({"phase": phase, "step": step, "total": self.total, "warmup": self.warmup}))
        os.replace(tmp, self.path)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.write("training", state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.write("training", state.global_step)


def run_rank(cfg: BenchConfig, out_dir: Path) -> dict[str, Any]:
    """Train one repeat on this rank and return its measurements."""
    from phi3v_core.training import train
    from phi3v_core.training.workload import build_workload

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = local_device(cuda)  # by LOCAL_RANK, never RANK: rank 9 of a 2×8 job is GPU 1 of its node
    if cuda:
        torch.cuda.set_device(device)
    layout = plan_steps(cfg, cuda)
    total_steps = int(layout["total"])
    progress = ProgressFile(out_dir, total_steps, cfg.warmup, rank)
    progress.write("building")
    # The global batch × every planned step: the Trainer's sampler shards this over the ranks, so one epoch is
    # exactly ``total_steps`` full optimizer steps (no partial gradient-accumulation step inside the timed window).
    workload = build_workload(cfg, processor_for(cfg), workload_samples(cfg, total_steps))

    # Before the steps, on rank 0: encoding fresh examples on one thread, as one DataLoader worker does.
    processor_rate = measure_processor_rate(workload.dataset.encode, Phi3VDataCollator(pad_token_id=PAD_TOKEN_ID)) if rank == 0 else None
    window = TimedWindow.for_layout(layout)
    timer, probes = window.timer, window.probes
    changes = ChangedWeights()  # after the timer: its sampling is not inside any timed step
    payload: dict[str, Any] = {"rank": rank, "world_size": world, "device": str(device), "status": "ok"}
    # Inside the runner's folder: a worker killed on timeout leaves nothing behind once the runner removes it.
    with tempfile.TemporaryDirectory(prefix="train-", dir=out_dir) as scratch:
        train_cfg = to_train_config(cfg, scratch, total_steps)
        try:
            # The window (sync, peak reset, first NVML sample) opens before the timer's clock starts.
            result = train(train_cfg, workload.dataset, callbacks=[*window.callbacks, changes, progress])
        except Exception as exc:  # noqa: BLE001 - recorded as an error/oom row by the runner
            payload.update(
                status=_failure_status(exc),
                message=f"{type(exc).__name__}: {exc}".splitlines()[0],
                failed_at_step=len(timer.records),
                traceback=traceback.format_exc(),
            )
            return payload

    records = {r.step: r for r in timer.records}
    timed = window.timed_records()
    flops, flops_cached = _step_flops(cfg, train_cfg, workload.dataset, probes, rank, total_steps)
    timed_skipped = [i for i, r in enumerate(timed, 1) if r.skipped]  # fp16 loss-scaler skips; their times count
    payload.update(
        step_times_s=[r.seconds for r in timed],
        data_wait_s=[r.data_wait_seconds for r in timed],
        processor_samples_per_s=processor_rate,
        warmup_times_s=[records[s].seconds for s in range(1, int(layout["first_timed"])) if s in records],
        compile_s=compile_seconds(cfg, records, [r.seconds for r in timed]),
        final_loss=next((r.loss for r in reversed(timed) if r.loss is not None), None),
        **_step_shape(timed, workload.image_tokens_per_sample),
        flops_per_step=flops.model_flops if flops else None,
        hardware_flops_per_step=flops.hardware_flops if flops else None,
        attention_flops_per_step=flops.attention_flops if flops else None,
        flop_trace_attn=flops.traced_attn if flops else None,
        flops_source=flops.source if flops else None,
        flops_cached=flops_cached,
        skipped_steps=sum(1 for r in timer.records if r.skipped),
        skipped_timed_steps=timed_skipped,
        window_before_clock=window.window_before_clock,
        peak_flops_per_gpu=peak_flops(device, cfg.precision),
        total_params=result.report.total_parameters,
        trainable_params=result.report.trainable_parameters,
        memory=_memory(rank, device, probes),
        notes=probes.notes,
        events=probes.events,
        learning_rate=train_cfg.learning_rate,
        weight_change=changes.result.to_dict() if changes.result else None,
    )
    return payload


def _step_shape(timed: list[Any], image_tokens_per_sample: int) -> dict[str, Any]:
    """What the timed steps held: samples, images and tokens per step (padding apart)."""
    if not timed:
        return {"step_samples": [], "samples_per_step": None, "images_per_step": None, "tokens_per_step": None,
                "computed_tokens_per_step": None, "real_tokens_per_step": None, "image_tokens_per_step": None}
    return {
        "step_samples": [r.samples for r in timed],
        "samples_per_step": timed[0].samples,
        "images_per_step": timed[0].images,
        "tokens_per_step": timed[0].tokens,
        # Mean over the timed steps: with mixed lengths each step's padding differs.
        "computed_tokens_per_step": sum(r.computed_tokens for r in timed) / len(timed),
        "real_tokens_per_step": sum(r.tokens for r in timed) / len(timed),
        "image_tokens_per_step": timed[0].samples * image_tokens_per_sample,
    }


def _memory(rank: int, device: Any, probes: Any) -> dict[str, Any]:
    """This rank's peak memory readings and its energy counter."""
    return {
        "rank": rank,
        "device": str(device),
        "gpu_allocated_bytes": probes.gpu_allocated_bytes,
        "gpu_reserved_bytes": probes.gpu_reserved_bytes,
        "nvml_process_bytes": probes.nvml_peak_bytes,
        "nvml_source": probes.nvml_source,
        "cpu_rss_bytes": probes.cpu_rss_bytes,
        "cpu_tensor_peak_bytes": probes.tensor_peak_bytes,
        "energy_j": probes.energy_j,
    }


def compile_seconds(cfg: BenchConfig, records: dict[int, Any], timed_s: list[float]) -> float | None:
    """With ``compile``: the first step's time beyond a timed step's (median), i.e. what compiling cost.

    The first step traces and compiles the forward and backward graphs; later recompiles (a new shape) would land in
    the warmup or timed steps they happen in. ``None`` without ``compile`` or without a first step and timed steps.
    """
    if not cfg.compile or 1 not in records or not timed_s:
        return None
    return max(0.0, records[1].seconds - statistics.median(timed_s))


def _failure_status(exc: BaseException) -> str:
    """``oom`` (GPU), ``host_oom`` or ``error`` for an exception raised by training.

    A GPU OOM comes as torch.OutOfMemoryError or as a RuntimeError from the driver, NCCL, cuBLAS or cuDNN; a host
    OOM as MemoryError or torch's CPU allocator failing (:func:`bench.status.oom_status` knows every spelling).
    """
    if isinstance(exc, torch.OutOfMemoryError):
        return OOM
    if isinstance(exc, MemoryError):
        return HOST_OOM
    return oom_status(f"{type(exc).__name__}: {exc}") or "error"


def _step_flops(
    cfg: BenchConfig, train_cfg: Any, dataset: Any, probes: InstrumentedSteps, rank: int, step: int
) -> tuple[Any, bool]:
    """FLOPs of one step, counted on rank 0 only (every rank runs the same micro-batch shapes): analytically, or
    with ``--flops trace`` traced through the runner's :class:`~bench.flop_count.FlopCache`, so a configuration is
    traced once, not once per repeat and rank.

    Instrumented work after the window: a failure here is a note, never a failed cell.
    """
    if rank != 0:
        return None, False
    cache_dir = os.environ.get(FLOP_CACHE_ENV)
    try:
        probes.event("flop_trace_start", step)
        micro_batches = step_micro_batches(train_cfg, dataset, cfg.micro_batch, cfg.grad_accum)
        cache = FlopCache(Path(cache_dir)) if cache_dir else None
        flops, cached = count_step_flops(train_cfg, micro_batches, cfg.flops, cache)
        probes.event("flop_trace_end", step)
        return flops, cached
    except Exception as exc:  # noqa: BLE001 - MFU is optional; the measured numbers stand without it
        probes.notes.append(f"FLOP count ({cfg.flops}) failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); no MFU")
        return None, False


def main(argv: list[str] | None = None) -> int:
    """Entry point of one rank; always writes ``rank<R>.json`` (atomically) before exiting."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="BenchConfig JSON file")
    parser.add_argument("--out", required=True, help="folder for rank<R>.json")
    args = parser.parse_args(argv)
    cfg = BenchConfig.from_dict(json.loads(Path(args.config).read_text()))
    quiet_known_notices()
    out_dir = Path(args.out)
    rank = int(os.environ.get("RANK", "0"))
    try:
        payload = run_rank(cfg, out_dir)
    except Exception as exc:  # noqa: BLE001 - setup failures are rows too
        payload = {"rank": rank, "status": _failure_status(exc), "message": f"{type(exc).__name__}: {exc}".splitlines()[0],
                   "traceback": traceback.format_exc()}
    _write_atomic(out_dir / f"rank{rank}.json", payload)
    if payload.get("status") != "ok":
        # Exit instead of joining the gather: torchrun then stops the job's other workers, and the runner reads
        # this rank's file (on a cluster, the failing node's runner reports it).
        return 3
    gathered = gather_payloads(payload)
    if gathered is not None and rank == 0:
        _write_atomic(out_dir / "gathered.json", gathered)  # the only complete copy on a multi-node run
    return 0


def _write_atomic(target: Path, payload: Any) -> None:
    # Not atomic_write_json: a diverged repeat's NaN loss must still reach the runner (json.loads reads NaN back).
    atomic_write_text(target, json.dumps(payload, indent=1))


def gather_payloads(payload: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every rank's payload, collected on global rank 0 over the training process group (``None`` elsewhere).

    On a cluster each node's runner sees only its own node's files; rank 0 (on node 0) gets them all this way. Only
    ranks that succeeded call it; when one failed, torchrun stops the others (or, across nodes, the collective or
    the runner's timeout does).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    gathered: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else []
    dist.gather_object(payload, gathered if dist.get_rank() == 0 else None, dst=0)
    return gathered if dist.get_rank() == 0 else None


if __name__ == "__main__":
    raise SystemExit(main())
