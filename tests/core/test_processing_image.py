"""Image processor: HD transform, token counts, pixel layout, persistence and bad input."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from phi3v_core.errors import ConfigError, DataError
from phi3v_core.processing import (
    CLIP_MEAN,
    CLIP_STD,
    Phi3VImageProcessor,
    Phi3VProcessor,
    hd_padded_height_width,
    padded_image_token_count,
)

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def normalized(rgb: tuple[int, int, int]) -> torch.Tensor:
    """Expected normalised value of one RGB colour, shape (3, 1, 1)."""
    return (torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 255.0 - MEAN) / STD


def reference_padded_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """Independent re-derivation of the HD rule (processing_phi3_v.py): brute-force the largest valid scale."""
    long_side, short_side = max(width, height), min(width, height)
    ratio = long_side / short_side
    scale = max(s for s in range(1, num_crops + 1) if s * math.ceil(s / ratio) <= num_crops)
    new_long = scale * 336
    new_short = max(1, int(new_long / ratio))
    padded_short = math.ceil(new_short / 336) * 336
    return (padded_short, new_long) if width >= height else (new_long, padded_short)


# ---------------------------------------------------------------- spec worked examples
@pytest.mark.parametrize(
    ("num_crops", "sizes", "tokens", "crops"),
    [(4, [[672, 672], [672, 336]], [757, 469], 5), (16, [[1008, 1344], [1680, 1008]], [1921, 2377], 17)],
)
def test_spec_section12_examples(num_crops: int, sizes: list[list[int]], tokens: list[int], crops: int) -> None:
    processor = Phi3VImageProcessor(num_crops=num_crops)
    out = processor([Image.new("RGB", (500, 333), (10, 20, 30)), Image.new("RGB", (300, 710), (200, 100, 0))])
    assert out["image_sizes"].tolist() == sizes
    assert out["image_sizes"].dtype == torch.long
    assert out["num_img_tokens"] == tokens
    assert tuple(out["pixel_values"].shape) == (2, crops, 3, 336, 336)
    assert out["pixel_values"].dtype == torch.float32
    assert [processor.num_image_tokens(500, 333), processor.num_image_tokens(300, 710)] == tokens


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (640, 640, [313, 757, 1489, 2509]),
        (1024, 768, [313, 757, 1489, 1921]),
        (768, 1024, [313, 757, 1489, 1933]),
        (2000, 500, [313, 745, 745, 2485]),
    ],
)
def test_spec_section6_table(width: int, height: int, expected: list[int]) -> None:
    assert [Phi3VImageProcessor(n).num_image_tokens(width, height) for n in (1, 4, 9, 16)] == expected


def test_spec_section6_padded_sizes() -> None:
    assert hd_padded_height_width(1024, 768, 16) == (1008, 1344)
    assert hd_padded_height_width(768, 1024, 16) == (1344, 1008)
    assert hd_padded_height_width(2000, 500, 4) == (336, 1344)
    assert hd_padded_height_width(2000, 500, 16) == (672, 2688)
    assert hd_padded_height_width(320, 240, 4) == (672, 672)  # small frames are upscaled (processing_phi3_v.py)


# ---------------------------------------------------------------- token-count formula over a grid
GRID_SIZES = [(1, 1), (7, 3), (3, 7), (50, 50), (320, 240), (333, 500), (500, 333), (1000, 999), (1700, 2200)]
GRID_SIZES += [(2200, 1700), (4000, 300), (300, 4000), (1920, 1080), (1080, 1920), (6000, 1), (1, 6000), (336, 337)]


@pytest.mark.parametrize("num_crops", range(1, 17))
def test_token_formula_grid(num_crops: int) -> None:
    processor = Phi3VImageProcessor(num_crops=num_crops)
    for width, height in GRID_SIZES:
        padded_h, padded_w = processor.padded_size(width, height)
        assert (padded_h, padded_w) == reference_padded_size(width, height, num_crops), (width, height)
        assert padded_h % 336 == 0 and padded_w % 336 == 0
        hc, wc = padded_h // 336, padded_w // 336
        assert 1 <= hc * wc <= num_crops
        assert processor.num_image_tokens(width, height) == 144 * hc * wc + 12 * hc + 157


# A sample of the grid through the full pixel path; small inputs are enough (the HD transform upscales).
PIXEL_SAMPLE = [(1, (7, 3)), (2, (50, 50)), (3, (3, 7)), (5, (4000, 300)), (7, (320, 240)), (12, (300, 4000))]
PIXEL_SAMPLE += [(16, (1, 6000)), (16, (20, 26)), (9, (336, 337))]


@pytest.mark.parametrize(("num_crops", "size"), PIXEL_SAMPLE)
def test_placeholders_emitted_match_formula(num_crops: int, size: tuple[int, int]) -> None:
    processor = Phi3VProcessor.tiny(num_crops=num_crops)
    image = Image.new("RGB", size, (30, 60, 90))
    out = processor("<|image_1|>\nx", [image])
    padded_h, padded_w = out["image_sizes"][0].tolist()
    assert (padded_h, padded_w) == processor.image_processor.padded_size(*size)
    expected = processor.image_processor.num_image_tokens(*size)
    assert expected == padded_image_token_count(padded_h, padded_w)
    assert int((out["input_ids"] == -1).sum()) == expected
    assert tuple(out["pixel_values"].shape) == (1, num_crops + 1, 3, 336, 336)
    real = (padded_h // 336) * (padded_w // 336)
    assert torch.count_nonzero(out["pixel_values"][0, 1 + real :]) == 0  # zero-padded crops


# ---------------------------------------------------------------- pixel layout
def test_white_padding_split_top_bottom_and_left_right() -> None:
    processor = Phi3VImageProcessor(num_crops=4)
    red = (255, 0, 0)
    out = processor([Image.new("RGB", (500, 333), red), Image.new("RGB", (300, 710), red)])
    white, colour = normalized((255, 255, 255)), normalized(red)
    # Landscape: ratio 500/333 -> 672x447, padded to 672x672: 112 white rows on top, 113 at the bottom.
    top_left = out["pixel_values"][0, 1]
    assert torch.allclose(top_left[:, :112], white.expand(3, 112, 336), atol=1e-5)
    assert torch.allclose(top_left[:, 112:], colour.expand(3, 224, 336), atol=1e-5)
    bottom_left = out["pixel_values"][0, 3]
    assert torch.allclose(bottom_left[:, :223], colour.expand(3, 223, 336), atol=1e-5)
    assert torch.allclose(bottom_left[:, 223:], white.expand(3, 113, 336), atol=1e-5)
    # Portrait: transposed to 672x283, padded by 53 (26 before, 27 after), transposed back -> left/right columns.
    crop = out["pixel_values"][1, 1]
    assert torch.allclose(crop[:, :, :26], white.expand(3, 336, 26), atol=1e-5)
    assert torch.allclose(crop[:, :, 26:309], colour.expand(3, 336, 283), atol=1e-5)
    assert torch.allclose(crop[:, :, 309:], white.expand(3, 336, 27), atol=1e-5)


def test_crops_are_row_major_and_global_is_bicubic_of_hd() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    array = np.zeros((672, 672, 3), dtype=np.uint8)
    array[:336, :336], array[:336, 336:], array[336:, :336], array[336:, 336:] = colours
    out = Phi3VImageProcessor(num_crops=4)(Image.fromarray(array))
    pixels = out["pixel_values"][0]
    for index, colour in enumerate(colours, start=1):
        assert torch.allclose(pixels[index], normalized(colour).expand(3, 336, 336), atol=1e-5), index
    hd = torch.cat([torch.cat([pixels[1], pixels[2]], dim=2), torch.cat([pixels[3], pixels[4]], dim=2)], dim=1)
    expected_global = torch.nn.functional.interpolate(hd[None], size=(336, 336), mode="bicubic")[0]
    assert torch.equal(pixels[0], expected_global)


def test_normalisation_matches_clip_constants_and_rgb_conversion() -> None:
    processor = Phi3VImageProcessor(num_crops=1)
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)
    out = processor(Image.fromarray(array))["pixel_values"][0, 1]  # 336² needs no resize: exact pixels
    expected = (torch.from_numpy(array).permute(2, 0, 1).float() / 255.0 - MEAN) / STD
    assert torch.allclose(out, expected, atol=1e-6)
    grey = Image.fromarray(array[:, :, 0])
    rgba = Image.fromarray(array).convert("RGBA")
    assert torch.equal(processor(grey)["pixel_values"], processor(grey.convert("RGB"))["pixel_values"])
    assert torch.equal(processor(rgba)["pixel_values"], processor(Image.fromarray(array))["pixel_values"])
    assert torch.equal(processor(array)["pixel_values"], processor(Image.fromarray(array))["pixel_values"])


def test_paths_are_loaded(tmp_path) -> None:
    path = tmp_path / "frame.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(path)
    processor = Phi3VImageProcessor(num_crops=2)
    from_path = processor([path, str(path)])
    from_image = processor(Image.new("RGB", (40, 30), (1, 2, 3)))
    assert torch.equal(from_path["pixel_values"][0], from_image["pixel_values"][0])
    assert torch.equal(from_path["pixel_values"][1], from_image["pixel_values"][0])


# ---------------------------------------------------------------- persistence
def test_from_pretrained_reads_num_crops(ckpt35, ckpt_v1, tmp_path) -> None:
    assert Phi3VImageProcessor.from_pretrained(ckpt35).num_crops == 4
    assert Phi3VImageProcessor.from_pretrained(ckpt35, num_crops=16).num_crops == 16
    assert Phi3VImageProcessor.from_pretrained(ckpt_v1).num_crops == 16
    saved = Phi3VImageProcessor(num_crops=9).save_pretrained(tmp_path)
    config = json.loads(saved.read_text())
    assert config["num_crops"] == 9 and config["image_mean"] == list(CLIP_MEAN)
    assert Phi3VImageProcessor.from_pretrained(tmp_path).num_crops == 9
    assert [p.name for p in tmp_path.iterdir()] == ["preprocessor_config.json"]  # no temp files left


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("value", [0, 17, 2.5, True, "4"])
def test_num_crops_out_of_range(value) -> None:
    message = f"num_crops must be an integer in 1..16 (got {value!r}); use 4 for multi-image/video and 16 for single documents"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        Phi3VImageProcessor(num_crops=value)


def test_bad_images(tmp_path) -> None:
    processor = Phi3VImageProcessor(num_crops=1)
    missing = tmp_path / "missing.jpg"
    with pytest.raises(DataError, match=f"^image file not found: {re.escape(str(missing))} \\(check the path\\)$"):
        processor(missing)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=f"^cannot read image {re.escape(str(corrupt))}: not an image or corrupt "):
        processor(str(corrupt))
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(DataError, match="not an image or corrupt"):
        processor(truncated)
    with pytest.raises(DataError, match="^expected a PIL image, an image path or a uint8 array, got int$"):
        processor(42)
    with pytest.raises(DataError, match="^no images given to the image processor$"):
        processor([])
    with pytest.raises(DataError, match=r"^image has an empty side \(0x5 pixels\); remove it from the data$"):
        processor(Image.new("RGB", (0, 5)))
    with pytest.raises(ConfigError, match=r"^.*preprocessor_config.json not found: pass a Phi-3-vision checkpoint"):
        Phi3VImageProcessor.from_pretrained(tmp_path)
