"""Device memory while the model is built, before the first training step.

QLoRA presets are built layer by layer into nf4 (``phi3v_core.methods.build_quantized_model``): everything outside the
decoder and CLIP encoder layers first, then one layer at a time, each allocated in 16-bit, initialised, and its
``nn.Linear`` weights quantized at once, which frees their 16-bit copies. The peak is therefore the final weights plus
one layer's linear weights in 16-bit, less their nf4 form, which does not exist yet at that moment. (The old path,
the whole 16-bit model built on the device and then quantized, peaked at 16-bit model + nf4 weights: ~10 GiB for
Phi-3.5-vision instead of ~2.6 GiB.) Other methods build the model directly in its training dtype: the weights.
"""

from __future__ import annotations

from planner.estimate import DTYPE_BYTES, NF4_BYTES_PER_PARAM, TrainSetup, model_state_bytes
from planner.shapes import ModelShape

__all__ = ["build_peak_bytes", "largest_quantized_piece"]


def largest_quantized_piece(shape: ModelShape) -> int:
    """Linear weights (elements) of the largest piece QLoRA materialises in 16-bit at once.

    The pieces are one decoder layer, one CLIP encoder layer, and the rest of the model, whose quantized linears are
    the two projector layers.
    """
    counts = shape.param_counts()
    decoder_layer = counts.lm_layer_linear // max(shape.num_layers, 1)
    clip_layer = (counts.vision_layer_linear_used + counts.vision_layer_linear_dead) // max(shape.vision_layers, 1)
    projector = counts.quantizable() - counts.lm_layer_linear - counts.vision_layer_linear_used
    projector -= counts.vision_layer_linear_dead
    return max(decoder_layer, clip_layer, projector)


def build_peak_bytes(shape: ModelShape, setup: TrainSetup) -> float:
    """Peak device bytes while the model of ``setup`` is built (no activations, no optimizer yet).

    Args:
        shape: Model dimensions.
        setup: Method and precision (QLoRA builds in ``stored_weight_dtype``, then quantizes).
    """
    weights = model_state_bytes(shape, setup)["weights"]
    if not setup.spec.quantized:
        return weights
    transient = DTYPE_BYTES[setup.stored_weight_dtype] - NF4_BYTES_PER_PARAM
    return weights + largest_quantized_piece(shape) * transient
