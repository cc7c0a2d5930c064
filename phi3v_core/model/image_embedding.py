"""The HD image embedding of Phi-3(.5)-vision: CLIP features → 2×2 merge → crop grid with separators → MLP projection.

Everything here follows the checkpoint's remote code (huggingface.co/microsoft/Phi-3.5-vision-instruct, modeling_phi3_v.py) (``Phi3ImageEmbedding``). The layout of every image (its crop grid) comes from the caller as plain
Python integers, so the forward pass has no data-dependent shapes and no host syncs: it runs under ``FakeTensorMode``
and on the meta device, which the planner relies on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.activations import QuickGELUActivation

from phi3v_core.config import Phi3VConfig
from phi3v_core.constants import CROP_SIZE, crop_grid_of_padded, image_token_count
from phi3v_core.model.clip_layers import clip_layer_without_graph, holds_cpu_data, uses_graph_free_layers

__all__ = ["Phi3ImageEmbedding", "ImageLayout", "crop_grid_of", "image_token_count"]

#: (H, W) of the padded HD image, both multiples of 336.
ImageLayout = Sequence[tuple[int, int]]


def crop_grid_of(image_sizes: torch.Tensor | ImageLayout) -> list[tuple[int, int]]:
    """Return the (rows, cols) crop grid of each image from its padded HD size.

    Accepts the reference's ``image_sizes`` tensor (converted once on the host) or a list of ``(H, W)`` ints, which is
    what our collator emits so that no device tensor is ever read back.

    Raises:
        ImageSizeError: A size that is not a positive multiple of 336.
    """
    if isinstance(image_sizes, torch.Tensor):
        sizes = [tuple(int(v) for v in row) for row in image_sizes.detach().cpu().tolist()]
    else:
        sizes = [(int(h), int(w)) for h, w in image_sizes]
    return [crop_grid_of_padded(h, w) for h, w in sizes]


class QuickGELU(nn.Module):
    """CLIP's ``x * sigmoid(1.702 x)``, bit-identical to transformers' ``QuickGELUActivation``.

    Where no gradient flows through it (a frozen tower, inference) it works in one buffer instead of three: the two
    temporaries of the plain form are each a fresh (crops, 577, 4096) allocation whose first touch costs more than
    the arithmetic on the CPU (measured 91 → 42 ms per call at 5 crops, 2 threads). With a gradient it keeps the plain
    form, whose backward needs the unmodified sigmoid.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(1.702 * x)
        out = x.mul(1.702)
        out.sigmoid_()
        return out.mul_(x)


class ClipTower(nn.Module):
    """Holds transformers' ``CLIPVisionModel`` under the attribute name the checkpoint uses (``vision_model``)."""

    def __init__(self, clip_config: CLIPVisionConfig) -> None:
        super().__init__()
        self.vision_model = CLIPVisionModel(clip_config)
        for mlp in self.vision_model.modules():
            if isinstance(getattr(mlp, "activation_fn", None), QuickGELUActivation):
                mlp.activation_fn = QuickGELU()


class Phi3ImageEmbedding(nn.Module):
    """CLIP ViT tower, learnable separators and the projector, with checkpoint-identical parameter names.

    Submodules: ``img_processor`` (a transformers ``CLIPVisionModel``), ``img_projection`` (Linear–GELU–Linear),
    ``glb_GN`` and ``sub_GN``. Unlike the reference it does not hold the token embedding (no duplicate ``wte`` key).
    """

    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__()
        clip_config = config.clip_config()
        self.img_processor = ClipTower(clip_config)
        self.image_dim_out = clip_config.hidden_size
        self.crop_side = config.crop_grid  # 12: merged 2×2 cells per crop side
        merged_dim = self.image_dim_out * 4
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, merged_dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, merged_dim))
        self.img_projection = nn.Sequential(
            nn.Linear(merged_dim, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )
        num_layers = clip_config.num_hidden_layers
        layer_idx = config.vision_feature_layer
        # hidden_states[k] is the output of the first k encoder layers; index -2 means all but the last one.
        self.num_used_layers = layer_idx if layer_idx >= 0 else num_layers + 1 + layer_idx
        if not 0 < self.num_used_layers <= num_layers:
            raise ValueError(f"vision_feature_layer={layer_idx} is outside the {num_layers}-layer CLIP tower")
        self.skip_padded_crops = config.skip_padded_crops

    # -- CLIP ------------------------------------------------------------------------------------------------------
    def clip_features(self, crops: torch.Tensor) -> torch.Tensor:
        """Patch features of CLIP's ``hidden_states[vision_feature_layer]`` without CLS: (n, 576, D).

        Runs only the encoder layers that feed the features; the remaining layer(s) and ``post_layernorm`` are dead
        weight kept for checkpoint compatibility. Without a graph on the CPU, for batches whose MLP activation is large,
        the layers run in fewer, smaller buffers (``clip_layers``).
        """
        vision = self.img_processor.vision_model
        hidden = vision.embeddings(crops.to(vision.embeddings.patch_embedding.weight.dtype))
        hidden = vision.pre_layrnorm(hidden)
        layers = vision.encoder.layers[: self.num_used_layers]
        if uses_graph_free_layers(vision, hidden):
            for layer in layers:
                hidden = clip_layer_without_graph(layer, hidden)
            return hidden[:, 1:]
        for layer in layers:
            hidden = layer(hidden, None)
            if isinstance(hidden, tuple):  # older transformers returned tuples
                hidden = hidden[0]
        return hidden[:, 1:]

    def dead_parameter_names(self, prefix: str = "") -> set[str]:
        """Names of parameters that never get a gradient (unused CLIP layers and ``post_layernorm``)."""
        dead_modules = [("post_layernorm", self.img_processor.vision_model.post_layernorm)]
        layers = self.img_processor.vision_model.encoder.layers
        dead_modules += [(f"encoder.layers.{i}", layers[i]) for i in range(self.num_used_layers, len(layers))]
        base = f"{prefix}img_processor.vision_model."
        return {f"{base}{mod_name}.{p}" for mod_name, mod in dead_modules for p, _ in mod.named_parameters()}

    # -- layout ----------------------------------------------------------------------------------------------------
    def _merge_2x2(self, feats: torch.Tensor) -> torch.Tensor:
        """(n, 576, D) → (n, 12, 12, 4D), concatenating each 2×2 cell as TL, TR, BL, BR."""
        n, num_patches, dim = feats.shape
        side = self.crop_side
        feats = feats.reshape(n, side, 2, side, 2, dim)  # (n, gy, dy, gx, dx, D)
        feats = feats.permute(0, 1, 3, 2, 4, 5)  # (n, gy, gx, dy, dx, D)
        return feats.reshape(n, side, side, 4 * dim)

    def _grid_with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """Append ``sub_GN`` after every row of an (R, C, 4D) grid and flatten row-major: (R·(C+1), 4D)."""
        rows = grid.shape[0]
        newline = self.sub_GN.reshape(1, 1, -1).expand(rows, 1, -1).to(grid.dtype)
        return torch.cat([grid, newline], dim=1).reshape(-1, grid.shape[-1])

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | ImageLayout) -> torch.Tensor:
        """Projected features of all images, concatenated in image order: (Σ N_i, hidden).

        Args:
            pixel_values: (n_img, num_crops + 1, 3, 336, 336); crop 0 is the global image, then row-major crops,
                then zero padding.
            image_sizes: Padded HD size (H, W) per image, as a tensor or a list of int pairs.
        """
        n_img, n_slots, channels, height, width = pixel_values.shape
        if (channels, height, width) != (3, CROP_SIZE, CROP_SIZE):
            raise ValueError(f"pixel_values crops must be 3×{CROP_SIZE}×{CROP_SIZE}, got {channels}×{height}×{width}")
        grids = crop_grid_of(image_sizes)
        if len(grids) != n_img:
            raise ValueError(f"{n_img} images in pixel_values but {len(grids)} image_sizes")
        for rows, cols in grids:
            if rows * cols + 1 > n_slots:
                raise ValueError(f"image with a {rows}×{cols} crop grid needs {rows * cols + 1} crops, got {n_slots}")

        if self.skip_padded_crops:
            # Only real crops go through CLIP; the reference also encodes the zero padding and discards it.
            used = [1 + rows * cols for rows, cols in grids]
            crops = torch.cat([pixel_values[i, :count] for i, count in enumerate(used)], dim=0)
            offsets = [sum(used[:i]) for i in range(n_img)]
        else:
            crops = pixel_values.reshape(n_img * n_slots, channels, height, width)
            offsets = [i * n_slots for i in range(n_img)]

        merged = self._merge_2x2(self.clip_features(crops))  # (n_crops, 12, 12, 4D)
        side = self.crop_side
        pieces = []
        for (rows, cols), start in zip(grids, offsets):
            subs = merged[start + 1 : start + 1 + rows * cols]
            sub_grid = subs.reshape(rows, cols, side, side, -1).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, -1)
            pieces.append(self._grid_with_newlines(sub_grid))
            pieces.append(self.glb_GN.reshape(1, -1).to(merged.dtype))
            pieces.append(self._grid_with_newlines(merged[start]))
        features = torch.cat(pieces, dim=0)
        weight = self.img_projection[0].weight
        # A 4-bit (QLoRA) projector stores packed uint8 weights; its layer casts inputs itself.
        projector_dtype = weight.dtype if weight.is_floating_point() else features.dtype
        return self.img_projection(features.to(projector_dtype))

    def forward(
        self,
        input_ids: torch.LongTensor,
        text_embeds: torch.Tensor,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | ImageLayout,
    ) -> torch.Tensor:
        """Replace placeholder positions (ids < 0) of ``text_embeds`` with image features, in row-major order.

        The scatter is written as gather + ``where`` so the shapes never depend on data: every position picks the
        feature row ``cumsum(mask) - 1`` and non-placeholder positions keep their text embedding.
        """
        features = self.image_features(pixel_values, image_sizes).to(text_embeds.dtype)
        is_image = input_ids < 0
        _check_placeholder_count(is_image, features.shape[0])
        flat_mask = is_image.reshape(-1)
        row = (torch.cumsum(flat_mask.to(torch.long), dim=0) - 1).clamp(min=0, max=features.shape[0] - 1)
        gathered = features.index_select(0, row).reshape(*input_ids.shape, -1)
        return torch.where(is_image.unsqueeze(-1), gathered, text_embeds)


def _check_placeholder_count(is_image: torch.Tensor, num_features: int) -> None:
    """Fail loudly when placeholders and features disagree — only where the check costs no device sync."""
    if not holds_cpu_data(is_image):
        return
    placeholders = int(is_image.sum())
    if placeholders != num_features:
        raise ValueError(
            f"input_ids hold {placeholders} image placeholder tokens but the images produce {num_features} features; "
            "build inputs with Phi3VProcessor so that tags, images and num_crops agree"
        )

