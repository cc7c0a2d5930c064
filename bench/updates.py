"""Did the run's optimizer steps reach the weights? The share of trained weights whose stored value changed.

A layout can step the optimizer and still leave the model as it was: bf16 weights without an fp32 master copy
round every step shorter than half their last bit back to the old value (:mod:`phi3v_core.retention` predicts how
many). :class:`ChangedWeights` measures it: it samples up to ``max_elements`` elements of the trainable parameters
(an even stride over all of them, so large tensors get their share), remembers their values at the start, notes
which received a non-zero gradient before some optimizer step, and at the end counts those whose stored value
differs from the start. Elements that never get a gradient (embedding rows of tokens the data never shows) cannot
change under any layout and are left out; under DeepSpeed the gradients are the engine's, so every sampled element
counts (and the note says so).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import TrainerCallback

__all__ = ["ChangedWeights", "WeightChange"]


@dataclass(frozen=True)
class WeightChange:
    """What :class:`ChangedWeights` found.

    Attributes:
        changed_fraction: Share of the counted elements whose stored value changed over the run.
        counted: Sampled elements that received a gradient (all sampled ones when gradients were not visible).
        sampled: Sampled trainable elements.
        trainable: Trainable elements of the model.
        gradients_seen: Whether gradients were visible (False under DeepSpeed).
        steps: Optimizer steps the run took.
    """

    changed_fraction: float
    counted: int
    sampled: int
    trainable: int
    gradients_seen: bool
    steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


class ChangedWeights(TrainerCallback):
    """Trainer callback measuring the share of trained weights the run changed (see the module docstring)."""

    def __init__(self, max_elements: int = 1 << 20) -> None:
        self.max_elements = max_elements
        self._tracked: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._gradients_seen = False
        self._trainable = 0
        self.result: WeightChange | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Sample the trainable elements and remember their starting values."""
        params = [p for p in model.parameters() if p.requires_grad]
        self._trainable = sum(p.numel() for p in params)
        stride = max(1, -(-self._trainable // self.max_elements))
        offset = 0  # position in the concatenation of all trainable elements, so the stride runs across tensors
        for p in params:
            first = (-offset) % stride
            if first < p.numel():
                index = torch.arange(first, p.numel(), stride, device=p.device)
                start = p.detach().reshape(-1)[index].clone()
                self._tracked.append((p, index, start, torch.zeros_like(index, dtype=torch.bool)))
            offset += p.numel()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Note which sampled elements have a non-zero gradient for this step."""
        for p, index, _start, got_gradient in self._tracked:
            if p.grad is not None:
                self._gradients_seen = True
                got_gradient |= p.grad.detach().reshape(-1)[index] != 0

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Count the sampled elements whose stored value differs from the start."""
        changed = counted = sampled = 0
        for p, index, start, got_gradient in self._tracked:
            moved = p.detach().reshape(-1)[index] != start
            mask = got_gradient if self._gradients_seen else torch.ones_like(moved)
            changed += int((moved & mask).sum())
            counted += int(mask.sum())
            sampled += index.numel()
        fraction = changed / counted if counted else 0.0
        steps = int(getattr(state, "global_step", 0) or 0)
        self.result = WeightChange(fraction, counted, sampled, self._trainable, self._gradients_seen, steps)
        self._tracked = []  # drop the references to the model's parameters
