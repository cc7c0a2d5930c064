"""CLIP encoder layers without an autograd graph on the CPU: the same arithmetic in fewer, smaller buffers.

A frozen tower (LoRA, QLoRA, frozen-vision) and inference build no graph through CLIP, so nothing needs the
intermediate tensors transformers' ``CLIPEncoderLayer`` keeps apart. On the CPU their size is what costs: at 5 crops
the MLP's (5, 577, 4096) fp32 activation is 47 MB, above glibc's largest mmap threshold (32 MB), so every layer maps
fresh pages and faults them in (about 13 ms per buffer on a 2-core Xeon, against 1 ms to refill a warm one). Here the
layer runs two crops at a time and the MLP one crop at a time (9 MB), the residual adds land in the running hidden
state, and the attention gets contiguous heads, which PyTorch's CPU flash kernel reads faster than strided views.
Results match the plain layer bit for bit on the machines we test (``tests/core/test_model.py``); GPUs keep
transformers' layer, and so does the planner's memory trace (fake tensors standing for a GPU run).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip.modeling_clip import eager_attention_forward

__all__ = ["MMAP_CEILING_BYTES", "clip_layer_without_graph", "holds_cpu_data", "uses_graph_free_layers"]


def holds_cpu_data(tensor: torch.Tensor) -> bool:
    """True for a real CPU tensor; false on an accelerator, on the meta device and for a fake tensor (the planner's
    memory trace, which stands for a GPU run on fake CPU tensors)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return tensor.device.type == "cpu" and not isinstance(tensor, FakeTensor)


#: glibc's largest mmap threshold: a buffer above it is mapped fresh, and its pages faulted in, on every allocation.
MMAP_CEILING_BYTES = 32 * 2**20


def uses_graph_free_layers(tower: nn.Module, hidden: torch.Tensor) -> bool:
    """True when ``tower`` (a ``CLIPVisionModel``) on ``hidden`` holds real CPU data, records no graph, drops nothing,
    and the batch's MLP activation would be larger than :data:`MMAP_CEILING_BYTES`. Below that size transformers'
    layer is as fast or faster: the split only adds calls (1.03–1.15× slower for the tiny test model's tower)."""
    if not holds_cpu_data(hidden) or (tower.training and tower.config.attention_dropout > 0):
        return False
    crops, tokens, _ = hidden.shape
    if crops * tokens * tower.config.intermediate_size * hidden.element_size() <= MMAP_CEILING_BYTES:
        return False
    if not torch.is_grad_enabled():
        return True
    return not hidden.requires_grad and not any(p.requires_grad for p in tower.parameters())


#: Crops per attention call: two keep each head-major copy near 5 MB at ViT-L width. Tower time against transformers'
#: layers on a 2-core Xeon, alternating in one process: at 5 crops 0.90× (groups of 4: 0.94×, the whole batch: 0.94×);
#: at 17 crops 1.00× (one crop: 1.02×; the whole batch, whose 40 MB copies fault fresh pages: 1.04×).
CROPS_PER_ATTENTION = 2


def clip_layer_without_graph(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """One ``CLIPEncoderLayer`` on (crops, tokens, D) without a graph; ``hidden`` is updated in place and returned.

    The caller owns ``hidden`` (the tower's running state), so adding the residual branches into it is safe.
    """
    mlp = layer.mlp
    for group in hidden.split(CROPS_PER_ATTENTION):
        group.add_(_attention(layer.self_attn, layer.layer_norm1(group)))
        for crop in group:
            crop.add_(mlp.fc2(mlp.activation_fn(mlp.fc1(layer.layer_norm2(crop)))))
    return hidden


def _attention(attn: nn.Module, normed: torch.Tensor) -> torch.Tensor:
    """``CLIPAttention`` through the configured attention function, with contiguous heads; no mask, no dropout."""
    crops, tokens, dim = normed.shape
    heads = (crops, tokens, attn.num_heads, attn.head_dim)
    query, key, value = (proj(normed).view(heads).transpose(1, 2).contiguous()
                         for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    out, _ = attend(attn, query, key, value, None, scaling=attn.scale, dropout=0.0)
    return attn.out_proj(out.reshape(crops, tokens, dim))
