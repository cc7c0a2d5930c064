"""The :class:`~phi3v_core.training.TrainConfig` settings only the Hugging Face Trainer reads, judged before anything
loads: ``report_to`` (its logging package) and a user's DeepSpeed JSON config (``deepspeed_config_file``).

Called by :meth:`TrainConfig.problems`, so ``phi3v-finetune`` and the Python API refuse the same settings.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phi3v_core.constants import REPORT_TO

# ``TrainConfig`` (phi3v_core.training.config, which calls this module), typed loosely to keep imports one-way.
TrainConfig = Any

__all__ = ["trainer_problems"]


def trainer_problems(cfg: TrainConfig, name: Callable[[str], str]) -> list[str]:
    """Every problem with ``cfg.report_to`` and ``cfg.deepspeed_config_file``.

    Args:
        cfg: The configuration.
        name: What to call a field in a message (a flag on the command line, else the field name).
    """
    out = []
    package = REPORT_TO.get(cfg.report_to)
    if package and importlib.util.find_spec(package) is None:
        out.append(
            f"{name('report_to')} {cfg.report_to} needs the {package} package (pip install {package}); "
            f"or pass {name('report_to')} none"
        )
    if cfg.deepspeed_config_file is not None:
        out += _deepspeed_file_problems(cfg.deepspeed_config_file, cfg.offload, name)
    return out


def _deepspeed_file_problems(path: str, offload: str, name: Callable[[str], str]) -> list[str]:
    flag = name("deepspeed_config_file")
    problems = []
    try:
        config = json.loads(Path(path).expanduser().read_text())
    except OSError as exc:
        problems.append(f"{flag} {path}: cannot read it ({exc.strerror or exc}); pass a DeepSpeed JSON config file")
        config = {}
    except ValueError as exc:
        problems.append(f"{flag} {path}: not JSON ({exc}); pass a DeepSpeed JSON config file")
        config = {}
    if not isinstance(config, dict):
        problems.append(f"{flag} {path}: a DeepSpeed config is a JSON object, not {type(config).__name__}")
    elif not problems and "zero_optimization" not in config:
        # accelerate refuses such a file only once the Trainer is built (after the run folder is written)
        problems.append(
            f'{flag} {path}: no "zero_optimization" section; add one (e.g. {{"zero_optimization": {{"stage": 2}}}})'
        )
    if offload != "none":
        problems.append(
            f"{flag} {path} replaces the ZeRO-2 config that {name('offload')} {offload} builds; drop one of them"
        )
    if importlib.util.find_spec("deepspeed") is None:
        problems.append(f"{flag} needs the deepspeed package (pip install deepspeed)")
    return problems
