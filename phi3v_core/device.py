"""Small runtime helpers about devices and dtypes; torch is imported inside the functions only.

Shared by the training path, the finetune CLI, the benchmark worker and the planner's tracer, so that "which GPU is
mine" and "can this machine run flash attention" are answered one way.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from phi3v_core.constants import supports_flash_attention

if TYPE_CHECKING:
    import torch

__all__ = ["default_dtype", "flash_attention_usable", "local_device", "local_rank"]


def local_rank() -> int:
    """This process's GPU index on its node: ``LOCAL_RANK`` from torchrun, 0 otherwise.

    Never ``RANK``: global rank 9 of a 2×8 job is GPU 1 of its node.
    """
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device(cuda: bool | None = None) -> torch.device:
    """The device this process trains on: ``cuda:LOCAL_RANK`` when CUDA is used, else the CPU.

    Args:
        cuda: Whether to use CUDA (``None``: when it is available).
    """
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    return torch.device("cuda", local_rank()) if cuda else torch.device("cpu")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Set torch's default float dtype inside the block (parameters are created in it), and restore it after."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def flash_attention_usable() -> bool:
    """``flash_attention_2`` can run here: the flash-attn package is installed and GPU 0 is Ampere (8.0) or newer."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    import torch

    return torch.cuda.is_available() and supports_flash_attention(torch.cuda.get_device_capability(0))
