"""One training path for all four methods: ``TrainConfig`` → ``train()`` → ``TrainResult``.

>>> from phi3v_core.training import TrainConfig, train, StepTimer
>>> timer = StepTimer()
>>> result = train(TrainConfig(model="tiny", method="lora", max_steps=3), train_dataset=ds, callbacks=[timer])  # doctest: +SKIP

Multi-process: ``torchrun --nproc_per_node=N -m phi3v_core.training.launch --config run.json``.

Each name loads its submodule on first use (PEP 562): ``TrainConfig`` and ``Machine`` come without torch or
transformers, so a command can validate its settings before the training stack (seconds to import) is loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Imported now (light: no torch): the function shares its submodule's name, and a lazy look-up would find the
# submodule that importing it binds on this package, not the function.
from phi3v_core.training.deepspeed_config import deepspeed_config, zero2_buffer_bytes

if TYPE_CHECKING:
    from phi3v_core.training.api import TrainResult, build_model, prepare_model, resolve_resume, train
    from phi3v_core.training.callbacks import LossGuard, StepMeter, StepRecord, StepTimer, TrainingDivergedError
    from phi3v_core.training.checkpoints import find_resumable_checkpoint
    from phi3v_core.training.collate import SupervisedLogitsCollator
    from phi3v_core.training.config import TrainConfig
    from phi3v_core.training.machine import Machine
    from phi3v_core.training.trainer import Phi3VTrainer, build_training_arguments

#: Public name → the submodule that defines it.
_SOURCES = {
    "Machine": "machine",
    "TrainConfig": "config",
    "LossGuard": "callbacks",
    "StepMeter": "callbacks",
    "StepRecord": "callbacks",
    "StepTimer": "callbacks",
    "TrainingDivergedError": "callbacks",
    "Phi3VTrainer": "trainer",
    "build_training_arguments": "trainer",
    "SupervisedLogitsCollator": "collate",
    "TrainResult": "api",
    "build_model": "api",
    "prepare_model": "api",
    "resolve_resume": "api",
    "train": "api",
    "find_resumable_checkpoint": "checkpoints",
}

__all__ = [
    "LossGuard",
    "Machine",
    "Phi3VTrainer",
    "StepMeter",
    "StepRecord",
    "StepTimer",
    "SupervisedLogitsCollator",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "build_model",
    "build_training_arguments",
    "deepspeed_config",
    "find_resumable_checkpoint",
    "prepare_model",
    "resolve_resume",
    "train",
    "zero2_buffer_bytes",
]


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{source}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
