"""Closed-form peak-memory model of one Phi-3(.5)-vision training step on one GPU (pure functions, no torch).

The model tallies what autograd keeps alive, tensor by tensor, from the way the forward is written
(``phi3v_core.model`` on top of transformers' Phi-3 decoder and CLIP encoder), and evaluates a few moments of the
step where the peak can fall:

* ``loss backward``: all saved activations plus the cross-entropy buffers (3 fp32 logit copies; ``TrainSetup.logits``);
* ``LM backward``: the last decoder layer recomputed (gradient checkpointing) plus its gradient buffers;
* ``vision forward`` / ``vision backward``: one CLIP layer's working set over all crops of the micro-batch;
* ``optimizer step``: all gradients plus AdamW's temporaries.

Model states follow the recipe: full fine-tuning runs DeepSpeed ZeRO-2 (bf16/fp16 weights, ``2P + 18P/N`` with
N data-parallel ranks, plus DeepSpeed's ``overlap_comm`` buckets); LoRA and QLoRA run plain DDP over a frozen
16-bit (or nf4) base with fp32 adapters. What the allocator adds on a GPU (caching/fragmentation, CUDA context, NCCL)
comes from ``planner/data/calibration.json`` (fitted to the recipe's published A100 table by
``planner.calibration.fit_cache_fraction``). The activation terms are checked against ``MemTracker`` measurements of real CPU
training steps in ``tests/planner/test_memtracker.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from phi3v_core.constants import zero2_buffer_bytes
from phi3v_core.errors import ConfigError
from phi3v_core.methods import LORA
from planner.logits import logit_positions, logits_loss_bytes
from planner.memory_types import GIB, MemoryEstimate, MemoryItem, Overheads
from planner.shapes import ModelShape, hd_crop_grid, image_token_count
from planner.tower_model import checkpoints, trained_params
from planner.train_setup import DTYPE_BYTES, TrainSetup

__all__ = [
    "SampleShape",
    "activation_terms",
    "dequant_transient",
    "estimate_memory",
    "host_memory_bytes",
    "model_state_bytes",
]

#: bitsandbytes nf4: two weights per byte plus one fp32 absmax per 64-weight block (no double quantization, as in
#: the recipe's BitsAndBytesConfig and ``phi3v_core.methods.quantize_linear_layers``).
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64
#: bitsandbytes 8-bit AdamW: m and v one byte each plus one fp32 absmax per 256-element block for each
#: (blockwise dynamic quantisation, Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization").
ADAM_8BIT_BYTES_PER_PARAM = 2 * (1 + 4 / 256)


@dataclass(frozen=True)
class SampleShape:
    """What one sample puts through the model.

    Attributes:
        seq_len: LM tokens per sample (image placeholders + text), after padding to the batch's longest.
        vision_crops: 336² crops per sample that go through CLIP.
        image_tokens: Placeholder tokens per sample (rows the projector produces).
        images: Images per sample.
        pixel_slots: Crop slots in ``pixel_values`` per sample (``num_crops + 1`` per image, padding included);
            None means ``vision_crops``.
        crop_copy: The model gathers the real crops into a new tensor (ours, ``skip_padded_crops``); the
            reference reshapes all slots instead.
        crop_grid: (rows, cols) of each image's HD grid (needed to build a real batch for a trace).
        num_crops: The processor's ``num_crops`` (``pixel_values`` holds ``num_crops + 1`` slots per image).
        supervised_tokens: Labelled positions per sample (the answer); None means unknown (logits everywhere).
    """

    seq_len: int
    vision_crops: int
    image_tokens: int
    images: int = 1
    pixel_slots: int | None = None
    crop_copy: bool = True
    crop_grid: tuple[int, int] | None = None
    num_crops: int | None = None
    supervised_tokens: int | None = None

    @property
    def slots(self) -> int:
        """Crop slots of the ``pixel_values`` input per sample."""
        return self.pixel_slots if self.pixel_slots is not None else self.vision_crops

    @classmethod
    def from_images(
        cls,
        shape: ModelShape,
        num_crops: int,
        image_size: tuple[int, int] | None = None,
        images: int = 1,
        text_tokens: int = 64,
        all_crops: bool = False,
        answer_tokens: int | None = None,
    ) -> SampleShape:
        """Tokens and crops for ``images`` images of ``image_size`` (W, H) processed with ``num_crops``.

        Args:
            shape: The model (tokens per crop).
            num_crops: The processor's ``num_crops`` (HD crop budget).
            image_size: (width, height) in pixels; None means square, the largest grid ``num_crops`` allows.
            images: Images per sample.
            text_tokens: Text tokens per sample (prompt, answer and special tokens).
            all_crops: Run all ``num_crops + 1`` slots through CLIP, as the reference code does, instead of only
                the real crops (our model's ``skip_padded_crops``).
            answer_tokens: Supervised tokens per sample (part of ``text_tokens``); None = unknown.
        """
        if num_crops < 1:
            raise ConfigError(f"num_crops={num_crops} must be at least 1")
        width, height = image_size or (1, 1)
        rows, cols = hd_crop_grid(width, height, num_crops)
        per_image = image_token_count(rows, cols, shape.num_img_tokens)
        crops = (num_crops + 1) if all_crops else (rows * cols + 1)
        return cls(
            seq_len=images * per_image + text_tokens,
            vision_crops=images * crops,
            image_tokens=images * per_image,
            images=images,
            pixel_slots=images * (num_crops + 1),
            crop_copy=not all_crops,
            crop_grid=(rows, cols),
            num_crops=num_crops,
            supervised_tokens=answer_tokens,
        )


# -- model states ----------------------------------------------------------------------------------------------------
def model_state_bytes(shape: ModelShape, setup: TrainSetup) -> dict[str, float]:
    """Weights, gradients, optimizer states and DeepSpeed buckets on one rank (bytes).

    Full fine-tuning under ZeRO-2 follows DeepSpeed's own estimator, ``2P + 18P/N``
    (``estimate_zero2_model_states_mem_needs`` in deepspeed/runtime/zero/stage_1_and_2.py): 16-bit weights on every rank; 16-bit grads, fp32 grads, fp32 master weights and Adam m, v sharded over N.
    Without ZeRO, torch AdamW keeps its states in the parameters' dtype. LoRA adapters are fp32 (PEFT's
    ``autocast_adapter_dtype``) whatever the base dtype.
    """
    counts = shape.param_counts()
    total = counts.total
    adapter = setup.spec.adapter
    lora = shape.lora_params(setup.lora_rank, setup.lora_lm_head, setup.lora_vision, adapter) if adapter else 0
    trainable = trained_params(shape, setup, lora)
    wbytes = DTYPE_BYTES[setup.stored_weight_dtype]
    out: dict[str, float] = {}
    if setup.spec.quantized:
        quantized = counts.quantizable()
        out["weights"] = quantized * NF4_BYTES_PER_PARAM + (total - quantized) * wbytes
    else:
        out["weights"] = total * wbytes
    if setup.spec.uses_lora:
        out["lora_weights"] = 4 * lora
        out["gradients"] = 4 * trainable
        out["optimizer_states"] = (ADAM_8BIT_BYTES_PER_PARAM if setup.optim == "adamw_8bit" else 8) * trainable
        if setup.world_size > 1:
            out["ddp_buckets"] = 4 * trainable  # DDP's flat gradient buckets (gradient_as_bucket_view=False)
        return out
    if setup.offload_optimizer:
        # ZeRO-Offload: each 16-bit gradient goes into the reduce bucket as backward produces it and the bucket is
        # copied to the host's fp32 gradients (DeepSpeed's stage-2 CPU offload path), so the GPU holds the buckets
        # plus the largest gradient not yet bucketed (lm_head); fp32 master, gradients and Adam m, v are host memory
        # (:func:`host_memory_bytes`)
        out["gradients"] = 2 * counts.lm_head
        out["deepspeed_buckets"] = zero2_buffer_bytes(setup.reduce_bucket, setup.allgather_bucket, setup.overlap_comm)
        return out
    if setup.zero == 2:
        n = setup.world_size
        out["gradients"] = (2 + 4) * trainable / n
        out["optimizer_states"] = (4 + 8) * trainable / n
        out["deepspeed_buckets"] = zero2_buffer_bytes(setup.reduce_bucket, setup.allgather_bucket, setup.overlap_comm)
        return out
    gbytes = wbytes
    out["gradients"] = gbytes * trainable
    if setup.optim == "adamw_8bit":
        # the HF Trainer keeps the token embedding's states in 32 bits (bitsandbytes' module override, for stability)
        out["optimizer_states"] = ADAM_8BIT_BYTES_PER_PARAM * (trainable - counts.embed) + 8 * counts.embed
    else:
        out["optimizer_states"] = 2 * wbytes * trainable
    if setup.world_size > 1:
        out["ddp_buckets"] = gbytes * trainable
    return out


def host_memory_bytes(shape: ModelShape, setup: TrainSetup) -> float:
    """Host (CPU) memory one rank's ZeRO-Offload optimizer holds: fp32 master weights, fp32 gradients, Adam m and v.

    16 bytes per trained parameter of the rank's partition, pinned (ZeRO-Offload, Ren et al. 2021); 0 without
    offload. The model loading and the data loader come on top.
    """
    if not setup.offload_optimizer:
        return 0.0
    trainable = shape.param_counts().trainable(setup.spec, 0)
    return (4 + 4 + 8) * trainable / setup.world_size


# -- activations -----------------------------------------------------------------------------------------------------
def _lm_layer_saved(shape: ModelShape, setup: TrainSetup, tokens: int, seq: int, checkpoint_input: bool) -> float:
    """Bytes one decoder layer keeps for backward (its working set when recomputed)."""
    a = setup.act_bytes
    h, inter = shape.hidden_size, shape.intermediate_size
    adapter = setup.spec.adapter
    norm_trainable = setup.spec.trains_base
    # RMSNorm: fp32 copy of its input (the input itself in fp32), the normalized 16-bit tensor when the weight
    # trains, and its output (the next linear's input).
    norm = 4 * h + (2 if norm_trainable else 1) * a * h
    per_token = 2 * norm
    if checkpoint_input and a == 4:
        per_token -= 4 * h  # in fp32 the first norm's "copy" is the checkpointed layer input itself
    qkv_out = shape.q_out + 2 * shape.kv_out
    # fused qkv output (kept through the value view) + rotated q, k + contiguous attention output (o_proj input)
    per_token += a * (qkv_out + shape.q_out + shape.kv_out + shape.q_out)
    if setup.attn == "eager":
        # fp32 softmax output (+ its 16-bit copy for the value matmul) per head and key
        per_token += shape.num_heads * seq * (4 + (a if a != 4 else 0))
    else:
        per_token += a * shape.q_out + 4 * shape.num_heads  # kernel output in head layout + logsumexp
    per_token += 4 * a * inter  # gate_up output, silu(gate), silu(gate)·up
    if adapter:
        # A·x of each adapted projection (plus what the adapter variant keeps per output row)
        outs = (qkv_out, h, 2 * inter, h)
        per_token += a * sum(adapter.saved_per_token(setup.lora_rank, out) for out in outs)
        if setup.spec.quantized:
            # bitsandbytes' 4-bit matmul keeps its input besides LoRA's own (cast) copy
            per_token += a * (2 * h + shape.q_out + inter)
    return per_token * tokens


def _lm_layer_backward_extra(shape: ModelShape, setup: TrainSetup, tokens: int, seq: int) -> float:
    """Gradient buffers alive while one decoder layer runs backward (beyond its saved tensors)."""
    a = setup.act_bytes
    h, inter = shape.hidden_size, shape.intermediate_size
    # grad of gate_up output (2I) + grad of its halves (2I) + incoming grad and its fp32 norm path (h, 4h)
    per_token = a * (4 * inter + 2 * h) + 4 * h
    if setup.attn == "eager":
        per_token += shape.num_heads * seq * (4 + a)  # grad of the probabilities and of the scores
    return per_token * tokens


def _clip_layer_saved(shape: ModelShape, setup: TrainSetup, tokens: int, checkpoint_input: bool) -> float:
    """Bytes one CLIP encoder layer keeps for backward."""
    a = setup.act_bytes
    hv, iv = shape.vision_hidden, shape.vision_intermediate
    # LN1 out, q, k, v, contiguous attention output, residual (LN2 input), LN2 out; fc1 out, sigmoid, product
    per_token = a * hv * 7 + 3 * a * iv
    if not checkpoint_input:
        per_token += a * hv  # LN1 input
    if setup.attn == "eager":
        per_token += shape.vision_heads * shape.patches_per_crop * (4 + (a if a != 4 else 0))
    else:
        per_token += a * hv + 4 * shape.vision_heads
    if setup.spec.adapter:
        outs = (hv, hv, hv, hv, iv, hv)  # q, k, v, out_proj, fc1, fc2
        per_token += a * sum(setup.spec.adapter.saved_per_token(setup.lora_rank, out) for out in outs)
        if setup.spec.quantized:
            per_token += a * (hv + hv + iv)
    return per_token * tokens


def _clip_layer_forward_peak(shape: ModelShape, setup: TrainSetup, tokens: int) -> float:
    """Transient peak of one CLIP layer's forward without autograd (frozen vision)."""
    a = setup.act_bytes
    hv, iv = shape.vision_hidden, shape.vision_intermediate
    per_token = a * (3 * hv + 2 * iv)
    if setup.attn == "eager":
        per_token += shape.vision_heads * shape.patches_per_crop * (a + 4 + 4)
    return per_token * tokens


def activation_terms(shape: ModelShape, setup: TrainSetup, workload: SampleShape) -> dict[str, float]:
    """Activation terms of one micro-batch (bytes): saved tensors, one layer's working set, logits/loss, batch.

    Used by :func:`estimate_memory` to assemble the phases, and by :mod:`planner.trace` to adjust traces.
    """
    a = setup.act_bytes
    mb = setup.micro_batch
    seq = workload.seq_len
    tokens = mb * seq
    v_tokens = mb * workload.vision_crops * shape.patches_per_crop
    img_rows = mb * workload.image_tokens
    h, hv = shape.hidden_size, shape.vision_hidden
    gc, gc_vision = checkpoints(setup, "llm"), checkpoints(setup, "vision")
    vision_trains = setup.spec.trains_vision or (setup.spec.uses_lora and setup.lora_vision)

    lm_layer = _lm_layer_saved(shape, setup, tokens, seq, checkpoint_input=gc)
    # fp32 master weights under autocast (single-process full fine-tuning) keep the residual stream in fp32
    residual = 4 if setup.stored_weight_dtype == "fp32" else a
    lm_saved = shape.num_layers * (residual * h * tokens if gc else lm_layer)
    # final norm (fp32 copy + output) and the inputs_embeds the first layer reads (covered by its checkpoint)
    norm_trainable = setup.spec.trains_base
    lm_saved += tokens * (4 * h + (2 if norm_trainable else 1) * a * h)
    if setup.attn == "eager":
        lm_saved += mb * seq * seq * a  # the 4-D causal mask, shared by all layers

    if vision_trains:
        clip_layer = _clip_layer_saved(shape, setup, v_tokens, checkpoint_input=gc_vision)
        vision_saved = shape.vision_used_layers * (a * hv * v_tokens if gc_vision else clip_layer)
        if setup.spec.trains_vision:
            vision_saved += 2 * a * hv * v_tokens  # embeddings + pre_layrnorm input/output (no graph when frozen)
            # The patch conv keeps its input for its weight gradient: the real crops gathered out of the padded
            # input (an fp32 copy; the reference reshapes instead) and their compute-dtype copy.
            crop_pixels = mb * workload.vision_crops * 3 * shape.image_size**2
            vision_saved += crop_pixels * (4 if workload.crop_copy else 0) + (crop_pixels * a if a != 4 else 0)
        vision_saved += img_rows * (4 * hv + 2 * h) * a  # projector input, GELU input and output
    else:
        clip_layer = 0.0
        vision_saved = 0.0

    ce_peak = logits_loss_bytes(shape, setup, workload)
    head_adapter, head_forward, lm_transient = _adapter_transients(shape, setup, mb * logit_positions(workload, setup.logits))
    return {
        "lm_saved": lm_saved,
        "vision_saved": vision_saved,
        "lm_layer_working_set": (lm_layer + lm_transient) if gc else 0.0,
        "lm_layer_backward": _lm_layer_backward_extra(shape, setup, tokens, seq),
        "clip_layer_working_set": clip_layer if (gc_vision and vision_trains) else 0.0,
        "clip_layer_backward": (a * (2 * hv + 2 * shape.vision_intermediate) * v_tokens) if vision_trains else 0.0,
        "clip_forward_peak": _clip_layer_forward_peak(shape, setup, v_tokens),
        "pixels": mb * workload.slots * 3 * shape.image_size**2 * 4,
        "logits_loss": ce_peak,
        "head_adapter": head_adapter,
        "head_adapter_forward": head_forward,
    }


def _adapter_transients(shape: ModelShape, setup: TrainSetup, head_tokens: int) -> tuple[float, float, float]:
    """What the adapter's own terms add (bytes): at ``lm_head`` in the loss backward (saved + gradient buffers over
    the logit positions), at ``lm_head``'s forward (weight-sized work), and in one decoder projection's recompute."""
    adapter, a, rank = setup.spec.adapter, setup.act_bytes, setup.lora_rank
    if adapter is None:
        return 0.0, 0.0, 0.0
    head = head_forward = 0.0
    if setup.lora_lm_head:
        v = shape.vocab_size
        # beyond plain LoRA's r-wide A·x, which the logits terms have always left out (< 0.1 % of them)
        extra = adapter.saved_per_token(rank, v) - LORA.saved_per_token(rank, v) + adapter.backward_per_token(rank, v)
        head = a * head_tokens * extra
        head_forward = adapter.forward_transient_bytes(rank, shape.hidden_size, v, a)
    layer = max(adapter.forward_transient_bytes(rank, i, o, a) for _, i, o in shape.adapted_linears(False, False))
    return head, head_forward, layer


def _optimizer_temporaries(shape: ModelShape, setup: TrainSetup, trainable: int) -> float:
    """AdamW temporaries during ``step()``.

    The multi-tensor (foreach) path, torch's default on CUDA, materialises ``sqrt(v)`` for every tensor at once:
    one fp32 copy of the local trainable shard (under ZeRO-2 DeepSpeed hands AdamW one flat fp32 partition). The
    single-tensor loop (CPU default) holds two temporaries of the largest tensor.
    """
    if setup.offload_optimizer or setup.optim == "adamw_8bit":
        return 0.0  # CPU Adam steps in host memory; bitsandbytes' 8-bit kernel updates each tensor in place
    lora = setup.spec.uses_lora
    state_bytes = 4 if (lora or setup.zero == 2) else DTYPE_BYTES[setup.stored_weight_dtype]
    if setup.optimizer_foreach:
        shard = trainable / setup.world_size if setup.zero == 2 else trainable
        return state_bytes * shard
    if lora:
        largest = setup.lora_rank * max(
            shape.vocab_size + shape.hidden_size, 2 * shape.intermediate_size + shape.hidden_size
        )
    else:
        largest = max(shape.vocab_size * shape.hidden_size, shape.hidden_size * 2 * shape.intermediate_size)
    return 2 * largest * state_bytes


def dequant_transient(shape: ModelShape, setup: TrainSetup) -> float:
    """QLoRA: bitsandbytes dequantizes one 4-bit weight at a time (the largest is ``gate_up_proj``)."""
    if not setup.spec.quantized:
        return 0.0
    return setup.act_bytes * shape.hidden_size * 2 * shape.intermediate_size


def _item_notes(setup: TrainSetup, zero2: bool) -> dict[str, str]:
    """What each line of the breakdown holds (shown next to it)."""
    adam = "8-bit AdamW m, v + absmax per 256" if setup.optim == "adamw_8bit" else "AdamW m, v"
    return {
        "weights": f"{'nf4 + 16-bit rest' if setup.spec.quantized else setup.stored_weight_dtype}, all parameters",
        "gradients": (
            "largest 16-bit grad in flight; fp32 grads on the host (offload)"
            if setup.offload_optimizer
            else ("ZeRO-2 partitions: 16-bit + fp32 grads / N" if zero2 else "")
        ),
        "optimizer_states": "ZeRO-2 partitions: fp32 master + Adam m, v / N" if zero2 else adam,
        "deepspeed_buckets": "overlap_comm: 4.5 × (reduce + allgather bucket) × 2 B (HF DeepSpeed docs)",
        "lora_weights": f"fp32 adapters, r={setup.lora_rank}",
        "ddp_buckets": "DDP flat gradient buckets",
        "saved activations": "layer inputs (checkpointing) + vision/projector saves"
        if setup.gradient_checkpointing
        else "all layers",
        "logits + loss": f"fp32 log-softmax, its grad and the logits' grad ({setup.logits} positions)",
    }


def _phase_items(
    shape: ModelShape, setup: TrainSetup, acts: dict[str, float], grads: float, head_grads: float
) -> dict[str, dict[str, float]]:
    """The transient tensors of each moment of the step where the peak can fall."""
    grads_in_forward = grads if setup.grad_accum > 1 else 0.0
    saved = acts["lm_saved"] + acts["vision_saved"]
    adapter = setup.spec.adapter or LORA
    lora = shape.lora_params(setup.lora_rank, setup.lora_lm_head, setup.lora_vision, adapter)
    trainable = trained_params(shape, setup, lora)
    return {
        "loss backward": {
            "gradients (accumulated)": grads_in_forward,
            "saved activations": saved,
            "logits + loss": acts["logits_loss"],
            "lm_head adapter": acts["head_adapter"],
            "4-bit dequantized weight": dequant_transient(shape, setup),
        },
        "LM head forward": {
            "gradients (accumulated)": grads_in_forward,
            "saved activations": saved,
            "lm_head adapter weight work": acts["head_adapter_forward"],
        },
        "LM backward (last layer)": {
            "gradients (accumulated)": max(grads_in_forward, head_grads),
            "saved activations": saved,
            "layer recompute + grads": acts["lm_layer_working_set"] + acts["lm_layer_backward"],
            "4-bit dequantized weight": dequant_transient(shape, setup),
        },
        "vision forward": {
            "gradients (accumulated)": grads_in_forward,
            "CLIP layer transient": acts["clip_forward_peak"],
        },
        "vision backward": {
            "gradients (accumulated)": grads,
            "saved activations": acts["vision_saved"],
            "layer recompute + grads": acts["clip_layer_working_set"] + acts["clip_layer_backward"],
        },
        "optimizer step": {
            "gradients (accumulated)": grads,
            "optimizer temporaries": _optimizer_temporaries(shape, setup, trainable),
        },
    }


def estimate_memory(
    shape: ModelShape, setup: TrainSetup, workload: SampleShape, overheads: Overheads | None = None
) -> MemoryEstimate:
    """Peak memory of one rank for one training step.

    Args:
        shape: Model dimensions.
        setup: Method, precision, attention, checkpointing, micro-batch, ranks, optimizer, offload.
        workload: Tokens and crops per sample.
        overheads: GPU-side additions (allocator cache, context); None means none (a CPU step).

    Returns:
        The breakdown at the moment of the step with the largest allocated memory.
    """
    overheads = overheads or Overheads.cpu()
    states = model_state_bytes(shape, setup)
    acts = activation_terms(shape, setup, workload)
    zero2 = setup.zero == 2 and setup.spec.trains_base
    grads = states.get("gradients", 0.0) + states.get("ddp_buckets", 0.0)
    static = {k: v for k, v in states.items() if k not in ("gradients", "ddp_buckets")}
    if zero2:
        static["gradients"] = states["gradients"]  # partitions live for the whole run
        grads = 0.0
    static["batch (pixel values)"] = acts["pixels"]
    head_grads = 0.0
    if not zero2 and setup.spec.trains_base:
        head_grads = shape.param_counts().lm_head * DTYPE_BYTES[setup.stored_weight_dtype]
    phase_items = _phase_items(shape, setup, acts, grads, head_grads)
    totals = {name: sum(static.values()) + sum(parts.values()) for name, parts in phase_items.items()}
    phase = max(totals, key=totals.__getitem__)
    notes = _item_notes(setup, zero2)
    items = [MemoryItem(k, v, notes.get(k, "")) for k, v in static.items()]
    items += [MemoryItem(k, v, notes.get(k, "")) for k, v in phase_items[phase].items() if v]
    allocated = totals[phase]
    context = (overheads.cuda_context_gib + (overheads.nccl_gib if setup.world_size > 1 else 0.0)) * GIB
    return MemoryEstimate(
        items=items,
        phase=phase,
        allocated=allocated,
        cache=overheads.cache_fraction * allocated,
        context=context,
        min_cache=overheads.min_cache_fraction * allocated,
        phases=totals,
    )
