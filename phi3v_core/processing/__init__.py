"""Phi-3(.5)-vision processing: image processor, tokenizers, processor (prompt/placeholder layout) and collator.

Re-implemented from the checkpoint's processing_phi3_v.py (huggingface.co/microsoft/Phi-3.5-vision-instruct) and the collators of the Phi-3CookBook vision fine-tuning scripts (microsoft/Phi-3CookBook, code/03.Finetuning/vision_finetuning/) with PIL + torch (no torchvision) and ``tokenizers``.
"""

from phi3v_core.processing.collator import IGNORE_INDEX, Phi3VDataCollator
from phi3v_core.processing.image_processing import (
    CLIP_MEAN,
    CLIP_STD,
    CROP_SIZE,
    MAX_NUM_CROPS,
    Phi3VImageProcessor,
    hd_padded_height_width,
    load_image,
    padded_image_token_count,
)
from phi3v_core.processing.processor import IMAGE_TAG_PATTERN, Phi3VProcessor, image_tags
from phi3v_core.processing.tokenizer import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    SPECIAL_TOKENS,
    build_tiny_tokenizer,
    load_tokenizer,
)

__all__ = [
    "CHAT_TEMPLATE",
    "CLIP_MEAN",
    "CLIP_STD",
    "CROP_SIZE",
    "IGNORE_INDEX",
    "IMAGE_TAG_PATTERN",
    "IMAGE_TOKEN_ID",
    "MAX_NUM_CROPS",
    "PAD_TOKEN_ID",
    "SPECIAL_TOKENS",
    "Phi3VDataCollator",
    "Phi3VImageProcessor",
    "Phi3VProcessor",
    "build_tiny_tokenizer",
    "hd_padded_height_width",
    "image_tags",
    "load_image",
    "load_tokenizer",
    "padded_image_token_count",
]
