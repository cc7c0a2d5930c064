"""The official checkpoints' published configurations, shipped as package data; read without transformers.

``phi3v_core.config`` builds its presets from these records; a command's first answer (no torch, no transformers)
reads the sizes it checks flags against from here (:func:`preset_dims`).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from phi3v_core.constants import CONTEXT_LENGTH, TINY_HIDDEN_SIZE
from phi3v_core.errors import ConfigError

__all__ = ["PRESET_FILES", "official_preset", "preset_dims"]

#: Package data files holding the two official checkpoints' published configuration (copied from their Hugging Face
#: repositories, see each file's "provenance"): the presets read these files and nothing else.
PRESET_FILES = {
    "phi-3.5-vision": "phi-3.5-vision-instruct.json",
    "phi-3-vision": "phi-3-vision-128k-instruct.json",
}


def official_preset(name: str) -> dict[str, Any]:
    """The shipped record of an official checkpoint: ``config`` (its config.json), ``preprocessor`` (its
    preprocessor_config.json), ``source`` and ``provenance``.

    Args:
        name: ``"phi-3.5-vision"`` or ``"phi-3-vision"``.

    Raises:
        ConfigError: Unknown name, or the package data is missing (a broken install).
    """
    if name not in PRESET_FILES:
        raise ConfigError(f"no official config for {name!r}; choose one of {', '.join(PRESET_FILES)}")
    resource = resources.files("phi3v_core").joinpath("configs", PRESET_FILES[name])
    try:
        return json.loads(resource.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"phi3v_core/configs/{PRESET_FILES[name]} is missing or unreadable ({exc}); reinstall phi3v-bench"
        ) from exc


def preset_dims(name: str) -> tuple[int | None, int | None]:
    """``(hidden_size, max_position_embeddings)`` of a built-in preset, from the shipped records alone.

    ``(None, None)`` for a name that is not built in (a preset registered at run time, such as ``bench.selfcheck``'s
    depth-reduced copies): its sizes are known only once ``phi3v_core.config`` builds it.
    """
    if name == "tiny":
        return TINY_HIDDEN_SIZE, CONTEXT_LENGTH
    if name not in PRESET_FILES:
        return None, None
    config = official_preset(name)["config"]
    return config["hidden_size"], config["max_position_embeddings"]
