"""One training path for all four methods: ``TrainConfig`` → ``train()`` → ``TrainResult``.

>>> from phi3v_core.training import TrainConfig, train, StepTimer
>>> timer = StepTimer()
>>> result = train(TrainConfig(model="tiny", method="lora", max_steps=3), train_dataset=ds, callbacks=[timer])  # doctest: +SKIP

Multi-process: ``torchrun --nproc_per_node=N -m phi3v_core.training.launch --config run.json``.
"""

from phi3v_core.training.api import TrainResult, build_model, prepare_model, resolve_resume, train
from phi3v_core.training.callbacks import LossGuard, StepMeter, StepRecord, StepTimer, TrainingDivergedError
from phi3v_core.training.checkpoints import find_resumable_checkpoint
from phi3v_core.training.collate import SupervisedLogitsCollator
from phi3v_core.training.config import Machine, TrainConfig
from phi3v_core.training.deepspeed_config import deepspeed_config, zero2_buffer_bytes
from phi3v_core.training.trainer import Phi3VTrainer, build_training_arguments

__all__ = [
    "Machine",
    "LossGuard",
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
