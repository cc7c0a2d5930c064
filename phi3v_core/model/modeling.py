"""Phi-3(.5)-vision on top of transformers' own ``Phi3Model`` and ``CLIPVisionModel`` (no remote code).

Parameter names equal the official checkpoint's 592 tensor names: the decoder is a ``Phi3Model`` at ``model.``, the
image embedding sits at ``model.vision_embed_tokens``, and ``lm_head`` is separate. The reference keeps a second
reference to ``embed_tokens`` inside the image module (``wte``), which makes ``save_pretrained`` fail on shared
tensors; we don't.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint
from transformers import GenerationConfig
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.phi3.modeling_phi3 import Phi3ForCausalLM, Phi3Model, Phi3PreTrainedModel

from phi3v_core.config import Phi3VConfig
from phi3v_core.constants import LOSS_CHUNK_TOKENS
from phi3v_core.model.image_embedding import ImageLayout, Phi3ImageEmbedding
from phi3v_core.model.rope import SampleRotaryEmbedding

if TYPE_CHECKING:
    from phi3v_core.processing.packing import PackInfo

__all__ = ["LOSS_CHUNK_TOKENS", "Phi3VModel", "Phi3VForCausalLM", "STOP_TOKEN_IDS", "dead_parameter_names"]

#: Generation stops on <|endoftext|> (tokenizer eos), <|end|> (turn end) and </s> (config eos), as the checkpoint's generation_config.json lists them.
STOP_TOKEN_IDS = (32000, 32007, 2)
IGNORE_INDEX = -100


class _SeparatorInit:
    """``_init_weights`` of both classes: transformers' init plus a small random init of the image separators.

    Each class initialises its own modules in its own ``post_init`` (a module is initialised once, then flagged), so
    the decoder-with-images needs the rule as much as the causal LM around it.
    """

    config: Phi3VConfig

    def _init_weights(self, module: torch.nn.Module) -> None:
        super()._init_weights(module)  # type: ignore[misc]
        if isinstance(module, Phi3ImageEmbedding):
            # The official init is zeros; a small random init keeps tiny random models sensitive to the separators.
            std = self.config.initializer_range
            torch.nn.init.normal_(module.glb_GN, std=std)
            torch.nn.init.normal_(module.sub_GN, std=std)


class Phi3VModel(_SeparatorInit, Phi3Model):
    """The Phi-3 decoder with the HD image embedding in front of it."""

    config_class = Phi3VConfig
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]

    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__(config)  # builds and initialises the decoder (Phi3Model ends with post_init)
        # Same buffers and names as transformers' (none persistent); also chooses LongRoPE's factors per packed sample.
        self.rotary_emb = SampleRotaryEmbedding(config=config)
        self.vision_embed_tokens = Phi3ImageEmbedding(config)
        self.post_init()  # initialises the image embedding; the decoder is already flagged as initialised

    def embed(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | ImageLayout | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features written into the placeholder (negative id) positions."""
        # Placeholders are negative ids; clamp them to a valid row before the lookup (their rows are overwritten).
        text_embeds = self.embed_tokens(input_ids.clamp(min=0))
        if pixel_values is None:
            return text_embeds
        if image_sizes is None:
            raise ValueError("pixel_values were given without image_sizes")
        return self.vision_embed_tokens(input_ids, text_embeds, pixel_values, image_sizes)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,  # noqa: ANN001 - transformers Cache
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | ImageLayout | None = None,
        packing: PackInfo | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """The decoder over text and image embeddings; ``packing`` marks a packed batch (see :mod:`~phi3v_core.processing.packing`)."""
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.device.type == "meta":
            # transformers inspects the padding mask's values to pick a fast path; meta tensors have none. Shapes
            # and compute are the same without it, which is all a meta-device trace measures.
            attention_mask = None
        if packing is not None:
            _check_packed(attention_mask, position_ids, cache, use_cache)
            use_cache = False  # None would become the config's True: a cache hides the packing from the mask
            limit = self.rotary_emb.original_max_positions
            if limit is not None:
                self.rotary_emb.long_tokens = packing.long_rope_tokens(limit)
        try:
            return super().forward(
                input_ids=None,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )
        finally:
            self.rotary_emb.long_tokens = None


class Phi3VForCausalLM(_SeparatorInit, Phi3ForCausalLM):
    """Phi-3(.5)-vision for causal LM training and generation.

    Inputs follow the reference: ``input_ids`` with negative placeholder ids, ``pixel_values`` of shape
    (n_img, num_crops + 1, 3, 336, 336) in placeholder order, and ``image_sizes`` — as a tensor or, preferably, as a
    list of (H, W) ints so that the image layout never has to be read back from the device. Logits are fp32 like the
    reference (which matters for memory: 4 bytes × vocab per token).

    In training (``model.train()`` and ``labels`` given) ``lm_head`` and the cross-entropy run only at the positions
    that predict a label, in chunks of :data:`LOSS_CHUNK_TOKENS`, and the output carries the loss without logits:
    the same loss and gradients as the full computation without a [sequence × vocabulary] fp32 tensor. Set
    ``supervised_logits = False`` on the model for the full computation (the recipe's, e.g. to measure the
    difference). Evaluation (``model.eval()``), calls without labels and ``generate()`` return logits for all
    positions as before.
    """

    #: Training computes logits only at supervised positions (see the class docstring).
    supervised_logits: bool = True
    #: ``(lm_head weight, hidden, targets) -> summed loss`` that fuses the head and the cross-entropy (``--kernels
    #: liger``, :mod:`phi3v_core.kernels`); used by :meth:`supervised_loss` while ``lm_head`` is a plain Linear.
    fused_linear_loss = None

    config_class = Phi3VConfig
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]
    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: Phi3VConfig) -> None:
        # Phi3ForCausalLM.__init__ would build and initialise a plain Phi3Model only for us to replace it (twice the
        # init time, and a transient second decoder on the device); set up the same attributes ourselves instead.
        Phi3PreTrainedModel.__init__(self, config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.generation_config = GenerationConfig(
            bos_token_id=1, eos_token_id=list(STOP_TOKEN_IDS), pad_token_id=config.pad_token_id or 32000
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,  # noqa: ANN001 - transformers Cache
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | ImageLayout | None = None,
        packing: PackInfo | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            packing=packing,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:, :]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep, :]
        loss = None
        if labels is not None and self.training and self.supervised_logits and _has_values(labels):
            # Training: logits only where a label is (HF Trainer uses the loss alone; ``logits`` is None).
            logits = None
            loss = self.supervised_loss(hidden_states, labels, **kwargs)
        else:
            logits = self.lm_head(hidden_states).float()
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def supervised_loss(
        self,
        hidden_states: torch.Tensor,
        labels: torch.LongTensor,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = IGNORE_INDEX,
        shift_labels: torch.LongTensor | None = None,
        **_unused,
    ) -> torch.Tensor:
        """Causal-LM cross-entropy computed from the hidden states at supervised positions only.

        Equals transformers' ``ForCausalLMLoss`` on the full logits: labels shift by one (or ``shift_labels`` as
        given), the sum over supervised positions is divided by ``num_items_in_batch`` when the Trainer passes it
        (gradient accumulation) and by the number of supervised positions otherwise (NaN when there are none, as
        the full mean). ``lm_head`` is called as a module, so a PEFT LoRA-wrapped head trains through it. Several
        chunks are each recomputed in backward (``torch.utils.checkpoint``), so one chunk's fp32 buffers are alive
        at a time; a single chunk (the usual case: answers are short) runs without recompute.
        """
        positions = _supervised_positions(labels, shift_labels, ignore_index)
        flat_hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        flat_targets = _shifted(labels, shift_labels, ignore_index).reshape(-1)
        positions = positions.to(flat_hidden.device)
        hidden = flat_hidden.index_select(0, positions)
        targets = flat_targets.to(flat_hidden.device).index_select(0, positions)
        # At least one (possibly empty) chunk, so that the loss stays connected to the graph with no labels.
        chunks = range(0, max(hidden.shape[0], 1), LOSS_CHUNK_TOKENS)
        total = hidden.new_zeros((), dtype=torch.float32)
        if self.fused_linear_loss is not None and type(self.lm_head) is torch.nn.Linear and hidden.shape[0]:
            # The fused kernel chunks internally and computes its gradients in forward: no recompute needed.
            total, chunks = self.fused_linear_loss(self.lm_head.weight, hidden, targets), range(0)
        for start in chunks:
            part = (hidden[start : start + LOSS_CHUNK_TOKENS], targets[start : start + LOSS_CHUNK_TOKENS])
            if len(chunks) > 1 and torch.is_grad_enabled():
                total = total + checkpoint(self._chunk_loss_sum, *part, use_reentrant=False)
            else:
                total = total + self._chunk_loss_sum(*part)
        if num_items_in_batch is None:
            return total / hidden.shape[0]
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    def _chunk_loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed fp32 cross-entropy of one chunk of supervised positions."""
        logits = self.lm_head(hidden).float()
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        *args,
        cache=None,  # noqa: ANN001 - transformers Cache
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | ImageLayout | None = None,
        **kwargs,
    ) -> dict:
        """Pass images whenever the step embeds the prompt: the prefill and the LongRoPE re-prefill.

        Later decoding steps see new (non-negative) tokens only. When the sequence first grows past
        ``original_max_position_embeddings``, transformers' Phi-3 drops the KV cache and re-embeds the whole sequence
        with the long rope factors; that step must get the images again, or the placeholders would embed as token 0.
        """
        reprefill = self._longrope_reprefill(input_ids, cache)
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, cache=cache, **kwargs)
        prefill = kwargs.get("is_first_iteration") or not kwargs.get("use_cache", True) or reprefill
        if pixel_values is not None and prefill:
            model_inputs["pixel_values"] = pixel_values
            model_inputs["image_sizes"] = image_sizes
        return model_inputs

    def _longrope_reprefill(self, input_ids: torch.LongTensor, cache) -> bool:  # noqa: ANN001 - transformers Cache
        """Whether Phi-3's ``prepare_inputs_for_generation`` will drop the cache at this step (same condition)."""
        limit = getattr(self.config, "original_max_position_embeddings", None)
        if not cache or limit is None or input_ids.shape[1] < limit + 1:
            return False
        return cache.get_seq_length() <= limit

    def dead_parameter_names(self) -> set[str]:
        """Checkpoint parameters that never receive a gradient (unused CLIP layers, ``post_layernorm``)."""
        return self.model.vision_embed_tokens.dead_parameter_names(prefix="model.vision_embed_tokens.")


def dead_parameter_names(model: torch.nn.Module) -> set[str]:
    """Dead-weight parameter names of a (possibly wrapped, e.g. PEFT) Phi-3-vision model, as ``named_parameters`` gives them."""
    core = model
    for attr in ("base_model", "model"):
        # Unwrap PEFT (PeftModel.base_model.model) until we reach Phi3VForCausalLM.
        while not isinstance(core, Phi3VForCausalLM) and hasattr(core, attr):
            core = getattr(core, attr)
    if not isinstance(core, Phi3VForCausalLM):
        raise TypeError(f"not a Phi-3-vision model: {type(model).__name__}")
    names = core.dead_parameter_names()
    all_names = [n for n, _ in model.named_parameters()]
    # Map to the wrapper's naming (PEFT prefixes "base_model.model.", LoRA renames "base_layer").
    return {full for full in all_names if any(full.endswith(n) or full.replace(".base_layer", "").endswith(n) for n in names)}


def _check_packed(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, cache, use_cache) -> None:  # noqa: ANN001
    """A packed batch's sample boundaries are its position ids: no padding mask, no cache (training only)."""
    if attention_mask is not None or position_ids is None or cache is not None or use_cache:
        raise ValueError(
            "a packed batch needs position_ids, no attention_mask and no cache (transformers reads packed samples from "
            "restarting position ids only then); build it with PackingCollator"
        )


def _shifted(labels: torch.Tensor, shift_labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """Labels aligned with the positions that predict them (position t predicts label t + 1)."""
    if shift_labels is not None:
        return shift_labels
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _has_values(labels: torch.Tensor) -> bool:
    """Whether the labels can be read (not on the meta device, not a fake tensor): the positions depend on them."""
    from torch._subclasses.fake_tensor import is_fake

    return labels.device.type != "meta" and not is_fake(labels)


def _supervised_positions(labels: torch.Tensor, shift_labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """Flat indices of the positions that predict a label (a device sync on a GPU, like any data-dependent size).

    The FLOP replay runs the model under a fake-tensor mode with real host labels; the indices are read from
    those real labels outside it (a fake tensor has no values to count).
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        shifted = _shifted(labels, shift_labels, ignore_index)
        return (shifted.reshape(-1) != ignore_index).nonzero().squeeze(1)
