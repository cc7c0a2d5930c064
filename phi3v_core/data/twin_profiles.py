"""Sequence-length profiles of the offline synthetic twins: image-size distributions and mean text tokens.

The twins' generators (:mod:`phi3v_core.data.synthetic`) draw their image sizes from these profiles, so the expected
sequence length computed here is the one the generated records have.
"""

from __future__ import annotations

from dataclasses import dataclass

from phi3v_core.data.seqlen import mean_image_tokens
from phi3v_core.image_sizes import TASK_IMAGES, TaskImages

__all__ = ["TWIN_PROFILES", "TwinProfile", "expected_mean_sequence_length"]


@dataclass(frozen=True)
class TwinProfile(TaskImages):
    """Sequence-length profile of one twin: its task's images (:class:`~phi3v_core.image_sizes.TaskImages`) and the
    token counts they make."""

    def mean_image_tokens(self, num_crops: int | None = None) -> float:
        """Expected image placeholder tokens per record."""
        crops = self.default_num_crops if num_crops is None else num_crops
        return self.images_per_record * mean_image_tokens(self.image_sizes, crops)

    def mean_sequence_length(self, num_crops: int | None = None) -> float:
        """Expected tokens per encoded record (image + text)."""
        return self.mean_image_tokens(num_crops) + self.text_tokens


#: Profiles of the twins, from the tasks' image sizes (:data:`phi3v_core.image_sizes.TASK_IMAGES`).
TWIN_PROFILES: dict[str, TwinProfile] = {
    name: TwinProfile(**vars(t))
    for name, t in TASK_IMAGES.items()
}


def expected_mean_sequence_length(task: str, num_crops: int | None = None) -> float:
    """Expected mean encoded sequence length (tokens) of a twin's records.

    Args:
        task: ``docvqa``, ``nlvr2``, ``hateful_memes`` or ``ucf101``.
        num_crops: Processor num_crops (default: the recipe's value for the task).

    Returns:
        Mean image placeholder tokens (exact expectation over the twin's image-size distribution) plus the mean text
        tokens. For ``docvqa`` at 16 crops this is ≈2443 tokens, the recipe's measured DocVQA average.
    """
    if task not in TWIN_PROFILES:
        raise ValueError(f"no synthetic twin for {task!r}; choose one of {', '.join(TWIN_PROFILES)}")
    return TWIN_PROFILES[task].mean_sequence_length(num_crops)
