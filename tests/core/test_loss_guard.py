"""LossGuard with an fp16 loss scaler, through the real Trainer.

accelerate only attaches its GradScaler on a GPU, so on CPU the test does the attaching: a real
``torch.amp.GradScaler("cpu")`` goes into the Trainer's ``AcceleratedOptimizer`` exactly the way accelerate wires it
on CUDA (the patched step method that tells a taken step from a skipped one). Overflow is injected as an inf
gradient on chosen steps; the scaler then skips those updates, the Trainer logs ``grad_norm = inf`` and holds back
the learning-rate schedule (``accelerator.optimizer_step_was_skipped``), as it does on a V100.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from accelerate.optimizer import patch_optimizer_step
from transformers import TrainerCallback

from phi3v_core.training import TrainConfig, TrainingDivergedError, train
from phi3v_core.training import callbacks as callbacks_module
from phi3v_core.training.callbacks import LossGuard, loss_scale, optimizer_step_skipped
from phi3v_core.training.synthetic import SyntheticDataset


class _OverflowOn(TrainerCallback):
    """Give the optimizer a real GradScaler and make the gradients inf on ``bad_steps`` (1-based)."""

    def __init__(self, bad_steps: set[int] | None, install_scaler: bool = True) -> None:
        self.bad_steps = bad_steps  # None: every step overflows
        self.install_scaler = install_scaler  # False on CUDA, where accelerate brings its own
        self._overflow = False
        self.scales: list[float] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: ANN001, ANN201
        param = next(p for p in model.parameters() if p.requires_grad)
        param.register_hook(lambda grad: torch.full_like(grad, math.inf) if self._overflow else grad)
        if not self.install_scaler:
            return
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10_000)
        # accelerate's backward scales the loss, which creates the scale tensor; the loss here is unscaled (scale
        # 1, then the grads are divided by the halved scale: harmless for a few steps of a tiny model).
        scaler.scale(torch.ones(()))
        # What AcceleratedOptimizer.__init__ does when accelerate passes it a scaler (fp16 on CUDA).
        optimizer.scaler = scaler
        optimizer._accelerate_step_called = False
        optimizer._optimizer_original_step_method = optimizer.optimizer.step
        optimizer._optimizer_patched_step_method = patch_optimizer_step(optimizer, optimizer.optimizer.step)

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        step = state.global_step + 1
        self._overflow = self.bad_steps is None or step in self.bad_steps

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001, ANN201
        self.scales.append(float(optimizer.scaler.get_scale()))


def _config(tmp_path: Path, steps: int, precision: str = "fp32") -> TrainConfig:
    return TrainConfig(
        model="tiny", method="lora", precision=precision, num_crops=1, micro_batch=2, global_batch=2, max_steps=steps,
        warmup_steps=0, learning_rate=1e-3, lora_rank=4, output_dir=str(tmp_path / "run"), dataloader_num_workers=0,
        disable_tqdm=True, save_final=False, save_steps=0, seed=0,
    )


def _dataset(steps: int) -> SyntheticDataset:
    return SyntheticDataset(num_examples=2 * steps, num_crops=1, prompt_words=4, answer_words=3, seed=0)


def test_a_skipped_overflow_step_trains_on(tmp_path: Path) -> None:
    overflow = _OverflowOn({2})
    result = train(_config(tmp_path, 4), _dataset(4), callbacks=[overflow])
    assert result.global_step == 4
    assert [r.skipped for r in result.steps] == [False, True, False, False]
    # The scaler really skipped it: the scale was halved once, on step 2.
    assert overflow.scales == [1.0, 0.5, 0.5, 0.5]
    assert all(math.isfinite(loss) for loss in result.losses.values())
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_persistent_overflow_stops_with_the_count_and_the_scale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(callbacks_module, "MAX_SKIPPED_IN_ROW", 3)
    with pytest.raises(TrainingDivergedError, match=r"skipped 3 steps in a row \(up to step 3, loss scale now 0.125\)"):
        train(_config(tmp_path, 6), _dataset(6), callbacks=[_OverflowOn(None)])


def test_a_non_finite_gradient_the_optimizer_applied_still_stops() -> None:
    state = type("State", (), {"global_step": 4})()
    with pytest.raises(TrainingDivergedError, match="the optimizer applied it"):
        LossGuard().on_log(None, state, None, logs={"loss": 1.0, "grad_norm": math.inf})


def test_skip_detection_reads_accelerate_and_deepspeed_flags() -> None:
    class DeepSpeedOptimizer:
        overflow = True
        cur_scale = 1024.0

    class Wrapper:  # accelerate's DeepSpeedOptimizerWrapper shape without its step_was_skipped property
        optimizer = DeepSpeedOptimizer()
        scaler = None

    assert optimizer_step_skipped(Wrapper())
    assert loss_scale(Wrapper()) == 1024.0
    assert not optimizer_step_skipped(None)
    assert not optimizer_step_skipped(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))


@pytest.mark.gpu(seconds=10)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_cuda_skips_an_overflow_step_and_trains_on(tmp_path: Path) -> None:
    """accelerate's own GradScaler on a GPU (the V100/T4 path). The tiny model in fp16 needs well under 1 GiB, so
    this passes on any card that runs fp16 (H100 80 GB, A100 40 GB, V100 32 GB alike)."""
    overflow = _OverflowOn({3}, install_scaler=False)
    result = train(_config(tmp_path, 5, precision="fp16"), _dataset(5), callbacks=[overflow])
    assert result.global_step == 5
    assert result.steps[2].skipped  # the injected overflow (earlier steps may skip too while the scale settles)
    assert overflow.scales[2] < overflow.scales[1]  # the real scaler halved its scale there
    assert all(math.isfinite(loss) for loss in result.losses.values())
