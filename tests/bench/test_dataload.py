"""The CPU side of a benchmark: the data-loader wait of each step, its share and warning, the processor rate."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from bench.dataload import DATA_WAIT_WARN_SHARE, data_wait_note, data_wait_share, measure_processor_rate
from bench.results import BenchResult, RepeatSample
from phi3v_core.training.callbacks import StepMeter, StepTimer


def test_share_is_wait_over_wait_plus_compute() -> None:
    assert data_wait_share([0.9, 0.9, 0.9], [0.1, 0.1, 0.1]) == pytest.approx(0.1)
    assert data_wait_share([1.0, 1.0], []) is None  # older results: nothing recorded
    assert data_wait_share([1.0, 1.0], [0.5]) is None  # mismatched lengths are not guessed at


def test_note_warns_only_above_five_percent() -> None:
    fed = [RepeatSample(step_times_s=[1.0, 1.0, 1.0], data_wait_s=[0.01, 0.02, 0.01])]
    note = data_wait_note(fed, processor_samples_per_s=4.0, samples_per_step=8)
    assert note == "data loader: the device waited 1.0% of each step for its batch (median); processor 4.00 samples/s per core"
    starved = [RepeatSample(step_times_s=[1.0, 1.0, 1.0], data_wait_s=[0.25, 0.25, 0.3])]
    note = data_wait_note(starved, processor_samples_per_s=4.0, samples_per_step=8)
    assert note is not None and note.startswith("[yellow]data loader starves the device[/]: it waited 20.0% of each step")
    assert f"over {DATA_WAIT_WARN_SHARE:.0%}" in note and "about 2.0 cores" in note
    assert "--dataloader_num_workers" in note
    assert data_wait_note([RepeatSample(step_times_s=[1.0])], None, None) is None


def test_results_keep_the_wait_and_rate_and_read_old_files() -> None:
    from tests.bench.factories import make_result

    result = make_result()
    result.metrics.repeats[0].data_wait_s = [0.5] * len(result.metrics.repeats[0].step_times_s)
    result.metrics.processor_samples_per_s = 3.5
    again = BenchResult.from_dict(result.to_dict())
    assert again.metrics.repeats[0].data_wait_s == result.metrics.repeats[0].data_wait_s
    assert again.metrics.processor_samples_per_s == 3.5
    old = result.to_dict()
    del old["metrics"]["processor_samples_per_s"]
    for repeat in old["metrics"]["repeats"]:
        del repeat["data_wait_s"]
    legacy = BenchResult.from_dict(old)
    assert legacy.metrics.processor_samples_per_s is None and legacy.metrics.repeats[0].data_wait_s == []


def test_step_timer_records_the_fetch_before_the_step() -> None:
    meter = StepMeter()
    timer = StepTimer(synchronize=False, meter=meter)
    args = SimpleNamespace(device=torch.device("cpu"))
    state = SimpleNamespace(global_step=0)
    timer.on_train_begin(args, state, None)
    for step, wait in enumerate((0.25, 0.0), 1):
        meter.data_wait_s = wait  # set by Phi3VTrainer.get_batch_samples, before on_step_begin
        timer.on_step_begin(args, state, None)  # resets the counts, not the wait
        state.global_step = step
        timer.on_step_end(args, state, None)
    assert [r.data_wait_seconds for r in timer.records] == [0.25, 0.0]


def test_processor_rate_runs_on_one_thread_and_restores_threads() -> None:
    seen: list[int] = []

    def encode(index: int) -> dict:
        seen.append(torch.get_num_threads())
        time.sleep(0.05)
        return {"index": index}

    before = torch.get_num_threads()
    rate = measure_processor_rate(encode, lambda examples: examples, samples=2)
    assert seen == [1, 1] and torch.get_num_threads() == before
    assert 0 < rate <= 2 / 0.1


def test_trainer_times_its_prefetch(monkeypatch) -> None:
    from transformers import Trainer

    from phi3v_core.training.trainer import Phi3VTrainer

    def slow_fetch(self, epoch_iterator, num_batches, device):  # noqa: ANN001, ANN202 - the Trainer's signature
        time.sleep(0.05)
        return [next(epoch_iterator) for _ in range(num_batches)], None

    monkeypatch.setattr(Trainer, "get_batch_samples", slow_fetch)
    trainer = object.__new__(Phi3VTrainer)  # only the meter is needed, not a model
    trainer.step_meter = StepMeter()
    batches, _ = trainer.get_batch_samples(iter([1, 2, 3]), 2, torch.device("cpu"))
    assert batches == [1, 2] and trainer.step_meter.data_wait_s >= 0.05
