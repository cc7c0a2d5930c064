"""Pixel parity: the fast image processor equals, bit for bit, the reference's steps run one by one.

``reference_pixels`` spells out processing_phi3_v.py's image path with the calls torchvision makes for PIL input
(``F.resize`` → ``Image.resize(BILINEAR)``, ``F.pad`` → ``ImageOps.expand``, ``ToTensor``, ``Normalize``): transpose
portrait images, resize, pad the height with white, transpose back, normalise, bicubic global image, row-major crops,
zero padding. The processor skips the transposes, pads in float and normalises by table lookup; these tests pin that
none of it changes a bit, including portrait images resized along both axes (the pass order of PIL's resize).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from phi3v_core.processing import CLIP_MEAN, CLIP_STD, Phi3VImageProcessor


def reference_pixels(image: Image.Image, num_crops: int) -> tuple[torch.Tensor, list[int]]:
    """The reference image path, step by step (slow, obviously correct): ``(num_crops+1, 3, 336, 336)``, ``[H, W]``."""
    image = image.convert("RGB")
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    ratio = image.width / image.height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    if image.size != (new_w, new_h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target = int(np.ceil(new_h / 336) * 336)
    top = int((target - new_h) / 2)
    image = ImageOps.expand(image, border=(0, top, 0, target - new_h - top), fill=(255, 255, 255))
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    tensor = torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    tensor = tensor.to(torch.float32).div(255)
    tensor = tensor.sub_(torch.tensor(CLIP_MEAN).view(-1, 1, 1)).div_(torch.tensor(CLIP_STD).view(-1, 1, 1))
    height, width = tensor.shape[1:]
    global_image = F.interpolate(tensor.unsqueeze(0), size=(336, 336), mode="bicubic")
    crops = tensor.reshape(1, 3, height // 336, 336, width // 336, 336).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 336, 336)
    stacked = torch.cat([global_image, crops], dim=0)
    padding = torch.zeros(num_crops + 1 - stacked.shape[0], 3, 336, 336)
    return torch.cat([stacked, padding], dim=0), [height, width]


def noise(width: int, height: int, seed: int) -> Image.Image:
    """Random pixels: every rounding difference shows."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


SIZES = [
    (1008, 1680),  # a 16-crop page that needs no resize (portrait)
    (1700, 2200),  # portrait, resized along both axes: the pass order matters
    (2200, 1700),
    (500, 333),
    (300, 710),
    (337, 1000),
    (20, 20),  # upscaled
    (2000, 500),
    (61, 1999),
    (999, 998),
]


@pytest.mark.parametrize("num_crops", [1, 4, 16])
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_pixels_equal_reference_steps(width: int, height: int, num_crops: int) -> None:
    image = noise(width, height, seed=width * 7 + height)
    expected, size = reference_pixels(image, num_crops)
    out = Phi3VImageProcessor(num_crops=num_crops)(image)
    assert out["image_sizes"].tolist() == [size]
    assert torch.equal(out["pixel_values"][0], expected)


def test_batch_equals_images_one_by_one() -> None:
    images = [noise(1700, 2200, 1), noise(640, 480, 2), noise(300, 710, 3)]
    processor = Phi3VImageProcessor(num_crops=9)
    batch = processor(images)["pixel_values"]
    for index, image in enumerate(images):
        expected, _ = reference_pixels(image, 9)
        assert torch.equal(batch[index], expected), index


def test_unused_crop_slots_are_zero_even_in_reused_memory() -> None:
    """The output is allocated uninitialised: every slot past the image's crops must still be written as zeros."""
    processor = Phi3VImageProcessor(num_crops=9)
    for _ in range(3):  # freed and re-allocated buffers hold old pixels
        out = processor([noise(400, 400, 5), noise(2000, 400, 6)])
        grids = [(height // 336) * (width // 336) for height, width in out["image_sizes"].tolist()]
        assert grids == [9, 5]
        pixels = out["pixel_values"]
        assert not pixels[1, 1 + 5 :].any()
        assert pixels[1, 1:6].abs().sum() > 0 and pixels[0, 1:10].abs().sum() > 0
