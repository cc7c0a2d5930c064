"""LongRoPE per sample: Phi-3's rotary embedding, choosing short or long factors for each packed sample on its own.

transformers' Phi-3 rotary embedding picks one factor set for the whole batch from ``max(position_ids) + 1``. With
position ids restarting per packed sample that is the longest *sample*, still shared by every sample of the batch;
unpacked, each sample would use the long factors only when it alone is longer than
``original_max_position_embeddings``. Given a per-token choice (:attr:`SampleRotaryEmbedding.long_tokens`, set by the
model from :class:`~phi3v_core.processing.packing.PackInfo`), this class computes cos/sin per token with exactly
the arithmetic of transformers' forward (an element-wise product, so the values are bit for bit those of the sample
computed alone). Without a choice it is transformers' class unchanged.
"""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

__all__ = ["SampleRotaryEmbedding"]


class SampleRotaryEmbedding(Phi3RotaryEmbedding):
    """``Phi3RotaryEmbedding`` whose LongRoPE factor choice can be given per token (see the module docstring).

    Attributes:
        long_tokens: ``None`` (transformers' rule), or a (batch, seq) bool tensor: True where the token's sample is
            longer than ``original_max_position_embeddings``. Set only for the duration of one forward.
    """

    long_tokens: torch.Tensor | None = None

    @property
    def original_max_positions(self) -> int | None:
        """LongRoPE's switch length, or ``None`` when the rope is not LongRoPE."""
        if self.rope_type != "longrope":
            return None
        return int(self.config.rope_parameters["original_max_position_embeddings"])

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of ``position_ids``: per token when :attr:`long_tokens` is set, else as transformers does."""
        limit = self.original_max_positions
        if self.long_tokens is None or limit is None:
            return super().forward(x, position_ids)
        short = self.original_inv_freq.to(device=x.device, dtype=torch.float)
        # The same call transformers' dynamic update makes for the long set (seq_len just past the switch).
        long, _ = ROPE_INIT_FUNCTIONS["longrope"](self.config, x.device, seq_len=limit + 1)
        inv_freq = torch.where(self.long_tokens.to(x.device)[..., None], long.to(torch.float), short)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)
