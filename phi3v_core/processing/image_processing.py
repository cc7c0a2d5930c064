"""Phi-3(.5)-vision image processor: HD transform, CLIP normalisation, global image + 336² crops.

Re-implements the reference ``Phi3VImageProcessor`` (the checkpoint's processing_phi3_v.py) with PIL and torch only, because the PyPI
torchvision wheel is unusable here. Every step mirrors the reference so the pixels match:

1. convert to RGB;
2. HD transform: make the image landscape (transpose), pick the largest ``scale`` with
   ``scale * ceil(scale / ratio) <= num_crops``, resize to ``(scale*336, int(scale*336 / ratio))`` with PIL bilinear
   (antialiased, what torchvision's PIL path calls), pad the height to a multiple of 336 with white (top gets the
   smaller half), transpose back;
3. ToTensor + CLIP Normalize (float32, the same operation order as torchvision);
4. global image: bicubic ``torch.nn.functional.interpolate`` of the normalised padded tensor to 336x336 (no antialias);
5. row-major 336x336 crops, stacked after the global image and zero-padded to ``num_crops + 1`` entries.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature

from phi3v_core.constants import (
    CROP_SIZE,
    MAX_NUM_CROPS,
    TOKENS_PER_CROP,
    hd_padded_height_width,
    hd_resize_target,
    pad_to_crops,
    padded_image_token_count,
)
from phi3v_core.errors import ConfigError, DataError
from phi3v_core.io import atomic_write_json

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CROP_SIZE",
    "MAX_NUM_CROPS",
    "ImageInput",
    "Phi3VImageProcessor",
    "hd_padded_height_width",
    "load_image",
    "padded_image_token_count",
]

#: OpenAI CLIP normalisation constants (preprocessor_config.json of both checkpoints).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"

#: What the processors accept as one image: a PIL image, a path to an image file, or an HxWxC uint8 array.
ImageInput = Union[Image.Image, str, os.PathLike, np.ndarray]


def _resize_in_reference_order(image: Image.Image, new_w: int, new_h: int, transposed: bool) -> Image.Image:
    """The reference's ``transpose → resize((new_w, new_h)) → transpose`` without the two transposes.

    PIL resizes in two separable passes, horizontal then vertical, rounding to uint8 in between, so the order matters
    for the bits. On the transposed image the first pass runs along the original image's height: running that pass
    alone (a resize of the height only), then the width-only pass, gives the same pixels in the original orientation.
    Bilinear on PIL images adapts its support when downscaling (antialias), as torchvision's PIL path does; an
    unchanged side is skipped by both.

    Args:
        image: The RGB image in its own orientation.
        new_w: Target long side (``hd_resize_target``'s landscape width).
        new_h: Target short side.
        transposed: Whether the reference transposes this image (portrait).

    Returns:
        The resized image, ``(new_w, new_h)`` (width, height), or ``(new_h, new_w)`` when ``transposed``.
    """
    if not transposed:
        return image if image.size == (new_w, new_h) else image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if image.height != new_w:
        image = image.resize((image.width, new_w), Image.Resampling.BILINEAR)
    if image.width != new_h:
        image = image.resize((new_h, new_w), Image.Resampling.BILINEAR)
    return image


def validate_num_crops(num_crops: Any) -> int:
    """Check that ``num_crops`` is an integer in 1..16.

    Args:
        num_crops: The value to check.

    Returns:
        The value as an ``int``.

    Raises:
        ConfigError: If it is not an integer in range.
    """
    if (
        isinstance(num_crops, bool)
        or not isinstance(num_crops, (int, np.integer))
        or not 1 <= num_crops <= MAX_NUM_CROPS
    ):
        raise ConfigError(
            f"num_crops must be an integer in 1..{MAX_NUM_CROPS} (got {num_crops!r}); "
            "use 4 for multi-image/video and 16 for single documents"
        )
    return int(num_crops)


def load_image(image: ImageInput) -> Image.Image:
    """Open/convert one image input to an RGB PIL image, with one-line errors for bad input.

    Args:
        image: A PIL image, a path to an image file, or an ``HxWx3``/``HxW`` uint8 array.

    Returns:
        The image in RGB mode (pixels loaded).

    Raises:
        DataError: For a missing, non-image or corrupt file, an unsupported type or an empty image.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise DataError(f"image file not found: {path} (check the path)")
        # Imported here: phi3v_core.data imports this module (datasets build on the processor).
        from phi3v_core.data.images import as_user_sees_it

        try:
            with Image.open(path) as opened:
                opened.load()
                seen = as_user_sees_it(opened, str(path))  # EXIF orientation; alpha dropped as the reference does
                pil = seen.copy() if seen is opened else seen
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot read image {path}: not an image or corrupt ({type(exc).__name__}: {exc})") from exc
    elif isinstance(image, Image.Image):
        try:
            pil = image.convert("RGB") if image.mode != "RGB" else image
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot convert a {image.mode} image to RGB ({exc})") from exc
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise DataError(
                f"image arrays must be HxW or HxWxC uint8 (got shape {image.shape}, dtype {image.dtype}); "
                "pass a PIL image instead"
            )
        pil = Image.fromarray(image).convert("RGB")
    else:
        raise DataError(f"expected a PIL image, an image path or a uint8 array, got {type(image).__name__}")
    if pil.width == 0 or pil.height == 0:
        raise DataError(f"image has an empty side ({pil.width}x{pil.height} pixels); remove it from the data")
    return pil


class Phi3VImageProcessor:
    """Turns images into Phi-3-vision ``pixel_values`` (global image + HD crops) and ``image_sizes``.

    Args:
        num_crops: Maximum number of 336² crops per image (1..16); 4 for Phi-3.5-vision's default, 16 for documents.
        image_mean: Per-channel normalisation mean (CLIP).
        image_std: Per-channel normalisation std (CLIP).
        do_convert_rgb: Convert inputs to RGB first (the reference always does; kept for config compatibility).

    Raises:
        ConfigError: If ``num_crops`` is outside 1..16 or mean/std are not 3 positive numbers.
    """

    def __init__(
        self,
        num_crops: int = 4,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        do_convert_rgb: bool = True,
    ) -> None:
        self.num_crops = validate_num_crops(num_crops)
        if len(image_mean) != 3 or len(image_std) != 3 or any(s <= 0 for s in image_std):
            raise ConfigError(f"image_mean/image_std must be 3 numbers with std > 0 (got {image_mean}, {image_std})")
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.do_convert_rgb = do_convert_rgb
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1)
        # ToTensor + Normalize of every uint8 value, in their float32 operation order ((v / 255 - mean) / std): each
        # step is one correctly rounded IEEE operation per element, so a table lookup gives the same bits.
        self._table = torch.arange(256, dtype=torch.float32).div(255.0).view(1, 256).sub(mean).div(std).contiguous()

    def __repr__(self) -> str:
        return f"Phi3VImageProcessor(num_crops={self.num_crops})"

    # ------------------------------------------------------------------ sizes without pixels
    def padded_size(self, width: int, height: int, num_crops: int | None = None) -> tuple[int, int]:
        """Padded HD size ``(H, W)`` of an image of ``width`` x ``height`` pixels (no pixels touched).

        Args:
            width: Image width.
            height: Image height.
            num_crops: Override of ``self.num_crops``.

        Returns:
            ``(padded_height, padded_width)``.
        """
        crops = self.num_crops if num_crops is None else validate_num_crops(num_crops)
        return hd_padded_height_width(width, height, crops)

    def num_image_tokens(self, width: int, height: int, num_crops: int | None = None) -> int:
        """Number of placeholder tokens an image of ``width`` x ``height`` pixels becomes (no pixels touched).

        Args:
            width: Image width.
            height: Image height.
            num_crops: Override of ``self.num_crops``.

        Returns:
            ``144*hc*wc + 12*hc + 157`` for the padded grid of ``hc`` x ``wc`` crops.
        """
        return padded_image_token_count(*self.padded_size(width, height, num_crops))

    # ------------------------------------------------------------------ pixels
    def __call__(self, images: ImageInput | Sequence[ImageInput], num_crops: int | None = None) -> BatchFeature:
        """Process one image or a list of images.

        Args:
            images: One image or a sequence of images (PIL, paths or uint8 arrays).
            num_crops: Override of ``self.num_crops`` for this call.

        Returns:
            ``BatchFeature`` with ``pixel_values`` float32 ``(n, num_crops+1, 3, 336, 336)``, ``image_sizes``
            LongTensor ``(n, 2)`` = padded ``[H, W]`` and ``num_img_tokens`` (list of ints).

        Raises:
            DataError: For unreadable images.
            ConfigError: For a bad ``num_crops``.
        """
        crops = self.num_crops if num_crops is None else validate_num_crops(num_crops)
        if isinstance(images, (Image.Image, str, os.PathLike, np.ndarray)) or not isinstance(images, Iterable):
            images = [images]  # one image (anything else that is not iterable fails in load_image with a clear line)
        images = list(images)
        if not images:
            raise DataError("no images given to the image processor")
        # Uninitialised: every slot is written below (crops, then zeros for the unused ones), so no extra pass.
        pixel_values = torch.empty(len(images), crops + 1, 3, CROP_SIZE, CROP_SIZE, dtype=torch.float32)
        image_sizes = torch.zeros(len(images), 2, dtype=torch.long)
        num_img_tokens: list[int] = []
        for index, image in enumerate(images):
            hd = self._hd_tensor(load_image(image), crops)
            height, width = hd.shape[-2:]
            self._fill_crops(hd, pixel_values[index])
            image_sizes[index, 0], image_sizes[index, 1] = height, width
            num_img_tokens.append(padded_image_token_count(height, width))
        return BatchFeature(
            data={"pixel_values": pixel_values, "image_sizes": image_sizes, "num_img_tokens": num_img_tokens}
        )

    preprocess = __call__

    def _hd_tensor(self, image: Image.Image, num_crops: int) -> torch.Tensor:
        """HD-transform, pad and normalise one RGB image into a ``(3, H, W)`` float32 tensor.

        Equal bit for bit to the reference's transpose → resize → pad → transpose back → ToTensor → Normalize, with
        fewer passes over the pixels: no transposes (see :func:`_resize_in_reference_order`), the white padding
        added in uint8, and the normalisation read from a 256-entry table per channel straight into the float tensor.
        """
        new_w, new_h, transposed = hd_resize_target(image.width, image.height, num_crops)
        image = _resize_in_reference_order(image, new_w, new_h, transposed)
        pixels = np.asarray(image, dtype=np.uint8)
        pad = pad_to_crops(new_h) - new_h
        if pad:
            # White padding in uint8 (a quarter of the bytes of float), so the lookup below writes whole channels.
            before = pad // 2  # the reference's int((tar - height) / 2): top (left, if transposed) gets the smaller half
            rows, cols = (image.height, image.width + pad) if transposed else (image.height + pad, image.width)
            padded = np.full((rows, cols, 3), 255, dtype=np.uint8)
            if transposed:
                padded[:, before : before + image.width] = pixels
            else:
                padded[before : before + image.height] = pixels
            pixels = padded
        hd = torch.empty(3, pixels.shape[0], pixels.shape[1], dtype=torch.float32)
        table, out = self._table.numpy(), hd.numpy()
        for channel in range(3):
            # mode="clip" skips numpy's bounds-check buffering; uint8 indices are always in range.
            np.take(table[channel], pixels[:, :, channel], out=out[channel], mode="clip")
        return hd

    @staticmethod
    def _fill_crops(hd: torch.Tensor, out: torch.Tensor) -> None:
        """Write ``[global, crop_1 .. crop_k, zeros ..]`` of one HD tensor into ``out`` (every slot is written)."""
        height, width = hd.shape[-2:]
        out[0] = F.interpolate(hd.unsqueeze(0), size=(CROP_SIZE, CROP_SIZE), mode="bicubic").squeeze(0)
        h_crops, w_crops = height // CROP_SIZE, width // CROP_SIZE
        # One strided copy from the (3, H, W) image into the row-major crop slots (no intermediate tensor).
        out[1 : 1 + h_crops * w_crops].view(h_crops, w_crops, 3, CROP_SIZE, CROP_SIZE).copy_(
            hd.view(3, h_crops, CROP_SIZE, w_crops, CROP_SIZE).permute(1, 3, 0, 2, 4)
        )
        out[1 + h_crops * w_crops :].zero_()

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` content (official key names)."""
        return {
            "image_processor_type": "Phi3VImageProcessor",
            "processor_class": "Phi3VProcessor",
            "num_crops": self.num_crops,
            "num_img_tokens": TOKENS_PER_CROP,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": self.do_convert_rgb,
        }

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, num_crops: int | None = None) -> Phi3VImageProcessor:
        """Load from a checkpoint folder's ``preprocessor_config.json``.

        Args:
            folder: Checkpoint or output folder.
            num_crops: Override of the file's ``num_crops`` (the recipe uses 16 for documents).

        Returns:
            The image processor.

        Raises:
            ConfigError: If the file is missing or invalid.
        """
        path = Path(folder) / PREPROCESSOR_CONFIG
        if not path.is_file():
            raise ConfigError(f"{path} not found: pass a Phi-3-vision checkpoint folder (or use Phi3VProcessor.tiny())")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: invalid JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        if config.get("num_img_tokens", TOKENS_PER_CROP) != TOKENS_PER_CROP:
            raise ConfigError(f"{path}: num_img_tokens must be {TOKENS_PER_CROP} (got {config['num_img_tokens']})")
        return cls(
            num_crops=config.get("num_crops", 1) if num_crops is None else num_crops,
            image_mean=config.get("image_mean", CLIP_MEAN),
            image_std=config.get("image_std", CLIP_STD),
            do_convert_rgb=bool(config.get("do_convert_rgb", True)),
        )

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``preprocessor_config.json`` atomically into ``folder`` (created if needed).

        Args:
            folder: Destination folder.

        Returns:
            Path of the written file.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / PREPROCESSOR_CONFIG
        atomic_write_json(path, self.to_dict())
        return path
