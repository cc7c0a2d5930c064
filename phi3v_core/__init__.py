"""phi3v_core: native Phi-3.5-vision model, processor, data, fine-tuning methods and the training path.

``import phi3v_core`` registers ``phi3_v`` with transformers' ``AutoConfig`` / ``AutoModelForCausalLM`` (lazily: the
moment transformers' Auto modules load, see :mod:`phi3v_core._autoregister`), so official checkpoint folders load with
``AutoModelForCausalLM.from_pretrained(folder)`` and no ``trust_remote_code``. The names below are resolved lazily
too, so that light commands (``--help``, data checks, result reports, the planner) do not pay for importing torch and
transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from phi3v_core import _autoregister

__all__ = [
    "Phi3VConfig",
    "Phi3VForCausalLM",
    "Phi3VModel",
    "get_config",
    "phi35_vision_config",
    "phi3_vision_v1_config",
    "tiny_config",
]
__version__ = "0.1.0"

_LAZY = {
    "Phi3VConfig": "phi3v_core.config",
    "get_config": "phi3v_core.config",
    "phi35_vision_config": "phi3v_core.config",
    "phi3_vision_v1_config": "phi3v_core.config",
    "tiny_config": "phi3v_core.config",
    "Phi3VForCausalLM": "phi3v_core.model",
    "Phi3VModel": "phi3v_core.model",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        # Importing via phi3v_core.model also registers the Auto classes.
        importlib.import_module("phi3v_core.model")
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'phi3v_core' has no attribute {name!r}")


_autoregister.install()
