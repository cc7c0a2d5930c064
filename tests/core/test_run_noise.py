"""No noise on a training run (issue #24 §4): no transformers FutureWarning for the checkpointing names, no DeepSpeed
accelerator warning on a CPU, and one StepTimer per Trainer (the caller's) - it was registered twice, so every step
was synchronised and recorded twice and transformers warned "there is already one"."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from phi3v_core.model.checkpointing import checkpointing_arguments
from phi3v_core.training import StepTimer, TrainConfig, train
from phi3v_core.training.machine import Machine
from phi3v_core.training.synthetic import SyntheticDataset
from phi3v_core.training.trainer import build_training_arguments


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_lora_run_with_the_callers_timer_is_quiet_and_times_each_step_once(tmp_path: Path) -> None:
    dataset = SyntheticDataset(num_examples=4, num_crops=1, prompt_words=4, answer_words=3, seed=0)
    cfg = TrainConfig(model="tiny", method="lora", precision="fp32", num_crops=1, micro_batch=2, global_batch=2,
                      max_steps=2, warmup_steps=0, learning_rate=1e-3, lora_rank=4, output_dir=str(tmp_path / "run"),
                      dataloader_num_workers=0, disable_tqdm=True, save_final=False, seed=0)
    timer = StepTimer()
    handler = _Records()
    callback_logger = logging.getLogger("transformers.trainer_callback")
    callback_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train(cfg, dataset, callbacks=[timer])
    finally:
        callback_logger.removeHandler(handler)
    assert result.steps is timer.records and [r.step for r in timer.records] == [1, 2]  # one timer: the caller's
    assert not [m for m in handler.messages if "there is already one" in m]
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not [m for m in future if "checkpointing" in m], future
    layers = [m for m in result.model.modules() if type(m).__name__ in ("Phi3DecoderLayer", "CLIPEncoderLayer")]
    assert layers and all(m.gradient_checkpointing for m in layers)  # the new names still turn it on


def test_checkpointing_arguments_use_the_installed_names() -> None:
    from transformers import TrainingArguments

    on, off = checkpointing_arguments(True), checkpointing_arguments(False)
    assert set(on) == set(off) and len(on) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", **on)
    assert args.gradient_checkpointing is True  # the old name mirrors the new one on 5.25+


def test_a_cpu_run_tells_deepspeed_its_accelerator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    cfg = TrainConfig(model="tiny", method="lora", precision="fp32", num_crops=1, micro_batch=1, global_batch=1,
                      max_steps=1, output_dir=str(tmp_path), dataloader_num_workers=0)
    build_training_arguments(cfg, Machine.detect())
    import os

    assert os.environ["DS_ACCELERATOR"] == "cpu"


def test_the_offline_kernel_notice_is_dropped_and_nothing_else() -> None:
    """bitsandbytes' optional CPU kernel: in offline mode the `kernels` package warns on every run that it skips the
    publisher trust check; that one notice is dropped, other warnings of the same logger still show."""
    from phi3v_core.software import quiet_known_notices

    quiet_known_notices()
    quiet_known_notices()  # idempotent: one filter
    hub = logging.getLogger("kernels._internals.hf_hub")
    records = _Records()
    hub.addHandler(records)
    try:
        hub.warning("Skipping publisher trust check for 'kernels-community/x' because Hugging Face Hub is in offline mode.")
        hub.warning("something else")
    finally:
        hub.removeHandler(records)
    assert records.messages == ["something else"]
    assert len(hub.filters) == 1
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel() == logging.ERROR


def test_the_long_rope_factor_notice_is_dropped_and_nothing_else() -> None:
    """transformers' notice on every Phi-3 LongRoPE config (factor derived from original_max_position_embeddings)."""
    from phi3v_core.config import tiny_config
    from phi3v_core.software import quiet_known_notices

    quiet_known_notices()
    rope = logging.getLogger("transformers.modeling_rope_utils")
    records = _Records()
    rope.addHandler(records)
    try:
        tiny_config().to_dict()  # validates the rope parameters, as saving a checkpoint does
        rope.warning("This model config has set a `rope_parameters['original_max_position_embeddings']` field, ...")
        rope.warning("something else")
    finally:
        rope.removeHandler(records)
    assert records.messages == ["something else"]
