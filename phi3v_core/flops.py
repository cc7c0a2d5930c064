"""FLOPs of one training step counted from the shapes: no model is built, nothing is traced (microseconds).

The count follows the rules of torch's ``FlopCounterMode`` (which the fake-tensor replay,
``bench.measure.trace_step_flops``, uses and which a test pins this module to): 2 FLOPs per multiply-add of every
matrix product and convolution, nothing for element-wise work. A product ``x @ W`` of ``T`` rows costs ``2·T·in·out``
forward and the same again in backward for each gradient that is needed - the weight's when it trains, the input's
when it carries a gradient. Per part of the model:

* the decoder: one layer (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj`` and the two attention products
  ``QKᵀ`` and ``AV``) times the depth - the layers are identical, except that the first layer's ``qkv_proj`` needs no
  input gradient when nothing before it trains (the rotary embedding's ``inv_freq @ positions`` runs in fp32 outside
  autocast as an element-wise broadcast: no product is counted);
* the CLIP image tower: the patch convolution and the live encoder layers (``vision_feature_layer``), over the crops
  that are encoded (only the real ones with ``skip_padded_crops``); the projector over the image tokens;
* ``lm_head``: over every position (``logits="full"``) or only where a label is (``"supervised"``, the model's
  training default);
* LoRA adapters (``A`` then ``B``) on the layers a method adapts;
* gradient checkpointing: every checkpointed layer's forward runs again in backward (the decoder layers, and the
  CLIP layers when a gradient flows through them);
* packed rows (``--packing``; :attr:`MicroBatchShape.samples`): the two counts differ even without checkpointing.
  ``model_flops`` is the sum of what each sample costs trained alone - its own tokens, its own attention square
  ``s²`` (the block-diagonal mask keeps no pair across samples), no padding - so MFU of a packed run is comparable
  to an unpacked one. ``hardware_flops`` is what the kernels run: every position of every row (the tail padding
  too) and, with sdpa or eager, attention over the whole row (``width²``: the dense block-diagonal mask is applied
  to a full score matrix, and ``FlopCounterMode`` counts the same); flash-attention-2's variable-length kernel runs
  each sample's square only. Attention squares are full squares, as ``FlopCounterMode`` charges them (a causal
  kernel may skip half); :func:`phi3v_core.mfu.causal_attention_flops` counts the causal half for the ``6N``
  conventions, per sample as well.

What trains is a :class:`TrainableParts`, which :meth:`TrainableParts.for_method` reads from the method's registry
entry (``phi3v_core.methods``), adapter terms included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from phi3v_core.constants import LOSS_CHUNK_TOKENS, crop_grid_of_padded, image_token_count

__all__ = [
    "ModelDims", "MicroBatchShape", "StepFlopCount", "TrainableParts", "decoder_sequences", "micro_batch_shape",
    "step_flops",
]

#: Label value that no loss is computed for (transformers' ignore index).
_IGNORE = -100


@dataclass(frozen=True)
class ModelDims:
    """The widths and depths the count needs (read from a ``Phi3VConfig`` by :meth:`from_config`)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int  # live CLIP layers: those that feed ``vision_feature_layer``
    patch: int
    patches_per_crop: int
    num_img_tokens: int
    skip_padded_crops: bool

    @classmethod
    def from_config(cls, config: Any) -> ModelDims:
        """Dimensions of a :class:`phi3v_core.config.Phi3VConfig`."""
        clip = config.clip_config()
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        layer = int(config.vision_feature_layer)
        live = layer if layer >= 0 else int(clip.num_hidden_layers) + 1 + layer
        return cls(
            hidden=int(config.hidden_size),
            intermediate=int(config.intermediate_size),
            layers=int(config.num_hidden_layers),
            heads=heads,
            kv_heads=int(config.num_key_value_heads or heads),
            head_dim=head_dim,
            vocab=int(config.vocab_size),
            vision_hidden=int(clip.hidden_size),
            vision_intermediate=int(clip.intermediate_size),
            vision_layers=live,
            patch=int(clip.patch_size),
            patches_per_crop=(int(clip.image_size) // int(clip.patch_size)) ** 2,
            num_img_tokens=int(config.num_img_tokens),
            skip_padded_crops=bool(config.skip_padded_crops),
        )


@dataclass(frozen=True)
class TrainableParts:
    """What trains, as far as FLOPs care: whole weights, LoRA adapters, and whether the input carries a gradient.

    Attributes:
        decoder: The decoder layers' weights train.
        embeddings: ``embed_tokens`` trains (its output then carries a gradient into the first layer).
        lm_head: ``lm_head``'s weight trains.
        vision: The CLIP tower's weights (and the image separators) train.
        projector: The projector's weights train.
        lora_rank: Rank of the LoRA adapters (0: none).
        lora_decoder: Adapters on the decoder layers' four linear layers.
        lora_lm_head: An adapter on ``lm_head``.
        lora_vision: Adapters on the live CLIP layers' six linear layers and the projector's two.
        input_grad_with_checkpointing: With gradient checkpointing the input embeddings carry a gradient even when
            nothing before them trains: transformers' ``gradient_checkpointing_enable`` calls
            ``enable_input_require_grads`` for every model that reads ``input_ids`` (and PEFT does too), which hooks
            the text embedding *and* CLIP's patch embedding - so under checkpointing a gradient flows back through
            a frozen CLIP tower as well (input gradients only, and its recompute).
        adapter: The method's :class:`~phi3v_core.methods.spec.Adapter` (None: no adapter, or plain LoRA's terms
            only): its token-independent forward work (DoRA's ``B(A(I))``) is added per forward of every adapted
            layer, and again in the recompute of checkpointed layers (the decoder's and CLIP's, not ``lm_head``).
    """

    decoder: bool = False
    embeddings: bool = False
    lm_head: bool = False
    vision: bool = False
    projector: bool = False
    lora_rank: int = 0
    lora_decoder: bool = False
    lora_lm_head: bool = False
    lora_vision: bool = False
    input_grad_with_checkpointing: bool = False
    adapter: Any = None

    @classmethod
    def for_method(
        cls, method: str, *, lora_rank: int = 64, lora_lm_head: bool = True, freeze_vision: bool = False
    ) -> TrainableParts:
        """The parts a registered method trains, read from its registry entry (QLoRA's 4-bit base does the same
        products as LoRA's 16-bit one after dequantisation; an adapter's token-independent work comes with it)."""
        from phi3v_core.methods import get_method  # the torch-free registry

        spec = get_method(method)
        if spec.trains_base:
            return cls(decoder=True, embeddings=True, lm_head=True, vision=spec.trains_vision,
                       projector=spec.trains_vision, input_grad_with_checkpointing=True)
        return cls(lora_rank=lora_rank, lora_decoder=True, lora_lm_head=lora_lm_head,
                   lora_vision=not freeze_vision, input_grad_with_checkpointing=True, adapter=spec.adapter)

    @property
    def image_grad(self) -> bool:
        """Whether the image features carry a gradient (something in the image path trains)."""
        return self.vision or self.projector or self.lora_vision


@dataclass(frozen=True)
class MicroBatchShape:
    """The shapes of one micro-batch that the count depends on.

    Attributes:
        rows: Sequences in the micro-batch.
        seq_len: Padded sequence length.
        crops: 336² crops the CLIP tower encodes (all images together).
        image_tokens: Rows of image features the projector maps (placeholders, separators included).
        head_positions: Positions where ``lm_head`` runs (all rows together).
        samples: Token counts of the samples packed into the rows (``PackInfo``), in row order; empty when not
            packed (each row is one sequence of ``seq_len``, its padding included).
    """

    rows: int
    seq_len: int
    crops: int = 0
    image_tokens: int = 0
    head_positions: int = 0
    samples: tuple[int, ...] = ()


@dataclass(frozen=True)
class StepFlopCount:
    """FLOPs of one optimizer step on one rank, forward and backward of every micro-batch (no optimizer).

    Attributes:
        model_flops: The work the model needs (gradient checkpointing off): what MFU divides.
        hardware_flops: What the hardware runs as configured: checkpointing's recomputed forwards included.
    """

    model_flops: int
    hardware_flops: int


def micro_batch_shape(batch: Mapping[str, Any], dims: ModelDims, logits: str = "supervised") -> MicroBatchShape:
    """The :class:`MicroBatchShape` of a collated micro-batch, as the model will run it.

    Args:
        batch: ``input_ids`` (rows × length), optional ``pixel_values`` (images × slots × 3 × 336 × 336) with
            ``image_sizes``, ``labels`` and ``logits_to_keep``, as the training collators emit them.
        dims: The model's dimensions.
        logits: ``"supervised"``: ``lm_head`` runs where a label is (the model's training default); ``"full"``: at
            every kept position.
    """
    if logits not in ("supervised", "full"):
        raise ValueError(f"logits must be 'supervised' or 'full', got {logits!r}")
    rows, seq_len = (int(v) for v in batch["input_ids"].shape)
    crops = image_tokens = 0
    pixel_values = batch.get("pixel_values")
    if pixel_values is not None:
        sizes = batch["image_sizes"]
        sizes = sizes.tolist() if hasattr(sizes, "tolist") else sizes
        grids = [crop_grid_of_padded(int(h), int(w)) for h, w in sizes]
        slots = int(pixel_values.shape[1])
        crops = sum(1 + r * c for r, c in grids) if dims.skip_padded_crops else len(grids) * slots
        image_tokens = sum(image_token_count(r, c, dims.num_img_tokens) for r, c in grids)
    keep = batch.get("logits_to_keep") or 0
    kept = int(keep) if isinstance(keep, int) and keep > 0 else seq_len
    labels = batch.get("labels")
    if logits == "supervised" and labels is not None:
        # position t predicts label t + 1; ``labels`` is already cut to the kept positions by the collator
        head_positions = int((labels[:, 1:] != _IGNORE).sum())
    else:
        head_positions = rows * kept
    packing = batch.get("packing")  # a PackInfo from the packing collator
    samples = tuple(int(n) for row in packing.rows for n in row) if packing is not None else ()
    return MicroBatchShape(rows, seq_len, crops, image_tokens, head_positions, samples)


def _linear(tokens: int, d_in: int, d_out: int, *, weight_grad: bool, input_grad: bool, rank: int) -> tuple[int, int]:
    """(forward, backward) FLOPs of ``tokens`` rows through a linear layer, with a LoRA adapter of ``rank`` > 0.

    The adapter's ``B`` always needs its input gradient (``A`` trains); ``A`` needs its own only when the layer's
    input carries a gradient.
    """
    base = 2 * tokens * d_in * d_out
    forward, backward = base, base * (int(weight_grad) + int(input_grad))
    if rank:
        a, b = 2 * tokens * d_in * rank, 2 * tokens * rank * d_out
        forward += a + b
        backward += 2 * b + a * (1 + int(input_grad))
    return forward, backward


def _last_product(tokens: int, d_in: int, d_out: int, rank: int) -> int:
    """FLOPs of a checkpointed layer's last product, which its recompute skips.

    torch's non-reentrant checkpoint stops recomputing once every tensor the forward saved is back ("early stop",
    its default), which happens before the layer's last product (``down_proj``, CLIP's ``fc2``, or their adapter's
    ``B``) runs again: what ``FlopCounterMode`` counts, layer by layer, with early stop on and off.
    """
    return 2 * tokens * (rank if rank else d_in) * d_out


def _decoder(dims: ModelDims, parts: TrainableParts, tokens: int, input_grad: bool) -> tuple[int, int, int]:
    """(forward, backward, recomputed forward of one layer) of the decoder layers' linear layers; the first layer's
    input may carry no gradient, every later one does (each layer trains)."""
    rank = parts.lora_rank if parts.lora_decoder else 0
    qkv = (dims.heads + 2 * dims.kv_heads) * dims.head_dim
    shapes = [(dims.hidden, qkv), (dims.heads * dims.head_dim, dims.hidden), (dims.hidden, 2 * dims.intermediate),
              (dims.intermediate, dims.hidden)]
    forward = backward = 0
    for first in (True, False):
        count = 1 if first else dims.layers - 1
        for i, (d_in, d_out) in enumerate(shapes):
            grad_in = input_grad if (first and i == 0) else True
            f, b = _linear(tokens, d_in, d_out, weight_grad=parts.decoder, input_grad=grad_in, rank=rank)
            forward += count * f
            backward += count * b
    one_layer = sum(_linear(tokens, i, o, weight_grad=False, input_grad=False, rank=rank)[0] for i, o in shapes)
    return forward, backward, one_layer - _last_product(tokens, *shapes[-1], rank)


def _vision(
    dims: ModelDims, parts: TrainableParts, shape: MicroBatchShape, checkpointing: bool
) -> tuple[int, int, int]:
    """(forward, backward, recomputed forward) of the CLIP tower and the projector.

    Under checkpointing with ``input_grad_with_checkpointing`` the patch embedding's output carries a gradient too
    (``enable_input_require_grads`` hooks every input embedding, CLIP's included), so the gradient flows back
    through the whole tower even where no CLIP weight trains.
    """
    if not shape.crops:
        return 0, 0, 0
    input_grad = parts.vision or (checkpointing and parts.input_grad_with_checkpointing)
    grad = parts.lora_vision or input_grad  # a gradient flows through the tower
    rank = parts.lora_rank if parts.lora_vision else 0
    width, inner = dims.vision_hidden, dims.vision_intermediate
    tokens = shape.crops * (dims.patches_per_crop + 1)  # + the class token
    conv = 2 * shape.crops * dims.patches_per_crop * width * 3 * dims.patch**2
    forward, backward = conv, conv if parts.vision else 0
    layer_forward = -dims.vision_layers * _last_product(tokens, inner, width, rank)
    shapes = [(width, width)] * 4 + [(width, inner), (inner, width)]
    for index in range(dims.vision_layers):
        for i, (d_in, d_out) in enumerate(shapes):
            grad_in = input_grad if (index == 0 and i < 3) else True
            f, b = _linear(tokens, d_in, d_out, weight_grad=parts.vision, input_grad=grad_in, rank=rank)
            forward += f
            layer_forward += f
            backward += b if grad else 0
    tokens_per_crop = dims.patches_per_crop + 1
    attention = 4 * shape.crops * tokens_per_crop * tokens_per_crop * width * dims.vision_layers
    forward += attention
    layer_forward += attention
    backward += 2 * attention if grad else 0
    projector_grad = grad or parts.projector
    for i, (d_in, d_out) in enumerate([(4 * width, dims.hidden), (dims.hidden, dims.hidden)]):
        f, b = _linear(shape.image_tokens, d_in, d_out, weight_grad=parts.projector,
                       input_grad=grad if i == 0 else True, rank=rank)
        forward += f
        backward += b if projector_grad else 0
    return forward, backward, layer_forward if grad else 0


def _adapter_fixed(dims: ModelDims, parts: TrainableParts, shape: MicroBatchShape) -> tuple[int, int]:
    """(once per forward, recomputed under checkpointing) token-independent adapter FLOPs of one micro-batch."""
    if parts.adapter is None or not parts.lora_rank:
        return 0, 0

    def work(d_in: int, d_out: int) -> int:
        return int(parts.adapter.flops_per_forward(parts.lora_rank, d_in, d_out))

    qkv = (dims.heads + 2 * dims.kv_heads) * dims.head_dim
    decoder = dims.layers * sum(work(i, o) for i, o in [(dims.hidden, qkv), (dims.heads * dims.head_dim, dims.hidden),
                                                         (dims.hidden, 2 * dims.intermediate),
                                                         (dims.intermediate, dims.hidden)])
    width, inner = dims.vision_hidden, dims.vision_intermediate
    vision = projector = 0
    if parts.lora_vision and shape.crops:
        vision = dims.vision_layers * (4 * work(width, width) + work(width, inner) + work(inner, width))
        projector = work(4 * width, dims.hidden) + work(dims.hidden, dims.hidden)
    head = work(dims.hidden, dims.vocab) if parts.lora_lm_head else 0
    return decoder + vision + projector + head, decoder + vision


#: Attention implementations whose packed rows are computed per sample (variable-length sequences).
_VARLEN_ATTENTION = ("flash_attention_2",)


def decoder_sequences(shape: MicroBatchShape, *, hardware: bool, attn: str = "sdpa") -> tuple[int, int]:
    """(decoder positions, sum of each sequence's squared length) of a micro-batch, as one count charges them.

    Unpacked: ``rows × seq_len`` positions (padding included) and one square of ``seq_len`` per row, in both counts.
    Packed, model FLOPs (``hardware=False``): the samples' tokens and one square per sample. Packed, hardware FLOPs:
    every position of the rows, and a square per row (sdpa, eager: the dense block-diagonal mask) or per sample
    and per padding tail (flash-attention-2's variable-length kernel).
    """
    positions = shape.rows * shape.seq_len
    if not shape.samples:
        return positions, shape.rows * shape.seq_len**2
    per_sample = sum(n * n for n in shape.samples)
    if not hardware:
        return sum(shape.samples), per_sample
    if attn in _VARLEN_ATTENTION:
        tail = positions - sum(shape.samples)  # one flattened row: the padding to a multiple is one more sequence
        return positions, per_sample + tail * tail
    return positions, shape.rows * shape.seq_len**2


def _micro_batch(
    dims: ModelDims, parts: TrainableParts, shape: MicroBatchShape, checkpointing: bool, logits: str,
    sequences: tuple[int, int],
) -> int:
    """FLOPs of one micro-batch's forward and backward (recompute included when ``checkpointing``), over the
    decoder ``sequences`` (:func:`decoder_sequences`)."""
    tokens, squares = sequences
    input_grad = (parts.embeddings or (parts.image_grad and shape.crops > 0)
                  or (checkpointing and parts.input_grad_with_checkpointing))
    forward, backward, layer_forward = _decoder(dims, parts, tokens, input_grad)
    attention = 4 * squares * dims.heads * dims.head_dim * dims.layers
    forward += attention
    backward += 2 * attention
    v_forward, v_backward, v_recompute = _vision(dims, parts, shape, checkpointing)
    head_rank = parts.lora_rank if parts.lora_lm_head else 0
    h_forward, h_backward = _linear(shape.head_positions, dims.hidden, dims.vocab, weight_grad=parts.lm_head,
                                    input_grad=True, rank=head_rank)
    fixed, fixed_recompute = _adapter_fixed(dims, parts, shape)
    total = forward + backward + v_forward + v_backward + h_forward + h_backward + fixed
    if checkpointing:
        total += layer_forward * dims.layers + attention + v_recompute + fixed_recompute
    if logits == "supervised" and shape.head_positions > LOSS_CHUNK_TOKENS:
        # Several loss chunks: each one's lm_head runs again in backward, whatever the checkpointing setting (so
        # in both counts, as the replay counts it; one chunk - answers under 1,024 tokens - has no recompute).
        total += h_forward
    return total


def step_flops(
    dims: ModelDims,
    parts: TrainableParts,
    micro_batches: Sequence[MicroBatchShape],
    *,
    checkpointing: bool,
    logits: str = "supervised",
    attn: str = "sdpa",
) -> StepFlopCount:
    """FLOPs of one optimizer step on one rank: every micro-batch's forward and backward.

    Args:
        dims: The model (:meth:`ModelDims.from_config`).
        parts: What trains (:meth:`TrainableParts.for_method`).
        micro_batches: The step's micro-batches on this rank (:func:`micro_batch_shape`).
        checkpointing: Gradient checkpointing of the decoder (and CLIP) layers, as configured.
        logits: ``"supervised"`` or ``"full"`` (see :func:`micro_batch_shape`), for the loss-chunk recompute.
        attn: The attention implementation: how a packed row's attention runs on the hardware (whole rows with
            sdpa/eager, per sample with flash-attention-2); the model count is per sample whatever the kernel.

    Returns:
        Model FLOPs (checkpointing off; packed samples each as if alone) and hardware FLOPs (as configured and as
        the kernels run packed rows).
    """
    if not (parts.decoder or parts.lora_decoder):
        raise ValueError("nothing in the decoder trains: no training step to count")
    model = sum(
        _micro_batch(dims, parts, s, False, logits, decoder_sequences(s, hardware=False, attn=attn))
        for s in micro_batches
    )
    hardware = sum(
        _micro_batch(dims, parts, s, checkpointing, logits, decoder_sequences(s, hardware=True, attn=attn))
        for s in micro_batches
    )
    return StepFlopCount(model, hardware)
