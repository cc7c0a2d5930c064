"""The planner's build-time peak against the tensor bytes measured while a mid-size QLoRA model is built on CPU."""

from __future__ import annotations

import pytest
import torch

from bench.measure import LiveTensorBytes
from phi3v_core.config import Phi3VConfig, tiny_config
from phi3v_core.methods import build_quantized_model
from phi3v_core.methods.quantized_build import layer_units
from phi3v_core.model import Phi3VForCausalLM
from planner.estimate import model_state_bytes
from planner.loading import build_peak_bytes, largest_quantized_piece, quantized_pieces
from planner.shapes import ModelShape
from planner.train_setup import TrainSetup
from planner.validate import MID_SIZE

BF16 = torch.bfloat16
QLORA = TrainSetup(method="qlora", precision="bf16")


@pytest.fixture(scope="module")
def mid() -> Phi3VConfig:
    values = tiny_config().to_dict()
    for key, value in MID_SIZE.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    return Phi3VConfig.from_dict(values)


def test_layer_by_layer_build_peak_matches_the_prediction(mid: Phi3VConfig) -> None:
    shape = ModelShape.from_config(mid, "mid")
    torch.manual_seed(0)
    with LiveTensorBytes() as tracker:
        model, names = build_quantized_model(lambda: Phi3VForCausalLM(mid), BF16, BF16, "cpu")
    weights = model_state_bytes(shape, QLORA)["weights"]
    # what stays: nf4 + absmax for every quantized weight, 16-bit for the rest (+ a few KB of rotary/position buffers)
    assert tracker.current == pytest.approx(weights, rel=0.001)
    assert sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features for n in names) == (
        shape.param_counts().quantizable()
    )
    predicted = build_peak_bytes(shape, QLORA)
    # bitsandbytes' CPU quantizer adds ~0.1 MB of temporaries; the CUDA kernel writes straight into its outputs
    assert tracker.peak == pytest.approx(predicted, rel=0.01)
    # the transient is real: the last decoder layer's 16-bit linears, less the CLIP layers not built yet
    assert tracker.peak - weights > 0.8 * (predicted - weights) > 0.5 * largest_quantized_piece(shape) * (2 - 0.5625)


def test_the_build_order_the_prediction_assumes(mid: Phi3VConfig) -> None:
    """Decoder layers are built before the CLIP layers, and the pieces add up to the model."""
    with torch.device("meta"):
        model = Phi3VForCausalLM(mid)
    units = layer_units(model)
    decoder = [i for i, unit in enumerate(units) if unit.startswith("model.layers.")]
    assert decoder == list(range(mid.num_hidden_layers)) and len(units) > len(decoder)
    shape = ModelShape.from_config(mid, "mid")
    counts = shape.param_counts()
    pieces = quantized_pieces(shape)
    assert sum(count * params for count, params, _ in pieces) == sum(p.numel() for p in model.parameters())
    assert sum(count * linear for count, _, linear in pieces) == counts.quantizable()


def test_a_qlora_run_builds_layer_by_layer_within_the_prediction(
    mid: Phi3VConfig, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """What a QLoRA run calls (``training.build_model``, a preset) peaks at the prediction, far below the 16-bit model.

    The preset is swapped for the mid-size config so that one layer's transient is measurable.
    """
    from phi3v_core.training import model_setup
    from phi3v_core.training.config import TrainConfig

    monkeypatch.setattr(model_setup, "get_config", lambda name, attn_implementation=None: mid)
    shape = ModelShape.from_config(mid, "mid")
    cfg = TrainConfig(model="tiny", method="qlora", precision="bf16", output_dir=str(tmp_path / "run"))
    with LiveTensorBytes() as tracker:
        model = model_setup.build_model(cfg)
    assert getattr(model, "is_loaded_in_4bit", False)  # the product marks a model it built quantized
    predicted = build_peak_bytes(shape, QLORA)
    assert tracker.peak == pytest.approx(predicted, rel=0.01)
    # the path before (build in 16-bit, quantize afterwards) peaked at the whole 16-bit model and more
    assert tracker.peak < shape.param_counts().total * 2


def test_full_size_build_peak() -> None:
    """Phi-3.5-vision in bf16: ~2.46 GiB at build (the last CLIP layer in 16-bit over the 2.44 GiB of weights).

    The last decoder layer's larger transient (0.15 GiB) comes while the 24 CLIP layers (0.16 GiB in nf4) are not built.
    """
    shape = ModelShape.preset("phi-3.5-vision")
    counts = shape.param_counts()
    assert largest_quantized_piece(shape) == counts.lm_layer_linear // 32  # a decoder layer: 4·h² + 3·h·i
    peak = build_peak_bytes(shape, QLORA) / 2**30
    assert peak == pytest.approx(2.455, abs=0.005)
    assert peak < counts.total * 2 / 2**30 / 2.5  # the old path needed the whole 7.7 GiB 16-bit model
    assert (
        build_peak_bytes(shape, TrainSetup(method="lora"))
        == model_state_bytes(shape, TrainSetup(method="lora"))["weights"]
    )


@pytest.mark.gpu(seconds=30)  # the 4.1 B model built nf4 layer by layer on the GPU; imports included
def test_full_size_qlora_build_peak_on_the_gpu_matches_the_prediction() -> None:
    """Build the Phi-3.5-vision QLoRA preset on GPU 0 and compare the allocator's peak with the prediction (2.46 GiB).

    Fits every card the GPU tests target with room to spare (H100 80 GB, A100 40 GB, V100 32 GB: 2.5 GiB at most).
    bitsandbytes' CUDA quantizer writes straight into the nf4 output and absmax, so only the 512-byte rounding of the
    caching allocator and a few small buffers separate the two (3 % allowed). It skips only where the planner's own
    rule says QLoRA cannot run: the bitsandbytes library that loads with this torch has no kernels for this GPU
    (e.g. a V100 under a CUDA 13 torch; under CUDA 12.x a V100 runs it).
    """
    from phi3v_core.software import bnb_library, qlora_unsupported_reason
    from phi3v_core.training import Machine, TrainConfig, build_model

    unsupported = qlora_unsupported_reason(torch.cuda.get_device_capability(0), bnb_library(torch.version.cuda))
    if unsupported:
        pytest.skip(unsupported)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated(0)
    torch.cuda.reset_peak_memory_stats(0)
    model = build_model(TrainConfig(model="phi-3.5-vision", method="qlora", precision="bf16"), Machine.detect())
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(0) - start
    predicted = build_peak_bytes(ModelShape.preset("phi-3.5-vision"), QLORA)
    assert model.is_loaded_in_4bit
    assert peak == pytest.approx(predicted, rel=0.03), (peak / 2**30, predicted / 2**30)
