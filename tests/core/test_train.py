"""The training path beyond "it runs": step metering, batch-split invariance, logit trimming, guards, resume, CLI.

(Every method × precision, adapter/full reload, SIGKILL resume and torchrun live in test_training_e2e.py.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from phi3v_core.errors import ConfigError
from phi3v_core.processing import Phi3VDataCollator
from phi3v_core.training import (
    LossGuard,
    StepTimer,
    SupervisedLogitsCollator,
    TrainConfig,
    TrainingDivergedError,
    build_model,
    train,
)
from phi3v_core.training.launch import main as launch_main
from phi3v_core.training.synthetic import SyntheticDataset


@pytest.fixture(scope="module")
def dataset() -> SyntheticDataset:
    return SyntheticDataset(num_examples=8, num_crops=1, prompt_words=4, answer_words=3, seed=0)


def config(tmp_path: Path, **overrides: object) -> TrainConfig:
    values: dict = dict(
        model="tiny",
        method="full",
        precision="fp32",
        num_crops=1,
        micro_batch=2,
        global_batch=2,
        max_steps=2,
        warmup_steps=0,
        learning_rate=1e-3,
        lora_rank=4,
        output_dir=str(tmp_path / "run"),
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_final=False,
        seed=0,
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_step_timer_counts_what_each_step_consumed(dataset: SyntheticDataset, tmp_path: Path) -> None:
    timer = StepTimer()
    cfg = config(tmp_path, method="lora", micro_batch=2, global_batch=4, max_steps=2)  # 2 micro-batches/step
    result = train(cfg, dataset, callbacks=[timer])
    assert [r.step for r in timer.records] == [1, 2]
    assert all(r.samples == 4 and r.images == 4 for r in timer.records)
    # Two steps of four = the whole dataset, each example exactly once.
    examples = [dataset[i] for i in range(len(dataset))]
    assert sum(r.tokens for r in timer.records) == sum(len(e["input_ids"]) for e in examples)
    assert sum(r.supervised_tokens for r in timer.records) == sum(
        int((e["labels"][1:] != -100).sum()) for e in examples
    )
    for record in timer.records:
        assert 0 < record.seconds <= record.wall_seconds
        assert record.loss == result.losses[record.step] and record.learning_rate is not None
    assert [r.step for r in result.steps] == [1, 2]  # train() keeps its own timer too
    layers = [m for m in result.model.modules() if type(m).__name__ in ("Phi3DecoderLayer", "CLIPEncoderLayer")]
    assert len(layers) == 5 and all(m.gradient_checkpointing for m in layers)  # on by default, LM and CLIP


def test_splitting_the_global_batch_does_not_change_training(dataset: SyntheticDataset, tmp_path: Path) -> None:
    """Micro-batch 2 vs 2 accumulated micro-batches of 1 (no checkpointing) vs logits trimmed to the answers."""
    runs = {
        "micro2": config(tmp_path / "a", micro_batch=2, global_batch=2),
        "accum2": config(tmp_path / "b", micro_batch=1, global_batch=2, gradient_checkpointing=False),
        "trimmed": config(tmp_path / "c", micro_batch=2, global_batch=2, supervised_logits_only=True),
    }
    results = {name: train(cfg, dataset) for name, cfg in runs.items()}
    reference = results["micro2"]
    weights = dict(reference.model.named_parameters())
    for name in ("accum2", "trimmed"):
        other = results[name]
        assert other.losses.keys() == reference.losses.keys() == {1, 2}
        for step, loss in reference.losses.items():
            assert math.isclose(other.losses[step], loss, rel_tol=1e-5), (name, step)
        for param_name, param in other.model.named_parameters():
            torch.testing.assert_close(param, weights[param_name], rtol=1e-4, atol=1e-6)
    # And training moved the weights at all.
    fresh = dict(build_model(runs["micro2"]).named_parameters())
    assert not torch.equal(weights["model.layers.0.mlp.down_proj.weight"], fresh["model.layers.0.mlp.down_proj.weight"])


def test_supervised_logits_collator_keeps_only_the_answer_span(dataset: SyntheticDataset) -> None:
    examples = [dataset[0], dataset[1]]
    full = Phi3VDataCollator()(examples)
    trimmed = SupervisedLogitsCollator(Phi3VDataCollator())(examples)
    keep = trimmed["logits_to_keep"]
    assert keep < full["input_ids"].shape[1] / 4  # the image placeholders and prompt are skipped
    assert torch.equal(trimmed["labels"], full["labels"][:, -keep:])
    assert int((trimmed["labels"][:, 1:] != -100).sum()) == int((full["labels"][:, 1:] != -100).sum())
    model = build_model(TrainConfig(method="full", precision="fp32", seed=0)).eval()
    with torch.no_grad():
        reference = model(**full).loss
        cut = model(**trimmed)
    assert cut.logits.shape[1] == keep
    torch.testing.assert_close(cut.loss, reference, rtol=1e-6, atol=1e-6)


def test_loss_guard_rejects_nan_and_a_zero_first_loss() -> None:
    state = type("State", (), {"global_step": 1})()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(TrainingDivergedError, match="lower the learning rate"):
            LossGuard().on_log(None, state, None, logs={"loss": bad})
    with pytest.raises(TrainingDivergedError, match="no token is supervised"):
        LossGuard().on_log(None, state, None, logs={"loss": 0.0})
    guard = LossGuard()
    guard.on_log(None, state, None, logs={"loss": 2.0})
    guard.on_log(None, state, None, logs={"loss": 0.0})  # later zeros are a fitted model, not a bug


class _Unsupervised(torch.utils.data.Dataset):
    def __init__(self, base: SyntheticDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        example = dict(self.base[index])
        example["labels"] = torch.full_like(example["labels"], -100)
        return example


def test_training_on_unsupervised_data_stops_with_a_clear_error(dataset: SyntheticDataset, tmp_path: Path) -> None:
    with pytest.raises(TrainingDivergedError, match="at step 1.*without supervised tokens"):
        train(config(tmp_path, method="lora", max_steps=1), _Unsupervised(dataset))


def test_an_invalid_config_fails_before_anything_is_written(dataset: SyntheticDataset, tmp_path: Path) -> None:
    cfg = config(tmp_path, precision="fp16", global_batch=3)
    with pytest.raises(ConfigError, match="2 problems: .*fp16.*global_batch 3"):
        train(cfg, dataset)
    assert not Path(cfg.output_dir).exists()


class _Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 - Trainer callback signature
        if state.global_step == 3:
            raise RuntimeError("simulated crash")


def test_resume_from_the_latest_checkpoint_reproduces_the_run(dataset: SyntheticDataset, tmp_path: Path) -> None:
    """Full fine-tuning (optimizer state for every weight), crash after step 3, resume from checkpoint-2."""
    common = dict(micro_batch=1, global_batch=2, max_steps=5, save_steps=2, save_final=True)
    reference = train(config(tmp_path / "ref", **common), dataset)  # 4 steps per epoch: crosses an epoch

    crashed = config(tmp_path / "crash", **common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashed, dataset, callbacks=[_Crash()])
    assert sorted(p.name for p in Path(crashed.output_dir).glob("checkpoint-*")) == ["checkpoint-2"]

    resumed = train(config(tmp_path / "crash", resume="latest", **common), dataset)
    assert resumed.resumed_from == Path(crashed.output_dir) / "checkpoint-2"
    assert [r.step for r in resumed.steps] == [3, 4, 5]
    assert resumed.losses.keys() == reference.losses.keys() == {1, 2, 3, 4, 5}
    for step, loss in reference.losses.items():
        assert abs(resumed.losses[step] - loss) <= 1e-6, step
    for (name, param), (_, other) in zip(reference.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(param, other, rtol=0, atol=1e-6, msg=name)


def test_launch_cli_reports_a_bad_run_file_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = tmp_path / "run.json"
    spec.write_text(json.dumps({"train": {"method": "lora", "lr": 1e-4}, "dataa": {}}))
    with pytest.raises(SystemExit) as exit_info:
        launch_main(["--config", str(spec)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "2 problems" in err
    assert "unknown section 'dataa'" in err and "unknown TrainConfig field(s) lr" in err
