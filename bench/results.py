"""Benchmark results: the self-describing JSON schema of one measurement.

One file per configuration lives at ``<out>/<release>/<hardware>/<cell_id>.json`` and holds

* ``config``: the :class:`~bench.config.BenchConfig`;
* ``environment``: package versions, git sha, GPUs (name, compute capability, memory), driver, CPU;
* ``metrics``: the raw measurements, per repeat: post-warmup step times, warmup step times (kept for inspection,
  excluded from every statistic) and the peak memory of every rank, plus the workload per optimizer step
  (images, tokens, model FLOPs) that turns step times into img/s, tokens/s and MFU;
* ``status``: ``ok``, ``oom`` or ``error`` (with ``message`` and ``failed_at_step``): a failure is a result, not a gap;
* ``summary``: derived numbers written for humans and for tools that do not use this module. It is recomputed from
  ``metrics`` on load, so it can never disagree with the raw data.

Semantics that differ from optimum-benchmark on purpose: throughput is **global**
(all ranks) and per GPU, never an average of per-rank figures; memory is the **maximum over ranks** (each rank is one
GPU), never a sum. Bytes are stored as integers; units are applied only for display.

Where a result was measured is :mod:`phi3v_core.environment`; reading and writing result files is :mod:`bench.store`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

from bench.config import BenchConfig
from phi3v_core.environment import (
    TRACKED_PACKAGES,
    GpuInfo,
    RunEnvironment,
    capture_environment,
    cpu_hardware_name,
    utc_now,
)
from phi3v_core.errors import DataError
from phi3v_core.io import json_safe

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "STATUSES",
    "TRACKED_PACKAGES",
    "MEMORY_FIELDS",
    "BenchResult",
    "RunEnvironment",
    "GpuInfo",
    "Metrics",
    "RankMemory",
    "RepeatSample",
    "Summary",
    "capture_environment",
    "json_safe",
    "cpu_hardware_name",
    "utc_now",
]

SCHEMA = "phi3v-bench/result"
SCHEMA_VERSION = 1
Status = Literal["ok", "oom", "host_oom", "killed", "error", "timeout"]
STATUSES: tuple[str, ...] = ("ok", "oom", "host_oom", "killed", "error", "timeout")

MEMORY_FIELDS: tuple[str, ...] = (
    "gpu_allocated_bytes",
    "gpu_reserved_bytes",
    "nvml_process_bytes",
    "cpu_rss_bytes",
    "cpu_tensor_peak_bytes",
)


# ---------------------------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RankMemory:
    """Peak memory (bytes) and energy of one rank over the timed steps of one repeat (``None`` = not measured).

    Attributes:
        rank: Global rank.
        device: The device this rank used, e.g. ``"cuda:3"`` (picked by LOCAL_RANK, never by RANK) or ``"cpu"``.
        gpu_allocated_bytes: ``torch.cuda.max_memory_allocated`` (live tensors; nearly deterministic).
        gpu_reserved_bytes: ``torch.cuda.max_memory_reserved`` (allocator segments, includes fragmentation).
        nvml_process_bytes: Peak NVML ``usedGpuMemory`` of the process (adds CUDA context, NCCL, cuBLAS workspaces).
        cpu_rss_bytes: Peak resident set size of the process.
        cpu_tensor_peak_bytes: Peak bytes of live CPU tensors (CPU runs).
        nvml_source: What ``nvml_process_bytes`` is: ``"process"``, or ``"device_used"`` (NVML listed no process
            with the worker's PID, e.g. in a container: the device's used memory, other processes included);
            ``None`` in older results and without a reading.
        energy_j: Joules this rank's GPU drew over the timed window (NVML's total-energy counter at the window's
            start and end); ``None`` off NVIDIA GPUs, where the counter is missing, and in older results.
    """

    rank: int
    device: str
    gpu_allocated_bytes: int | None = None
    gpu_reserved_bytes: int | None = None
    nvml_process_bytes: int | None = None
    cpu_rss_bytes: int | None = None
    cpu_tensor_peak_bytes: int | None = None
    nvml_source: str | None = None
    energy_j: float | None = None


@dataclass
class RepeatSample:
    """Everything measured in one fresh process.

    Attributes:
        step_times_s: Wall time of each timed optimizer step, in order (the warmup is not in here).
        warmup_times_s: Wall time of each warmup step; stored for inspection, excluded from all statistics.
        memory: One entry per rank.
        final_loss: Loss of the last step (a sanity check that training did something); ``None`` when unknown.
        step_samples: Samples each timed step consumed over all ranks (the global batch of a full optimizer step).
        wall_s: Seconds from launching the repeat's processes to their exit (start-up, model build, every step,
            FLOP count); ``None`` in older results.
        skipped_steps: Steps (warm-up included) whose update the fp16 loss scaler skipped; ``None`` in older results.
        skipped_timed_steps: 1-based positions in the timed window of skipped steps (their times are kept: the
            step ran forward and backward, only the update was skipped).
        weight_change: Rank 0's :class:`bench.updates.WeightChange` as a dict: the share of trained weights whose
            stored value the whole run (warm-up included) changed; ``None`` in older results.
        learning_rate: Peak learning rate the repeat trained with; ``None`` in older results.
        data_wait_s: Seconds each timed step waited for its batch from the data loader, in order (slowest rank;
            not part of ``step_times_s``: the device idles meanwhile); empty in older results.
        compile_s: With ``compile``: seconds the first (compiling) warmup step took beyond a timed step's median;
            not in any step-time statistic. ``None`` without ``compile`` and in older results.
    """

    step_times_s: list[float] = field(default_factory=list)
    warmup_times_s: list[float] = field(default_factory=list)
    memory: list[RankMemory] = field(default_factory=list)
    final_loss: float | None = None
    step_samples: list[int] = field(default_factory=list)
    wall_s: float | None = None
    skipped_steps: int | None = None
    skipped_timed_steps: list[int] = field(default_factory=list)
    weight_change: dict[str, Any] | None = None
    learning_rate: float | None = None
    data_wait_s: list[float] = field(default_factory=list)
    compile_s: float | None = None


@dataclass
class Metrics:
    """Raw measurements plus the per-step workload that converts step times into rates.

    Attributes:
        repeats: One :class:`RepeatSample` per fresh process.
        images_per_step: Images per optimizer step over all ranks (``global_batch * images_per_sample``).
        tokens_per_step: Non-padding tokens per optimizer step over all ranks, image tokens included.
        image_tokens_per_step: The image-token part of ``tokens_per_step``.
        model_flops_per_step: Model FLOPs per optimizer step over all ranks (no recompute), for MFU. Counted on
            fake tensors with attention as matrix products, so it is the same for every attention kernel.
        hardware_flops_per_step: The same plus the forward recompute of gradient checkpointing (for HFU);
            ``None`` in results written before it existed.
        attention_flops_per_step: The decoder's causal attention FLOPs per optimizer step over all ranks
            (:mod:`phi3v_core.mfu`), part of the ``6N`` and ``4N+6Nt`` MFU conventions; ``None`` in older results.
        peak_flops_per_gpu: Dense peak FLOP/s of one GPU at the run's precision, for MFU.
        total_params: Parameters of the model as trained (after the method was applied).
        trainable_params: Parameters that receive gradients.
        wall_s: Seconds the whole run took (every repeat, from the first launch to the result); ``None`` in older
            results.
        processor_samples_per_s: Samples per second the processor encodes and collates on one CPU thread (one
            DataLoader worker), measured on rank 0 before the first repeat's steps; ``None`` in older results.
        computed_tokens_per_step: Tokens the model computed per optimizer step over all ranks, padding included
            (mean over the timed steps); ``None`` in results written before it was counted.
        real_tokens_per_step: The non-padding part of it (mean over the timed steps; with mixed sample lengths
            ``tokens_per_step``, the first timed step's, is one draw of it).
    """

    repeats: list[RepeatSample] = field(default_factory=list)
    images_per_step: int | None = None
    tokens_per_step: int | None = None
    image_tokens_per_step: int | None = None
    model_flops_per_step: float | None = None
    hardware_flops_per_step: float | None = None
    attention_flops_per_step: float | None = None
    peak_flops_per_gpu: float | None = None
    total_params: int | None = None
    trainable_params: int | None = None
    wall_s: float | None = None
    processor_samples_per_s: float | None = None
    computed_tokens_per_step: float | None = None
    real_tokens_per_step: float | None = None

    def step_times(self) -> list[float]:
        """Return the timed step times of all repeats, pooled."""
        return [t for rep in self.repeats for t in rep.step_times_s]

    def step_throughputs(self) -> list[list[float]]:
        """Return global img/s of every timed step, grouped by repeat (the samples ``compare`` tests)."""
        if not self.images_per_step:
            return []
        return [[self.images_per_step / t for t in r.step_times_s] for r in self.repeats if r.step_times_s]

    def repeat_throughputs(self) -> list[float]:
        """Global img/s of each repeat: images per step ÷ the repeat's median step time.

        One value per fresh process: the samples ``compare`` tests, and - their median - every img/s a result
        shows (:data:`bench.stats.STATISTIC`).
        """
        if not self.images_per_step:
            return []
        return [self.images_per_step / statistics.median(r.step_times_s) for r in self.repeats if r.step_times_s]

    def repeat_energy_per_sample(self) -> list[float]:
        """Joules per trained sample of each repeat whose every rank read the energy counter (all GPUs summed)."""
        values = []
        for r in self.repeats:
            energies = [m.energy_j for m in r.memory]
            samples = sum(r.step_samples)
            if r.memory and samples and all(e is not None for e in energies):
                values.append(sum(energies) / samples)  # type: ignore[arg-type]
        return values

    def peak_memory(self, name: str) -> int | None:
        """Return the maximum of memory field ``name`` over all ranks and repeats (``None`` if never measured)."""
        values = [getattr(m, name) for r in self.repeats for m in r.memory if getattr(m, name) is not None]
        return max(values) if values else None


@dataclass(frozen=True)
class Summary:
    """Numbers derived from :class:`Metrics` (never stored as truth; see module docstring).

    ``img_per_s`` is the median over repeats of each repeat's images per step ÷ median step time
    (:data:`bench.stats.STATISTIC`, the number ``compare`` compares), which a single slow step (a GC pause, a
    checkpoint) does not move; ``step_time_median_s`` is the step time behind it, and tokens/s and every MFU use it.
    ``mfu`` divides the counted model FLOPs (no recompute) by the GPUs' dense peak; ``mfu_6n`` and
    ``mfu_frozen_base`` divide the ``6N`` and ``4N+6Nt`` conventions' FLOPs (:mod:`phi3v_core.mfu`, both with
    causal attention), whose per-step counts are stored beside them; ``hardware_mfu`` uses hardware FLOPs
    (recompute included), so it is the larger of the two when gradient checkpointing is on.
    ``energy_j_per_sample`` is the median over repeats of the GPUs' energy over the timed window ÷ the samples it
    trained; ``energy_wh_per_epoch`` is that times ``epoch_samples`` (the profile's training set, as phi3v-plan
    plans it); both ``None`` where the counter is missing (``energy_note`` says so). ``wall_s`` is the whole
    run, ``steps_s`` its warm-up + timed steps, ``skipped_steps`` the fp16 loss-scaler skips (``None`` where the
    result predates them). ``changed_weights_fraction`` is the smallest share of trained weights a repeat's steps
    changed (``None`` where not measured): under 50 % the layout does not apply the updates it computes.
    ``padding_fraction`` is the share of computed tokens that are padding and ``real_tokens_per_s`` the non-padding
    tokens per second (both mean over the timed steps; ``None`` in results written before they were counted).
    """

    img_per_s: float | None
    img_per_s_per_gpu: float | None
    tokens_per_s: float | None
    step_time_median_s: float | None
    step_time_p90_s: float | None
    step_time_stdev_s: float | None
    mfu: float | None
    hardware_mfu: float | None
    timed_steps: int
    repeats: int
    peak_gpu_allocated_bytes: int | None
    peak_gpu_reserved_bytes: int | None
    peak_nvml_process_bytes: int | None
    peak_cpu_rss_bytes: int | None
    peak_cpu_tensor_peak_bytes: int | None
    wall_s: float | None = None
    steps_s: float | None = None
    skipped_steps: int | None = None
    changed_weights_fraction: float | None = None
    mfu_6n: float | None = None
    mfu_frozen_base: float | None = None
    flops_6n_per_step: float | None = None
    flops_frozen_base_per_step: float | None = None
    energy_j_per_sample: float | None = None
    energy_wh_per_epoch: float | None = None
    epoch_samples: int | None = None
    energy_note: str = ""
    padding_fraction: float | None = None
    real_tokens_per_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclass
class BenchResult:
    """One benchmark configuration's outcome; see the module docstring for the layout.

    Attributes:
        config: What was measured.
        environment: Where it was measured.
        status: ``ok``, ``oom`` (out of memory) or ``error`` (crash).
        message: Failure message (empty when ok).
        failed_at_step: Optimizer step (0-based, warmup included) at which an OOM/crash happened, when known.
        metrics: Raw measurements (may be partial for failures).
        started_at: ISO-8601 UTC start time.
        finished_at: ISO-8601 UTC end time.
    """

    config: BenchConfig
    environment: RunEnvironment = field(default_factory=RunEnvironment)
    status: str = "ok"
    message: str = ""
    failed_at_step: int | None = None
    metrics: Metrics = field(default_factory=Metrics)
    started_at: str = ""
    finished_at: str = ""

    @classmethod
    def failure(
        cls,
        config: BenchConfig,
        status: str,
        message: str,
        environment: RunEnvironment | None = None,
        *,
        failed_at_step: int | None = None,
        started_at: str = "",
    ) -> BenchResult:
        """Build an ``oom``/``error`` row (the sweep records it and goes on)."""
        return cls(
            config=config,
            environment=environment or RunEnvironment(),
            status=status,
            message=message,
            failed_at_step=failed_at_step,
            started_at=started_at,
            finished_at=utc_now(),
        )

    @property
    def summary(self) -> Summary:
        """Derived throughput, step-time and memory figures (see :class:`Summary`)."""
        m = self.metrics
        times = m.step_times()
        per_repeat = m.repeat_throughputs()
        img_s = statistics.median(per_repeat) if per_repeat else None
        # The step time behind img/s, so that img/s, tokens/s and MFU describe one step time.
        median = m.images_per_step / img_s if img_s else (statistics.median(times) if times else None)
        p90 = _percentile(times, 90) if times else None
        stdev = statistics.stdev(times) if len(times) >= 2 else None
        world = self.config.world_size
        tok_s = m.tokens_per_step / median if (median and m.tokens_per_step) else None
        changed = [r.weight_change["changed_fraction"] for r in m.repeats if r.weight_change]

        six_n, frozen = _convention_flops(m)

        def utilisation(flops: float | None) -> float | None:
            if median and flops and m.peak_flops_per_gpu:
                return flops / median / (world * m.peak_flops_per_gpu)
            return None

        return Summary(
            img_per_s=img_s,
            img_per_s_per_gpu=img_s / world if img_s is not None else None,
            tokens_per_s=tok_s,
            step_time_median_s=median,
            step_time_p90_s=p90,
            step_time_stdev_s=stdev,
            mfu=utilisation(m.model_flops_per_step),
            hardware_mfu=utilisation(m.hardware_flops_per_step),
            mfu_6n=utilisation(six_n),
            mfu_frozen_base=utilisation(frozen),
            flops_6n_per_step=six_n,
            flops_frozen_base_per_step=frozen,
            **_energy(self),
            timed_steps=len(times),
            repeats=sum(1 for r in m.repeats if r.step_times_s),
            peak_gpu_allocated_bytes=m.peak_memory("gpu_allocated_bytes"),
            peak_gpu_reserved_bytes=m.peak_memory("gpu_reserved_bytes"),
            peak_nvml_process_bytes=m.peak_memory("nvml_process_bytes"),
            peak_cpu_rss_bytes=m.peak_memory("cpu_rss_bytes"),
            peak_cpu_tensor_peak_bytes=m.peak_memory("cpu_tensor_peak_bytes"),
            wall_s=m.wall_s,
            padding_fraction=(
                1 - m.real_tokens_per_step / m.computed_tokens_per_step
                if m.computed_tokens_per_step and m.real_tokens_per_step is not None else None
            ),
            real_tokens_per_s=m.real_tokens_per_step / median if (median and m.real_tokens_per_step) else None,
            # Warm-up + timed steps of every repeat: the part of wall_s that trained.
            steps_s=sum(times) + sum(t for r in m.repeats for t in r.warmup_times_s) if m.repeats else None,
            skipped_steps=(
                sum(r.skipped_steps or 0 for r in m.repeats) if any(r.skipped_steps is not None for r in m.repeats)
                else None  # results written before skips were counted
            ),
            changed_weights_fraction=min(changed) if changed else None,
        )

    # ---- (de)serialization ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-ready dict (``summary`` included for readers without this module)."""
        return json_safe(
            {
                "schema": SCHEMA,
                "schema_version": SCHEMA_VERSION,
                "status": self.status,
                "message": self.message,
                "failed_at_step": self.failed_at_step,
                "started_at": self.started_at,
                "finished_at": self.finished_at,
                "config": self.config.to_dict(),
                "environment": dataclasses.asdict(self.environment),
                "metrics": dataclasses.asdict(self.metrics),
                "summary": self.summary.to_dict(),
            }
        )

    def to_json(self) -> str:
        """Return the result as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> BenchResult:
        """Rebuild a result from :meth:`to_dict` output.

        Args:
            data: The parsed JSON object.
            source: Where it came from, for error messages.

        Raises:
            DataError: Not a phi3v-bench result, a newer schema, or malformed fields.
        """
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise DataError(f"{source}: not a phi3v-bench result (missing \"schema\": \"{SCHEMA}\")")
        version = data.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise DataError(f"{source}: schema_version {version!r} is newer than {SCHEMA_VERSION}; upgrade phi3v-bench")
        try:
            env = dict(data.get("environment") or {})
            env["gpus"] = [GpuInfo(**g) for g in env.get("gpus", [])]
            metrics = dict(data.get("metrics") or {})
            metrics["repeats"] = [
                RepeatSample(**{**r, "memory": [RankMemory(**m) for m in r.get("memory", [])]})
                for r in metrics.get("repeats", [])
            ]
            result = cls(
                config=BenchConfig.from_dict(data["config"]),
                environment=RunEnvironment(**env),
                status=data.get("status", ""),
                message=data.get("message", ""),
                failed_at_step=data.get("failed_at_step"),
                metrics=Metrics(**metrics),
                started_at=data.get("started_at", ""),
                finished_at=data.get("finished_at", ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{source}: malformed result ({type(exc).__name__}: {exc}); re-run the benchmark") from None
        problems = result.problems()
        if problems:
            raise DataError(f"{source}: " + "; ".join(problems))
        return result

    def problems(self) -> list[str]:
        """Return schema-level inconsistencies (empty when the result is well-formed)."""
        problems: list[str] = []
        if self.status not in STATUSES:
            problems.append(f"status {self.status!r} is not one of {', '.join(STATUSES)}")
        if self.status == "ok":
            if not self.metrics.step_times():
                problems.append("status ok but no timed steps")
            if not self.metrics.images_per_step:
                problems.append("status ok but images_per_step is missing")
        elif not self.message:
            problems.append(f"status {self.status} needs a message")
        for i, rep in enumerate(self.metrics.repeats):
            if any((not isinstance(t, int | float)) or t <= 0 for t in rep.step_times_s):
                problems.append(f"repeat {i}: step times must be positive seconds")
            ranks = [m.rank for m in rep.memory]
            if len(set(ranks)) != len(ranks):
                problems.append(f"repeat {i}: duplicate rank in memory entries")
            if len(ranks) > self.config.world_size:
                problems.append(f"repeat {i}: {len(ranks)} memory entries for world size {self.config.world_size}")
        return problems


def _convention_flops(m: Metrics) -> tuple[float | None, float | None]:
    """Per-step FLOPs under the ``6N`` and ``4N+6Nt`` conventions (:mod:`phi3v_core.mfu`), when known."""
    from phi3v_core.mfu import frozen_base_flops, six_n_flops

    if not (m.total_params and m.tokens_per_step and m.attention_flops_per_step is not None):
        return None, None  # older results have no attention count: no convention without it
    attention = int(m.attention_flops_per_step)
    return (
        float(six_n_flops(m.total_params, m.tokens_per_step, attention)),
        float(frozen_base_flops(m.total_params, m.trainable_params or 0, m.tokens_per_step, attention)),
    )


def _energy(result: BenchResult) -> dict[str, Any]:
    """``energy_*`` and ``epoch_samples`` fields of :class:`Summary`."""
    per_sample = result.metrics.repeat_energy_per_sample()
    epoch = epoch_samples(result.config.seq_profile)
    if not per_sample:
        gpu = any(m.device.startswith("cuda") for r in result.metrics.repeats for m in r.memory)
        note = "not available: NVML's total-energy counter was not read" if gpu else "not available: no NVIDIA GPU"
        return {"epoch_samples": epoch, "energy_note": note if result.status == "ok" else ""}
    j = statistics.median(per_sample)
    return {"energy_j_per_sample": j, "energy_wh_per_epoch": j * epoch / 3600 if epoch else None,
            "epoch_samples": epoch}


def epoch_samples(profile: str) -> int | None:
    """Samples in one epoch of the task ``profile`` names: its training set, as phi3v-plan plans it."""
    from planner.request import task_profiles

    task = task_profiles()["tasks"].get(profile)
    return int(task["dataset"]["train_samples"]) if task else None


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without importing numpy."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
