"""Phi-3(.5)-vision configuration: a transformers ``Phi3Config`` plus the image-embedding settings.

The class reads the official ``config.json`` of both Phi-3.5-vision-instruct and Phi-3-vision-128k-instruct as-is
(``model_type = "phi3_v"``, rope type ``"su"`` which transformers calls ``"longrope"``, ``embd_layer``,
``img_processor``). The CLIP tower is not described in the official file (the reference code hard-codes
CLIP ViT-L/14-336); we keep it in an optional ``vision_config`` dict so that tiny test models can shrink it.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import CLIPVisionConfig
from transformers.models.phi3.configuration_phi3 import Phi3Config

from phi3v_core.constants import (
    CONTEXT_LENGTH,
    CROP_SIZE,
    DEFAULT_ATTN,
    MODEL_PRESET_NAMES,
    TINY_HIDDEN_SIZE,
    TOKENS_PER_CROP,
)
from phi3v_core.errors import ConfigError
from phi3v_core.preset_files import official_preset

__all__ = [
    "CLIP_VIT_L14_336",
    "Phi3VConfig",
    "MODEL_PRESETS",
    "get_config",
    "phi35_vision_config",
    "phi3_vision_v1_config",
    "tiny_config",
]

#: The CLIP tower every Phi-3-vision checkpoint uses (hard-coded in the reference, not in config.json).
CLIP_VIT_L14_336: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": CROP_SIZE,
    "patch_size": 14,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "projection_dim": 768,
}

DEFAULT_EMBD_LAYER: dict[str, Any] = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}

DEFAULT_IMG_PROCESSOR: dict[str, Any] = {
    "image_dim_out": 1024,
    "model_name": "openai/clip-vit-large-patch14-336",
    "name": "clip_vision_model",
    "num_img_tokens": TOKENS_PER_CROP,
}

@dataclass(repr=False)
class Phi3VConfig(Phi3Config):
    """Configuration of :class:`~phi3v_core.model.Phi3VForCausalLM`.

    All Phi-3 decoder fields come from :class:`transformers.Phi3Config`. The additions are:

    Attributes:
        embd_layer: The official image-embedding block (HD transform, "sub_glb" order, MLP projection, separators).
        img_processor: The official vision-tower block; ``image_dim_out`` is the CLIP width, ``num_img_tokens`` = 144.
        vision_config: Optional CLIP overrides (keys of ``CLIPVisionConfig``); absent means CLIP ViT-L/14-336.
        vision_feature_layer: Which CLIP hidden state feeds the projector (the reference's ``layer_idx``, −2).
        skip_padded_crops: Run CLIP only on real crops (True) or on all ``num_crops + 1`` like the reference (False).
            Outputs are identical; it only changes compute.
    """

    model_type = "phi3_v"

    embd_layer: dict | None = None
    img_processor: dict | None = None
    vision_config: dict | None = None
    vision_feature_layer: int = -2
    skip_padded_crops: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        # Official files carry a rope_scaling with the legacy key "type"; transformers wants "rope_type" and
        # "original_max_position_embeddings" inside rope_parameters. Normalise once, here.
        super().__post_init__(**kwargs)
        rope = self.rope_parameters
        if isinstance(rope, dict) and rope:
            rope.pop("type", None)
            if rope.get("rope_type") in ("su", "yarn", "longrope"):
                rope["rope_type"] = "longrope"
                rope.setdefault("original_max_position_embeddings", self.original_max_position_embeddings)
        if self.embd_layer is None:
            self.embd_layer = dict(DEFAULT_EMBD_LAYER)
        if self.img_processor is None:
            self.img_processor = dict(DEFAULT_IMG_PROCESSOR)
        order = self.embd_layer.get("hd_transform_order", "sub_glb")
        if order != "sub_glb":
            raise ConfigError(f"embd_layer.hd_transform_order={order!r} is not supported; Phi-3.5-vision uses 'sub_glb'")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Phi3VConfig:
        """Read a config dict; a stored ``flash_attention_2`` that cannot run here becomes sdpa, with one warning.

        The official ``config.json`` files ask for ``flash_attention_2``, which needs the flash-attn package and an
        Ampere-or-newer GPU; without this a V100, T4 or CPU user could not load them at all. sdpa computes the same
        attention. An explicit ``attn_implementation=...`` argument is never changed (transformers then reports
        what is missing).
        """
        if "attn_implementation" in kwargs:
            # transformers would let the file's "_attn_implementation" overwrite the explicit choice; drop it.
            return super().from_dict({k: v for k, v in config_dict.items() if k != "_attn_implementation"}, **kwargs)
        stored = config_dict.get("_attn_implementation") or config_dict.get("attn_implementation")
        if stored == "flash_attention_2":
            from phi3v_core.device import flash_attention_usable

            if not flash_attention_usable():
                warnings.warn(
                    f"config.json asks for flash_attention_2, which needs the flash-attn package and an Ampere or "
                    f"newer GPU; using {DEFAULT_ATTN} instead (same results). Pass attn_implementation= to choose.",
                    UserWarning,
                    stacklevel=2,
                )
                config_dict = {**config_dict, "_attn_implementation": DEFAULT_ATTN}
                config_dict.pop("attn_implementation", None)
        return super().from_dict(config_dict, **kwargs)

    # -- derived sizes ---------------------------------------------------------------------------------------------
    def clip_config(self) -> CLIPVisionConfig:
        """The CLIP vision-tower config (ViT-L/14-336 unless ``vision_config`` overrides it)."""
        values = dict(CLIP_VIT_L14_336)
        values.update(self.vision_config or {})
        values["hidden_size"] = self.image_dim_out if not self.vision_config else values["hidden_size"]
        clip = CLIPVisionConfig(**values)
        clip._attn_implementation = self._attn_implementation or "eager"
        return clip

    @property
    def image_dim_out(self) -> int:
        """Width of one CLIP feature vector (1024 for ViT-L)."""
        return int((self.img_processor or DEFAULT_IMG_PROCESSOR)["image_dim_out"])

    @property
    def num_img_tokens(self) -> int:
        """Tokens per 336² crop after the 2×2 merge (144 = 12×12)."""
        return int((self.img_processor or DEFAULT_IMG_PROCESSOR).get("num_img_tokens", TOKENS_PER_CROP))

    @property
    def crop_grid(self) -> int:
        """Side of the merged feature grid of one crop (12 for 24×24 patches)."""
        return math.isqrt(self.num_img_tokens)


def _with_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> Phi3VConfig:
    values = copy.deepcopy(base)
    values.update(overrides)
    for key in ("auto_map", "architectures", "_name_or_path", "transformers_version", "torch_dtype", "model_type"):
        values.pop(key, None)
    # The official files ask for flash_attention_2, which needs a CUDA GPU and the flash-attn wheel; we default to
    # sdpa (same maths) and let callers pick explicitly.
    values.pop("_attn_implementation", None)
    attn = values.pop("attn_implementation", None) or DEFAULT_ATTN
    cfg = Phi3VConfig(**values)
    cfg._attn_implementation = attn
    return cfg


def phi35_vision_config(**overrides: Any) -> Phi3VConfig:
    """The official Phi-3.5-vision-instruct config (4,146,621,440 parameters)."""
    return _with_overrides(official_preset("phi-3.5-vision")["config"], overrides)


def phi3_vision_v1_config(**overrides: Any) -> Phi3VConfig:
    """The official Phi-3-vision-128k-instruct (v1) config: same shapes, other rope factors and window."""
    return _with_overrides(official_preset("phi-3-vision")["config"], overrides)


def tiny_config(**overrides: Any) -> Phi3VConfig:
    """A tiny model of the exact same structure for CPU tests and the default benchmark.

    It keeps the real vocabulary (so real token ids work), 336² crops with 14-pixel patches (so the 24×24 → 12×12
    merge and the 144-tokens-per-crop formula hold), LongRoPE, and the CLIP "second-to-last layer" rule.
    """
    head_dim = 16
    base = {
        "vocab_size": 32064,
        "hidden_size": TINY_HIDDEN_SIZE,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": CONTEXT_LENGTH,
        "original_max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "su",
            "long_factor": [1.0 + 0.5 * i for i in range(head_dim // 2)],
            "short_factor": [1.0 + 0.1 * i for i in range(head_dim // 2)],
        },
        "sliding_window": 262144,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 32000,
        "tie_word_embeddings": False,
        "embd_layer": dict(DEFAULT_EMBD_LAYER),
        "img_processor": {**DEFAULT_IMG_PROCESSOR, "image_dim_out": 32},
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
        },
    }
    return _with_overrides(base, overrides)


#: Model presets by name: random-init configs of the official shapes (not the recipe's hyper-parameter presets, which
#: live in recipe.json). The names are :data:`phi3v_core.constants.MODEL_PRESET_NAMES`.
MODEL_PRESETS: dict[str, Callable[..., Phi3VConfig]] = dict(
    zip(MODEL_PRESET_NAMES, (tiny_config, phi35_vision_config, phi3_vision_v1_config), strict=True)
)


def get_config(name_or_path: str | Path, **overrides: Any) -> Phi3VConfig:
    """Return a preset config by name, or read ``config.json`` from a local checkpoint folder.

    Args:
        name_or_path: ``"tiny"``, ``"phi-3.5-vision"``, ``"phi-3-vision"`` or a folder holding ``config.json``.
        **overrides: Config fields to override (e.g. ``attn_implementation="eager"``).

    Raises:
        ConfigError: Unknown preset or missing/invalid folder.
    """
    key = str(name_or_path)
    if key in MODEL_PRESETS:
        return MODEL_PRESETS[key](**overrides)
    path = Path(key)
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.is_file():
        raise ConfigError(
            f"model {key!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a folder with config.json; "
            "pass a preset name or a local checkpoint folder"
        )
    try:
        values = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{cfg_file}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    if values.get("model_type") not in ("phi3_v", None):
        raise ConfigError(f"{cfg_file}: model_type is {values.get('model_type')!r}, expected 'phi3_v'")
    return _with_overrides(values, overrides)
