"""Device memory while the model is built, before the first training step.

QLoRA presets are built layer by layer into nf4 (``phi3v_core.methods.build_quantized_model``): everything outside the
decoder and CLIP encoder layers first, then one layer at a time in module order (the decoder layers, then the CLIP
encoder layers), each allocated in 16-bit, initialised, and its ``nn.Linear`` weights quantized at once, which frees
their 16-bit copies. While a piece is in 16-bit, the pieces after it do not exist yet, so the peak is the largest, over
the pieces, of the final weights less the pieces still to come, plus that piece's linear weights in 16-bit less their
nf4 form. For Phi-3.5-vision the last decoder layer's transient lands 24 nf4 CLIP layers below the final weights, and
the last CLIP layer's transient, the smaller one, on top of them. (The old path, the whole 16-bit model built on the
device and then quantized, peaked at 16-bit model + nf4 weights: ~10 GiB for Phi-3.5-vision instead of ~2.5 GiB.)
Other methods build the model directly in its training dtype: the weights.
"""

from __future__ import annotations

from planner.estimate import NF4_BYTES_PER_PARAM, model_state_bytes
from planner.shapes import ModelShape
from planner.train_setup import DTYPE_BYTES, TrainSetup

__all__ = ["build_peak_bytes", "largest_quantized_piece", "quantized_pieces"]


def quantized_pieces(shape: ModelShape) -> list[tuple[int, int, int]]:
    """The pieces of a layer-by-layer QLoRA build, in build order, as ``(count, params, linear weights)``.

    Each entry is ``count`` identical pieces of ``params`` parameters, ``linear weights`` of which are quantized:
    the rest of the model (its quantized linears are the two projector layers), a decoder layer, a CLIP encoder layer.
    """
    counts = shape.param_counts()
    layers, vision_layers = max(shape.num_layers, 1), max(shape.vision_layers, 1)
    clip_linear = counts.vision_layer_linear_used + counts.vision_layer_linear_dead
    # vision_dead counts post_layernorm too, which has the shape of pre_layrnorm (vision_pre_norm)
    clip_params = counts.vision_layers_used + counts.vision_dead - counts.vision_pre_norm
    rest_params = counts.total - counts.lm_layers - clip_params
    rest_linear = counts.quantizable() - counts.lm_layer_linear - clip_linear
    return [
        (1, rest_params, rest_linear),
        (shape.num_layers, counts.lm_layers // layers, counts.lm_layer_linear // layers),
        (shape.vision_layers, clip_params // vision_layers, clip_linear // vision_layers),
    ]


def largest_quantized_piece(shape: ModelShape) -> int:
    """Linear weights (elements) of the largest piece QLoRA materialises in 16-bit at once."""
    return max(linear for count, _, linear in quantized_pieces(shape) if count)


def build_peak_bytes(shape: ModelShape, setup: TrainSetup) -> float:
    """Peak device bytes while the model of ``setup`` is built (no activations, no optimizer yet).

    Args:
        shape: Model dimensions.
        setup: Method and precision (QLoRA builds in ``stored_weight_dtype``, then quantizes).
    """
    weights = model_state_bytes(shape, setup)["weights"]
    if not setup.spec.quantized:
        return weights
    wbytes = DTYPE_BYTES[setup.stored_weight_dtype]
    transient = wbytes - NF4_BYTES_PER_PARAM
    pieces = [piece for piece in quantized_pieces(shape) if piece[0]]
    peak = 0.0
    to_come = 0.0  # final bytes of the pieces built after the last one of the current kind
    for count, params, linear in reversed(pieces):
        # the last piece of a kind peaks highest: every earlier piece of its kind is already built
        peak = max(peak, weights - to_come + linear * transient)
        to_come += count * (linear * NF4_BYTES_PER_PARAM + (params - linear) * wbytes)
    return peak
