"""Model shapes and parameter counts, without importing torch or transformers.

The planner has to answer in well under three seconds, and importing ``phi3v_core.config`` pulls in transformers
(several seconds). So the planner works on a :class:`ModelShape`: the handful of integers that size every tensor.
It is built from a :class:`~phi3v_core.config.Phi3VConfig` (:meth:`ModelShape.from_config`), from a checkpoint's
``config.json`` read as plain JSON, or from the preset table ``planner/data/models.json``; a test checks that the
table equals ``get_config(preset)`` field by field, so it cannot drift from the model code.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from phi3v_core.constants import CROP_SIZE, TOKENS_PER_CROP, hd_crop_grid, image_token_count
from phi3v_core.errors import ConfigError
from phi3v_core.methods import LORA, Adapter, Method, get_method

__all__ = ["CROP_SIZE", "ModelShape", "ParamCounts", "hd_crop_grid", "image_token_count", "load_shape"]



@dataclass(frozen=True)
class ModelShape:
    """Every dimension that sizes a Phi-3(.5)-vision tensor.

    Attributes:
        name: Preset name or checkpoint folder.
        vocab_size: Token vocabulary (32064).
        hidden_size: LM width (3072).
        intermediate_size: LM MLP width (8192); ``gate_up_proj`` produces twice this.
        num_layers: LM decoder layers (32).
        num_heads: LM attention heads (32).
        num_kv_heads: LM key/value heads (32).
        tie_word_embeddings: Whether ``lm_head`` shares the embedding (False for Phi-3-vision).
        vision_hidden: CLIP width (1024).
        vision_intermediate: CLIP MLP width (4096).
        vision_layers: CLIP encoder layers in the checkpoint (24).
        vision_heads: CLIP heads (16).
        vision_feature_layer: Which CLIP hidden state feeds the projector (−2: all but the last layer run).
        image_size: CLIP input side (336).
        patch_size: CLIP patch side (14).
        num_img_tokens: LM tokens per crop after the 2×2 merge (144).
    """

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    vision_feature_layer: int
    image_size: int
    patch_size: int
    num_img_tokens: int

    # -- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any, name: str = "") -> ModelShape:
        """Read the shape from a :class:`phi3v_core.config.Phi3VConfig` (the source of truth)."""
        clip = config.clip_config()
        return cls(
            name=name or str(getattr(config, "name_or_path", "") or "custom"),
            vocab_size=int(config.vocab_size),
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_layers=int(config.num_hidden_layers),
            num_heads=int(config.num_attention_heads),
            num_kv_heads=int(config.num_key_value_heads or config.num_attention_heads),
            tie_word_embeddings=bool(config.tie_word_embeddings),
            vision_hidden=int(clip.hidden_size),
            vision_intermediate=int(clip.intermediate_size),
            vision_layers=int(clip.num_hidden_layers),
            vision_heads=int(clip.num_attention_heads),
            vision_feature_layer=int(config.vision_feature_layer),
            image_size=int(clip.image_size),
            patch_size=int(clip.patch_size),
            num_img_tokens=int(config.num_img_tokens),
        )

    @classmethod
    def from_config_json(cls, values: dict[str, Any], name: str) -> ModelShape:
        """Read the shape from a checkpoint's ``config.json`` dict (no transformers needed).

        Official files do not describe the CLIP tower (the reference hard-codes ViT-L/14-336); an optional
        ``vision_config`` dict overrides it, as :class:`~phi3v_core.config.Phi3VConfig` does.
        """
        clip = dict(_preset_table()["clip_vit_l14_336"])
        clip.update(values.get("vision_config") or {})
        img = values.get("img_processor") or {}
        if not values.get("vision_config") and img.get("image_dim_out"):
            clip["hidden_size"] = int(img["image_dim_out"])
        try:
            return cls(
                name=name,
                vocab_size=int(values["vocab_size"]),
                hidden_size=int(values["hidden_size"]),
                intermediate_size=int(values["intermediate_size"]),
                num_layers=int(values["num_hidden_layers"]),
                num_heads=int(values["num_attention_heads"]),
                num_kv_heads=int(values.get("num_key_value_heads") or values["num_attention_heads"]),
                tie_word_embeddings=bool(values.get("tie_word_embeddings", False)),
                vision_hidden=int(clip["hidden_size"]),
                vision_intermediate=int(clip["intermediate_size"]),
                vision_layers=int(clip["num_hidden_layers"]),
                vision_heads=int(clip["num_attention_heads"]),
                vision_feature_layer=int(values.get("vision_feature_layer", -2)),
                image_size=int(clip.get("image_size", CROP_SIZE)),
                patch_size=int(clip.get("patch_size", 14)),
                num_img_tokens=int(img.get("num_img_tokens", TOKENS_PER_CROP)),
            )
        except KeyError as exc:
            raise ConfigError(
                f"{name}: config.json lacks {exc.args[0]!r}; is this a Phi-3-vision checkpoint?"
            ) from None

    @classmethod
    def preset(cls, name: str) -> ModelShape:
        """One of the presets of :func:`phi3v_core.config.get_config` (``tiny``, ``phi-3.5-vision``, ``phi-3-vision``)."""
        table = _preset_table()["presets"]
        if name not in table:
            raise ConfigError(
                f"unknown model preset {name!r}; choose one of {', '.join(table)} or pass a checkpoint folder"
            )
        return cls(name=name, **table[name])

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for JSON output and trace cache keys)."""
        return asdict(self)

    # -- derived sizes ---------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """LM head dimension (96)."""
        return self.hidden_size // self.num_heads

    @property
    def q_out(self) -> int:
        """Width of the query projection."""
        return self.num_heads * self.head_dim

    @property
    def kv_out(self) -> int:
        """Width of one of the key/value projections."""
        return self.num_kv_heads * self.head_dim

    @property
    def vision_used_layers(self) -> int:
        """CLIP layers that run (the rest are dead weight): 23 of 24 for layer −2."""
        layer = self.vision_feature_layer
        return layer if layer >= 0 else self.vision_layers + 1 + layer

    @property
    def patches_per_crop(self) -> int:
        """CLIP sequence length of one crop, CLS included (577)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def crop_side(self) -> int:
        """Merged grid side per crop (12)."""
        return math.isqrt(self.num_img_tokens)

    def param_counts(self) -> ParamCounts:
        """Parameter counts per block, from the shapes alone."""
        h, inter, vocab = self.hidden_size, self.intermediate_size, self.vocab_size
        qkv = h * (self.q_out + 2 * self.kv_out)
        lm_layer_linear = qkv + self.q_out * h + h * 2 * inter + inter * h
        lm_layer = lm_layer_linear + 2 * h
        hv, iv = self.vision_hidden, self.vision_intermediate
        clip_layer_linear_w = 4 * hv * hv + 2 * hv * iv
        clip_layer = clip_layer_linear_w + 4 * hv + iv + hv + 4 * hv  # + linear biases + 2 LayerNorms
        clip_embeddings = hv + hv * 3 * self.patch_size**2 + self.patches_per_crop * hv
        merged = 4 * hv
        return ParamCounts(
            embed=vocab * h,
            lm_layers=self.num_layers * lm_layer,
            lm_layer_linear=self.num_layers * lm_layer_linear,
            lm_norm=h,
            lm_head=0 if self.tie_word_embeddings else vocab * h,
            vision_embeddings=clip_embeddings,
            vision_pre_norm=2 * hv,
            vision_layers_used=self.vision_used_layers * clip_layer,
            vision_layer_linear_used=self.vision_used_layers * clip_layer_linear_w,
            vision_dead=(self.vision_layers - self.vision_used_layers) * clip_layer + 2 * hv,
            vision_layer_linear_dead=(self.vision_layers - self.vision_used_layers) * clip_layer_linear_w,
            projector_0=merged * h + h,
            projector_2=h * h + h,
            projector_2_weight=h * h,
            separators=2 * merged,
        )

    def adapted_linears(self, lm_head: bool = True, vision: bool = True) -> list[tuple[int, int, int]]:
        """``(count, fan_in, fan_out)`` of each kind of linear layer the adapters target (the recipe's targets).

        LM ``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj`` in every layer, ``lm_head`` when asked, and
        unless ``vision`` is False the live CLIP layers' ``q/k/v/out_proj``, ``fc1``, ``fc2`` and both projector
        linears (``phi3v_core.methods.lora``).
        """
        h, inter, layers = self.hidden_size, self.intermediate_size, self.num_layers
        out = [
            (layers, h, self.q_out + 2 * self.kv_out),
            (layers, self.q_out, h),
            (layers, h, 2 * inter),
            (layers, inter, h),
        ]
        if lm_head:
            out.append((1, h, self.vocab_size))
        if vision:
            hv, iv, used = self.vision_hidden, self.vision_intermediate, self.vision_used_layers
            out += [(4 * used, hv, hv), (used, hv, iv), (used, iv, hv), (1, 4 * hv, h), (1, h, h)]
        return out

    def lora_params(self, rank: int, lm_head: bool = True, vision: bool = True, adapter: Adapter = LORA) -> int:
        """Trainable adapter parameters on the targets of :meth:`adapted_linears` (LoRA: A and B)."""
        return sum(n * adapter.params(rank, fan_in, fan_out) for n, fan_in, fan_out in self.adapted_linears(lm_head, vision))


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one model, per block (the official total: the checkpoint's model.safetensors.index.json)."""

    embed: int
    lm_layers: int
    lm_layer_linear: int
    lm_norm: int
    lm_head: int
    vision_embeddings: int
    vision_pre_norm: int
    vision_layers_used: int
    vision_layer_linear_used: int
    vision_dead: int
    vision_layer_linear_dead: int
    projector_0: int
    projector_2: int
    projector_2_weight: int
    separators: int

    @property
    def language_model(self) -> int:
        """Embedding, decoder layers, final norm and head."""
        return self.embed + self.lm_layers + self.lm_norm + self.lm_head

    @property
    def vision(self) -> int:
        """CLIP tower including its dead last layer and ``post_layernorm``."""
        return self.vision_embeddings + self.vision_pre_norm + self.vision_layers_used + self.vision_dead

    @property
    def projector(self) -> int:
        """Projector MLP plus the two separators."""
        return self.projector_0 + self.projector_2 + self.separators

    @property
    def total(self) -> int:
        """All parameters in the checkpoint."""
        return self.language_model + self.vision + self.projector

    def trainable(self, method: Method | str, lora_params: int = 0) -> int:
        """Parameters that get gradients and optimizer state under ``method``.

        ``full`` trains everything except the dead CLIP weights; ``frozen_vision`` trains the language model incl.
        its embedding (``phi3v_core.methods.freeze``); adapter methods train only the adapters (``lora_params``).

        Raises:
            ConfigError: Unknown method name.
        """
        spec = get_method(method) if isinstance(method, str) else method
        if spec.uses_lora:
            return lora_params
        if spec.trains_vision:
            return self.total - self.vision_dead
        return self.language_model

    def quantizable(self) -> int:
        """Weights QLoRA stores as nf4: every ``nn.Linear`` weight except ``lm_head`` (both projector layers included,
        as transformers' bitsandbytes defaults do for the recipe and ``phi3v_core.methods.QLORA_SKIP`` does)."""
        projector_bias = self.projector_2 - self.projector_2_weight  # both projector layers have an h-wide bias
        return (
            self.lm_layer_linear
            + self.vision_layer_linear_used
            + self.vision_layer_linear_dead
            + self.projector_0
            - projector_bias
            + self.projector_2_weight
        )

    def to_dict(self) -> dict[str, int]:
        """Counts per block plus totals."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(language_model=self.language_model, vision=self.vision, projector=self.projector, total=self.total)
        return out


@cache
def _preset_table() -> dict[str, Any]:
    return json.loads(resources.files("planner").joinpath("data/models.json").read_text())


def load_shape(model: str) -> ModelShape:
    """A preset name or a checkpoint folder (its ``config.json`` is read as JSON, without transformers).

    Raises:
        ConfigError: Neither a preset nor a folder with a readable ``config.json``.
    """
    if model in _preset_table()["presets"]:
        return ModelShape.preset(model)
    path = Path(model)
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.is_file():
        presets = ", ".join(_preset_table()["presets"])
        raise ConfigError(f"--model {model!r} is neither a preset ({presets}) nor a folder with config.json")
    try:
        values = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{cfg_file}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    return ModelShape.from_config_json(values, name=str(path))
