"""Speed model from first principles: the time of one optimizer step, component by component.

Per micro-batch and GPU (FLOPs counted as in the Megatron-LM MFU formula; peaks from ``planner/data/gpus.json``):

* matmuls: the FLOPs of every linear layer and attention product (2 FLOPs per multiply-add, ``2·P·tokens`` per
  forward plus ``4·L·h·s²``; training multiplies by 3, LoRA by 2, frozen parts by 1; checkpointing adds one
  forward) at an architecture-level achievable share of the dense tensor peak;
* memory-bound work at an achievable share of the DRAM bandwidth: norms, residual adds, activation functions, the
  cross-entropy over the vocabulary, eager attention's S×S score matrices (flash/SDPA kernels keep them on chip),
  bitsandbytes' nf4 dequantization (QLoRA) and the AdamW update over the trainable parameters;
* communication: ZeRO-2 reduce-scatter after every micro-batch and all-gather after every step, DDP all-reduce
  once per step; NVLink/PCIe inside a node, the network between nodes; backward hides part of it;
* a fixed per-step overhead; on a CPU, the cost of launching each operator.

The constants are few and each has a source in ``planner/data/calibration.json``; the ones fitted to the recipe's
published table are fitted on named rows and judged on the others (:mod:`planner.calibration`). On a CPU the rates
come from a micro-benchmark instead (:mod:`planner.validate`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from phi3v_core.methods import LORA, get_method
from planner.estimate import SampleShape
from planner.hardware import GpuSpec
from planner.logits import logit_positions
from planner.shapes import ModelShape
from planner.tower_model import checkpoints, trained_params
from planner.train_setup import DTYPE_BYTES, TrainSetup

__all__ = [
    "ARCH_BORROW",
    "FlopBreakdown",
    "Interconnect",
    "Rates",
    "SpeedConstants",
    "SpeedPrediction",
    "communication_seconds",
    "micro_step_times",
    "flops_per_sample",
    "format_duration",
    "offload_seconds",
    "predict_speed",
    "reference_shape",
]


@dataclass(frozen=True)
class FlopBreakdown:
    """Model FLOPs of one training sample (forward + backward, no recompute)."""

    language_model: float
    vision: float
    projector: float
    recompute: float

    @property
    def total(self) -> float:
        """Model FLOPs (what MFU divides)."""
        return self.language_model + self.vision + self.projector

    @property
    def hardware(self) -> float:
        """FLOPs the GPU actually executes, gradient-checkpointing recompute included."""
        return self.total + self.recompute

    def to_dict(self) -> dict[str, float]:
        """Plain dict (with totals)."""
        out = asdict(self)
        out.update(total=self.total, hardware=self.hardware)
        return out


def reference_shape(shape: ModelShape, method: str) -> ModelShape:
    """The shape the reference code runs: all CLIP layers for full/frozen, 23 for LoRA (``patch_clip_for_lora``)."""
    if get_method(method).uses_lora:
        return shape
    return replace(shape, vision_feature_layer=shape.vision_layers)


def flops_per_sample(shape: ModelShape, workload: SampleShape, setup: TrainSetup) -> FlopBreakdown:
    """Model FLOPs of one sample under ``setup`` (method and checkpointing matter, micro-batch does not)."""
    counts = shape.param_counts()
    seq = workload.seq_len
    head_tokens = logit_positions(workload, setup.logits)  # lm_head runs where the loss needs logits
    head_fwd = 2 * counts.lm_head * head_tokens
    lm_fwd = 2 * counts.lm_layer_linear * seq + 4 * shape.num_layers * shape.hidden_size * seq * seq + head_fwd
    patches = shape.patches_per_crop
    v_tokens = workload.vision_crops * patches
    conv = shape.vision_hidden * 3 * shape.patch_size**2
    clip_linear = shape.vision_used_layers * (
        4 * shape.vision_hidden**2 + 2 * shape.vision_hidden * shape.vision_intermediate
    )
    vision_fwd = 2 * clip_linear * v_tokens + 2 * conv * workload.vision_crops * (patches - 1)
    vision_fwd += 4 * shape.vision_used_layers * shape.vision_hidden * patches * patches * workload.vision_crops
    proj_fwd = 2 * (counts.projector_0 + counts.projector_2_weight) * workload.image_tokens

    spec = setup.spec
    lora_vision = spec.uses_lora and setup.lora_vision
    lm_mult = 3 if spec.trains_base and not setup.freeze_llm else 2  # frozen: input gradients only
    vision_mult = 3 if spec.trains_vision else (2 if lora_vision else 1)
    lm_adapter = vision_adapter = head_adapter = adapter_fixed = 0.0
    if spec.adapter:
        # the adapters' own matmuls (A then B per target): forward, input and weight gradients → 3×
        lm_lora = shape.lora_params(setup.lora_rank, setup.lora_lm_head, vision=False)
        head_lora = shape.lora_params(setup.lora_rank, True, vision=False) - shape.lora_params(
            setup.lora_rank, False, vision=False
        )
        head_adapter = 2 * head_lora * head_tokens if setup.lora_lm_head else 0.0
        lm_adapter = 2 * (lm_lora - (head_lora if setup.lora_lm_head else 0)) * seq + head_adapter
        if lora_vision:
            vision_lora = shape.lora_params(setup.lora_rank, setup.lora_lm_head, vision=True) - lm_lora
            vision_adapter = 2 * vision_lora * v_tokens
        # token-independent adapter work (e.g. a weight norm), once per forward of the micro-batch: no backward
        adapter_fixed = sum(
            n * spec.adapter.flops_per_forward(setup.lora_rank, fan_in, fan_out)
            for n, fan_in, fan_out in shape.adapted_linears(setup.lora_lm_head, lora_vision)
        ) / setup.micro_batch
    recompute = 0.0
    if checkpoints(setup, "llm"):
        # checkpointing recomputes the decoder (and trained CLIP) layers' forward, never lm_head
        recompute += lm_fwd + lm_adapter + adapter_fixed - head_fwd - head_adapter
    if checkpoints(setup, "vision"):
        if vision_mult > 1:
            recompute += vision_fwd + vision_adapter
    return FlopBreakdown(
        language_model=lm_mult * lm_fwd + (2 if setup.freeze_llm else 3) * lm_adapter + adapter_fixed,
        vision=vision_mult * vision_fwd + 3 * vision_adapter,
        projector=vision_mult * proj_fwd,
        recompute=recompute,
    )


@dataclass(frozen=True)
class Interconnect:
    """How the ranks talk.

    Attributes:
        gpus_per_node: Ranks per node.
        nodes: Nodes.
        intra_node_gbs: Per-GPU bandwidth inside a node, both directions (NVLink or PCIe), GB/s.
        nvlink: Whether the intra-node links are NVLink (the calibration rows ran over NVLink).
        inter_node_gbs: Network bandwidth per node (GB/s), e.g. 8×200 Gb/s HDR = 200.
        source: Where the numbers come from.
    """

    gpus_per_node: int
    nodes: int
    intra_node_gbs: float
    nvlink: bool
    inter_node_gbs: float
    source: str = ""


@dataclass(frozen=True)
class Rates:
    """Achievable rates of one device (what the speed model divides by).

    Attributes:
        matmul_flops: Achievable dense matmul FLOP/s (peak × architecture-level efficiency, or measured).
        bandwidth: Achievable memory bandwidth, bytes/s (peak × efficiency, or measured).
        op_overhead_s: Fixed cost of one kernel/operator launch that the device cannot hide.
        softmax_elements_per_s: Elements per second through a softmax forward + backward (exp-bound work: softmax,
            SiLU, GELU, cross-entropy); None where such work is bandwidth-bound (GPUs: counted as bytes).
        source: How the numbers were obtained.
    """

    matmul_flops: float
    bandwidth: float
    op_overhead_s: float = 0.0
    softmax_elements_per_s: float | None = None
    source: str = ""


@dataclass(frozen=True)
class SpeedConstants:
    """The few constants of the speed model (``planner/data/calibration.json`` → ``speed``; some fitted).

    Attributes:
        matmul_efficiency: Achievable share of the dense tensor peak per architecture.
        matmul_source: Where each efficiency comes from (fitted row, or the architecture it borrows).
        bandwidth_efficiency: Achievable share of the DRAM bandwidth for streaming kernels.
        eager_bytes_per_score: Bytes moved per attention-score element per forward-equivalent pass in eager attention.
        elementwise_bytes_per_token: Per LM/CLIP layer and forward pass, bytes per token per hidden unit moved by
            norms, residual adds, rotary, activation functions, casts (multiplies ``h + intermediate/2``).
        nf4_bytes_per_weight: Bytes moved per 4-bit weight per dequantization (read 0.5625, write 2).
        ops_per_layer: Operators launched per layer per forward pass (launch overhead).
        intra_node_efficiency: Achieved share of the intra-node link for collectives.
        network_efficiency: Achieved share of the inter-node network for collectives.
        comm_overlap: Share of the backward time that can hide intra-node gradient reduction.
        step_overhead_s: Fixed time per optimizer step (optimizer launch, loss scaling, logging, data hand-off).
        sources: Provenance of every constant.
    """

    matmul_efficiency: dict[str, float]
    matmul_source: dict[str, str]
    bandwidth_efficiency: float
    eager_bytes_per_score: float
    elementwise_bytes_per_token: float
    nf4_bytes_per_weight: float
    ops_per_layer: float
    intra_node_efficiency: float
    network_efficiency: float
    comm_overlap: float
    step_overhead_s: float
    sources: dict[str, str]

    def efficiency_for(self, architecture: str) -> tuple[float, str]:
        """Matmul efficiency of an architecture; unknown ones borrow the closest fitted one (stated)."""
        if architecture in self.matmul_efficiency:
            return self.matmul_efficiency[architecture], self.matmul_source.get(architecture, "")
        borrow = ARCH_BORROW.get(architecture, "Ampere")
        value = self.matmul_efficiency[borrow]
        return value, f"architecture-level estimate: {architecture} assumed as efficient as {borrow} ({value:.0%})"

    def rates(self, gpu: GpuSpec, precision: str) -> Rates | None:
        """Achievable rates of ``gpu`` at ``precision``; None when its peak is unknown."""
        peak = gpu.peak_tflops(precision)
        if not peak or not gpu.bandwidth_gbs:
            return None
        efficiency, source = self.efficiency_for(gpu.architecture)
        return Rates(
            matmul_flops=efficiency * peak * 1e12,
            bandwidth=self.bandwidth_efficiency * gpu.bandwidth_gbs * 1e9,
            op_overhead_s=0.0,  # GPU launches are asynchronous: hidden behind kernels of this size
            source=f"{peak:g} TF × {efficiency:.0%} ({source}); {gpu.bandwidth_gbs:g} GB/s × "
            f"{self.bandwidth_efficiency:.0%}",
        )


#: Architectures without a fitted efficiency borrow one (stated in the plan).
ARCH_BORROW = {"Turing": "Volta", "Pascal": "Volta", "Ada": "Ampere", "Hopper": "Ampere", "Blackwell": "Ampere"}


@dataclass(frozen=True)
class SpeedPrediction:
    """Predicted throughput for one plan (a prediction, not a measurement).

    Attributes:
        samples_per_s: Global samples (images for single-image tasks) per second.
        per_gpu: Samples per second per GPU.
        mfu: Model-FLOPs utilisation this prediction implies (model FLOPs / peak / time), in the ``counted``
            convention of :mod:`phi3v_core.mfu` (``--json`` says so as ``mfu_convention``).
        basis: How the rates were obtained (fitted rows, borrowed architectures, measured CPU rates).
        flops: FLOPs per sample.
        times: Seconds per optimizer step by component (matmul, attention, elementwise, ...).
        compute_s: Compute time of one micro-step.
        comm_s: Exposed communication per micro-step (amortised all-gather included).
        step_s: Time of one optimizer step.
        epoch_s: Time of one epoch for ``dataset_size`` samples (None without a dataset size).
    """

    samples_per_s: float
    per_gpu: float
    mfu: float | None
    basis: str
    flops: FlopBreakdown
    times: dict[str, float]
    compute_s: float
    comm_s: float
    step_s: float
    epoch_s: float | None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``--json``)."""
        out = asdict(self)
        out["flops"] = self.flops.to_dict()
        out["mfu_convention"] = "counted"  # phi3v_core.mfu: the FLOPs MFU divides, named as every tool names them
        return out


def _trains(setup: TrainSetup) -> tuple[bool, bool]:
    """(LM needs backward, vision needs backward)."""
    lora_vision = setup.spec.uses_lora and setup.lora_vision
    return True, setup.spec.trains_vision or lora_vision


def _passes(trains: bool, checkpointing: bool) -> float:
    """Forward-equivalent passes over a part: forward, recompute, backward (≈ 2 forwards)."""
    if not trains:
        return 1.0
    return 1.0 + 2.0 + (1.0 if checkpointing else 0.0)


def micro_step_times(
    shape: ModelShape, workload: SampleShape, setup: TrainSetup, rates: Rates, constants: SpeedConstants
) -> tuple[dict[str, float], FlopBreakdown]:
    """Seconds of one micro-batch on one device by component (no communication), and the FLOPs per sample."""
    mb = setup.micro_batch
    flops = flops_per_sample(shape, workload, setup)
    lm_trains, vision_trains = _trains(setup)
    lm_passes = _passes(lm_trains, checkpoints(setup, "llm"))
    v_passes = _passes(vision_trains, checkpoints(setup, "vision"))
    seq = workload.seq_len
    v_tokens = workload.vision_crops * shape.patches_per_crop
    times: dict[str, float] = {}
    times["matmul"] = mb * flops.hardware / rates.matmul_flops
    # Eager attention writes and re-reads the S×S score matrix (scores, mask add, fp32 softmax, cast) per head.
    if setup.attn == "eager":
        scores = lm_passes * shape.num_layers * shape.num_heads * seq * seq
        scores += (
            v_passes
            * shape.vision_used_layers
            * shape.vision_heads
            * shape.patches_per_crop**2
            * (workload.vision_crops)
        )
        times["eager attention"] = mb * scores * constants.eager_bytes_per_score / rates.bandwidth
    act = setup.act_bytes
    elementwise = lm_passes * shape.num_layers * seq * (shape.hidden_size + shape.intermediate_size / 2)
    elementwise += (
        v_passes * shape.vision_used_layers * v_tokens * (shape.vision_hidden + shape.vision_intermediate / 2)
    )
    head_tokens = logit_positions(workload, setup.logits)
    logits = head_tokens * shape.vocab_size * 4 * 5  # fp32 log-softmax, its grad and the logits' grad: ~5 passes
    times["elementwise"] = (
        mb * (elementwise * constants.elementwise_bytes_per_token * act / 2 + logits) / (rates.bandwidth)
    )
    if rates.softmax_elements_per_s:
        # exp-bound element-wise work (a CPU computes exp far slower than it streams bytes): cross-entropy over the
        # vocabulary, attention softmax (causal: half the keys), SiLU / quick-GELU, per forward+backward unit
        def unit(trains: bool, tower: str) -> float:
            if not trains:
                return 0.5
            return 1.0 + (0.5 if checkpoints(setup, tower) else 0.0)

        exp_elements = head_tokens * shape.vocab_size
        exp_elements += unit(lm_trains, "llm") * shape.num_layers * seq * (shape.intermediate_size + shape.num_heads * seq / 2)
        exp_elements += (
            unit(vision_trains, "vision")
            * shape.vision_used_layers
            * v_tokens
            * (shape.vision_intermediate + shape.vision_heads * shape.patches_per_crop)
        )
        times["exp-bound element-wise"] = mb * exp_elements / rates.softmax_elements_per_s
    if setup.spec.quantized:
        uses = 3.0 if setup.gradient_checkpointing else 2.0  # forward, recompute, backward (input gradient)
        quantized = shape.param_counts().quantizable()
        times["nf4 dequantize"] = uses * quantized * constants.nf4_bytes_per_weight / rates.bandwidth
    if setup.stored_weight_dtype == "fp32" and setup.precision != "fp32":
        # autocast casts every fp32 weight to 16 bits at each use (read 4 B, write 2 B)
        uses = 3.0 if setup.gradient_checkpointing else 2.0
        times["autocast weight casts"] = uses * shape.param_counts().total * 6 / rates.bandwidth
    if rates.op_overhead_s:
        ops = lm_passes * shape.num_layers + v_passes * shape.vision_used_layers * (1 if workload.vision_crops else 0)
        times["operator launches"] = ops * constants.ops_per_layer * rates.op_overhead_s
    return times, flops


#: Achievable host-memory bandwidth of a GPU server for DeepSpeed's CPU Adam (bytes/s). CPU Adam is a streaming
#: AVX kernel, bound by DRAM bandwidth: a two-socket server with 8 DDR4-3200 channels per socket peaks at
#: 2 × 204.8 GB/s; we assume a quarter of that is achieved by one rank's optimizer (stated in the plan).
HOST_ADAM_BANDWIDTH = 100e9
#: Bytes CPU Adam moves per parameter: fp32 master, m, v read + write (24), fp32 gradient read (4), the updated
#: 16-bit weight written for the copy back to the GPU (2).
HOST_ADAM_BYTES_PER_PARAM = 30
#: Achieved share of a PCIe link's one-way bandwidth for large pinned copies.
PCIE_EFFICIENCY = 0.8


def offload_seconds(shape: ModelShape, setup: TrainSetup, pcie_gbs: float, host_bandwidth: float) -> dict[str, float]:
    """ZeRO-Offload's per-step extra time: CPU Adam over the rank's partition and the PCIe copies.

    Gradients (16-bit) go to the host after every micro-batch; the updated 16-bit weights come back once per step.
    Neither is assumed to overlap with compute (DeepSpeed overlaps part of it: this is the conservative side).

    Args:
        shape: Model dimensions.
        setup: The setup (``offload_optimizer`` true).
        pcie_gbs: The GPU's PCIe bandwidth, both directions (GB/s).
        host_bandwidth: Achievable host memory bandwidth for CPU Adam (bytes/s).
    """
    trainable = trained_params(shape, setup, 0) / setup.world_size
    one_way = pcie_gbs / 2 * 1e9 * PCIE_EFFICIENCY
    return {
        "CPU Adam (host)": trainable * HOST_ADAM_BYTES_PER_PARAM / host_bandwidth,
        "PCIe gradients + weights": (2 * trainable * setup.grad_accum + 2 * trainable) / one_way,
    }


def _optimizer_seconds(shape: ModelShape, setup: TrainSetup, rates: Rates) -> float:
    """AdamW over the local trainable parameters: a streaming pass (fp32 p, m, v read+write, grads read)."""
    lora = shape.lora_params(setup.lora_rank, setup.lora_lm_head, setup.lora_vision, setup.spec.adapter or LORA)
    trainable = trained_params(shape, setup, lora)
    if setup.offload_optimizer:
        return 0.0  # on the host: :func:`offload_seconds`
    if setup.optim == "adamw_8bit":
        # bitsandbytes: weight read + write, gradient read, 8-bit m, v read + write (+ absmax)
        weight = 4 if setup.spec.uses_lora else DTYPE_BYTES[setup.stored_weight_dtype]
        return trainable * (2 * weight + weight + 4) / rates.bandwidth
    if setup.zero == 2 and setup.spec.trains_base:
        # fp32 master/m/v read+write (24), fp32 grad read (4), 16-bit grad → fp32 (2+4), 16-bit weight write (2)
        return trainable / setup.world_size * 36 / rates.bandwidth
    state = 4 if setup.spec.uses_lora else DTYPE_BYTES[setup.stored_weight_dtype]
    return trainable * 8 * state / rates.bandwidth  # p, m, v read+write, grad read, norm for clipping


def communication_seconds(
    shape: ModelShape, setup: TrainSetup, interconnect: Interconnect, constants: SpeedConstants
) -> tuple[float, float]:
    """(per micro-batch, per optimizer step) seconds of collective traffic before overlap.

    ZeRO-2 reduces 16-bit gradients after every micro-batch (reduce-scatter, DeepSpeed #2252) and all-gathers the
    updated 16-bit weights once per step; DDP all-reduces (LoRA: fp32 adapters) once per step (``no_sync``).
    Inside a node the ring runs over NVLink or PCIe; between nodes each node moves its share through its NICs.
    """
    lora = shape.lora_params(setup.lora_rank, setup.lora_lm_head, setup.lora_vision, setup.spec.adapter or LORA)
    trainable = trained_params(shape, setup, lora)
    g, n = interconnect.gpus_per_node, interconnect.nodes
    if g * n == 1:
        return 0.0, 0.0
    intra = interconnect.intra_node_gbs / 2 * 1e9 * constants.intra_node_efficiency  # one direction
    inter = interconnect.inter_node_gbs * 1e9 * constants.network_efficiency

    def ring(bytes_: float, factor: float) -> float:
        out = factor * (g - 1) / g * bytes_ / intra if g > 1 else 0.0
        if n > 1:
            out += factor * (n - 1) / n * bytes_ / inter
        return out

    if setup.zero == 2 and setup.spec.trains_base:
        grad_bytes = DTYPE_BYTES[setup.precision] * trainable
        return ring(grad_bytes, 1.0), ring(DTYPE_BYTES[setup.stored_weight_dtype] * shape.param_counts().total, 1.0)
    return 0.0, ring(4 * trainable, 2.0)


def predict_speed(
    shape: ModelShape,
    workload: SampleShape,
    setup: TrainSetup,
    gpu: GpuSpec | None,
    interconnect: Interconnect,
    constants: SpeedConstants,
    dataset_size: int | None = None,
    rates: Rates | None = None,
) -> SpeedPrediction | None:
    """Time of one optimizer step from first principles; None when the GPU's peak or bandwidth is unknown.

    Args:
        shape: Model dimensions.
        workload: Tokens and crops per sample.
        setup: Method, precision, attention, checkpointing, micro-batch, accumulation, ranks.
        gpu: The GPU (its peak and bandwidth give the rates); None when ``rates`` is given (a CPU).
        interconnect: How ranks talk.
        constants: The speed model's constants.
        dataset_size: Samples per epoch (for ``epoch_s``).
        rates: Measured rates (CPU validation) instead of the GPU's.
    """
    if rates is None:
        if gpu is None:
            return None
        rates = constants.rates(gpu, setup.precision)
        if rates is None:
            return None
    times, flops = micro_step_times(shape, workload, setup, rates, constants)
    compute = sum(times.values())
    per_micro, per_step = communication_seconds(shape, setup, interconnect, constants)
    # Gradient reduction runs in buckets during backward; what backward cannot hide is exposed.
    backward = compute * 0.5
    exposed_micro = max(0.0, per_micro - constants.comm_overlap * backward)
    step_times = {k: v * setup.grad_accum for k, v in times.items()}
    step_times["optimizer"] = _optimizer_seconds(shape, setup, rates)
    if setup.offload_optimizer:
        step_times.update(offload_seconds(shape, setup, (gpu.pcie_gbs if gpu else None) or 32.0, HOST_ADAM_BANDWIDTH))
    step_times["communication"] = exposed_micro * setup.grad_accum + per_step
    step_times["step overhead"] = constants.step_overhead_s
    step = sum(step_times.values())
    world = interconnect.gpus_per_node * interconnect.nodes
    samples = setup.micro_batch * setup.grad_accum
    per_gpu = samples / step
    total = per_gpu * world
    peak = gpu.peak_tflops(setup.precision) if gpu is not None else None
    mfu = per_gpu * flops.total / (peak * 1e12) if peak else None
    return SpeedPrediction(
        samples_per_s=total,
        per_gpu=per_gpu,
        mfu=mfu,
        basis=rates.source,
        flops=flops,
        times=step_times,
        compute_s=compute,
        comm_s=step_times["communication"] / setup.grad_accum,
        step_s=step,
        epoch_s=dataset_size / total if dataset_size else None,
    )


def format_duration(seconds: float | None) -> str:
    """``3h 12m`` style."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{seconds:.0f}s"
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m"
