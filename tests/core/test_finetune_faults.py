"""phi3v-finetune under faults: kill during the final save, two writers, a file-size limit, divergence, resume.

Tiny model, 1 crop, batch 1, 1-2 steps, no eval: each run costs seconds.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from phi3v_core.cli.finetune import main
from phi3v_core.errors import ConfigError
from phi3v_core.training import TrainConfig, train
from phi3v_core.training.callbacks import TrainingDivergedError
from phi3v_core.training.synthetic import SyntheticDataset
from tests.safety_helpers import HANG_GUARD_S, expect_user_error, run_with_full_disk_at_the_journal, snapshot

REPO = Path(__file__).resolve().parents[2]
LEAN = ["--synthetic", "2", "--use_lora", "--lora_rank", "4", "--num_crops", "1", "--batch_size", "1",
        "--max_steps", "2", "--warmup_steps", "0", "--no-eval", "--no-tqdm"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("finetune_env")


def _env() -> dict[str, str]:
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PHI3V_MODEL", "PHI3V_DEBUG")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _state(out: Path) -> dict:
    return json.loads((out / "trainer_state.json").read_text())


def _json_run(capsys: pytest.CaptureFixture[str], *flags: str) -> dict:
    assert main([*flags, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_kill_during_the_final_save_then_resume_adds_no_step(tmp_path, capsys):
    out = tmp_path / "run"
    # A real SIGKILL while the final model is being written (after the step-2 checkpoint).
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        import phi3v_core.training.api as api
        def killed(trainer, output_dir, processor):
            (output_dir / ".final-staging").mkdir(exist_ok=True)
            (output_dir / ".final-staging" / "adapter_model.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        api._save_final = killed
        from phi3v_core.cli.finetune import main
        sys.exit(main({[*LEAN, "--save_steps", "1", "--output_dir", str(out)]!r}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "checkpoint-2" / "trainer_state.json").is_file() and not (out / "run_complete.json").exists()
    assert (out / ".phi3v.lock").is_file()  # left by the killed process

    summary = _json_run(capsys, *LEAN, "--save_steps", "1", "--output_dir", str(out), "--resume")
    assert summary["train"]["global_step"] == 2  # finished the save, no third step
    assert not (out / "checkpoint-3").exists() and _state(out)["global_step"] == 2
    assert json.loads((out / "run_complete.json").read_text())["global_step"] == 2
    assert (out / "adapter_model.safetensors").stat().st_size > 100 and not (out / ".phi3v.lock").exists()

    # A complete run is never trained further: --resume says so and changes nothing.
    before = snapshot(tmp_path)
    done = _json_run(capsys, *LEAN, "--save_steps", "1", "--output_dir", str(out), "--resume")
    assert done["status"] == "complete" and done["global_step"] == 2
    assert snapshot(tmp_path) == before


def test_resume_with_a_changed_setting_is_refused_with_a_diff(tmp_path, capsys):
    out = tmp_path / "run"
    _json_run(capsys, *LEAN, "--save_steps", "1", "--output_dir", str(out))
    (out / "run_complete.json").unlink()  # as if stopped before the end
    err = expect_user_error(
        main,
        [*LEAN, "--save_steps", "1", "--output_dir", str(out), "--resume", "--learning_rate", "1e-3", "--lora_rank", "8"],
        "the run was started with different settings (learning_rate 4e-05 → 0.001; lora_rank 4 → 8)",
        tmp_path,
        capsys,
    )
    assert "size mismatch" not in err


def test_resume_with_other_data_of_the_same_origin_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    _json_run(capsys, *LEAN, "--save_steps", "1", "--output_dir", str(out))
    (out / "run_complete.json").unlink()
    other = [*LEAN[:1], "3", *LEAN[2:]]  # --synthetic 3 after 2: the same origin name, other records
    expect_user_error(
        main,
        [*other, "--save_steps", "1", "--output_dir", str(out), "--resume"],
        "the run was started with different settings (the training data's content",
        tmp_path,
        capsys,
    )


_OVERWRITING = """
import sys
from pathlib import Path
from phi3v_core.training.run import guarded_output_dir
with guarded_output_dir(Path(sys.argv[1]), command="phi3v-finetune", overwrite=True) as out:
    (out / "half.txt").write_text("the overwrite's new run, half-written")
    print("inside", flush=True)
    sys.stdin.read()
    raise SystemExit("the overwrite failed")
"""


@pytest.mark.parametrize("second_flags", [[], ["--overwrite_output_dir"]], ids=["plain", "overwrite"])
def test_a_writer_during_an_overwrite_is_refused_and_the_rollback_touches_only_the_overwrites_folder(
    tmp_path, capsys, second_flags
):
    out = tmp_path / "run"
    _json_run(capsys, *LEAN, "--max_steps", "1", "--output_dir", str(out))
    old = snapshot(out)
    overwrite = subprocess.Popen([sys.executable, "-c", _OVERWRITING, str(out)], env=_env(), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert overwrite.stdout.readline().strip() == "inside"
        second = subprocess.run(
            [sys.executable, "-c", "from phi3v_core.cli.finetune import main; main()", *LEAN, "--max_steps", "1",
             "--output_dir", str(out), *second_flags],
            env=_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert second.returncode == 1 and "is being replaced by pid" in second.stderr, second.stderr
        assert (out / "half.txt").is_file()  # the refused writer changed nothing of the live overwrite
    finally:
        overwrite.communicate("", timeout=600)
    assert overwrite.returncode == 1
    assert snapshot(out) == old  # rolled back: the previous run, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".run")) == []


def test_a_corrupt_newest_checkpoint_is_named_and_skipped(tmp_path, capsys):
    out = tmp_path / "run"
    _json_run(capsys, *LEAN, "--save_steps", "1", "--output_dir", str(out))
    (out / "run_complete.json").unlink()
    weights = out / "checkpoint-2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut off mid-write
    assert main([*LEAN, "--save_steps", "1", "--output_dir", str(out), "--resume", "--json"]) == 0
    captured = capsys.readouterr()
    assert "warning: skipping incomplete checkpoint checkpoint-2" in captured.err
    assert "adapter_model.safetensors" in captured.err
    assert json.loads(captured.out)["train"]["resumed_from"].endswith("checkpoint-1")
    assert _state(out)["global_step"] == 2


def test_overwrite_output_dir_replaces_the_whole_run(tmp_path, capsys):
    out = tmp_path / "run"
    _json_run(capsys, *LEAN, "--output_dir", str(out))
    assert (out / "adapter_model.safetensors").is_file()
    _json_run(capsys, *LEAN[:2], "--num_crops", "1", "--batch_size", "1", "--max_steps", "1", "--no-eval",
              "--no-tqdm", "--method", "full", "--output_dir", str(out), "--overwrite_output_dir")  # fmt: skip
    assert (out / "model.safetensors").is_file() and not (out / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".run")) == []  # old run deleted


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from phi3v_core.fs import FolderLock; "
         f"FolderLock({str(out)!r}, 'phi3v-finetune').acquire(); print('locked', flush=True); sys.stdin.read()"],
        env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        expect_user_error(
            main,
            [*LEAN, "--output_dir", str(out)],
            f"--output_dir {out} is in use by pid {holder.pid} on",
            tmp_path,
            capsys,
        )
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale, the next run takes it over.
    assert main([*LEAN, "--max_steps", "1", "--output_dir", str(out)]) == 0
    assert "ended without releasing it; taking it" in capsys.readouterr().err
    assert (out / "run_complete.json").is_file() and not (out / ".phi3v.lock").exists()


def test_a_file_size_limit_is_reported_with_the_path_and_the_cause(tmp_path):
    out = tmp_path / "run"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = subprocess.run(
        [sys.executable, "-m", "phi3v_core.cli.finetune", "--synthetic", "2", "--num_crops", "1", "--batch_size", "1",
         "--max_steps", "1", "--no-eval", "--no-tqdm", "--method", "full", "--output_dir", str(out)],
        env=_env(), capture_output=True, text=True, timeout=HANG_GUARD_S, preexec_fn=limit,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in proc.stderr
    assert str(out) in last and "file too large" in last, last
    assert not (out / "run_complete.json").exists()


def _tiny(tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(
        model="tiny", method="lora", precision="fp32", num_crops=1, micro_batch=1, global_batch=1,
        max_steps=2, warmup_steps=0, lora_rank=4, gradient_checkpointing=False, output_dir=str(tmp_path / "run"),
        dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def test_a_diverging_run_stops_at_the_step_and_saves_nothing(tmp_path):
    cfg = _tiny(tmp_path, learning_rate=1e30, max_grad_norm=0.0)
    with pytest.raises(TrainingDivergedError, match=r"at step \d"):
        train(cfg, SyntheticDataset(4, num_crops=1, seed=0))
    out = Path(cfg.output_dir)
    assert not (out / "adapter_model.safetensors").exists() and not (out / "run_complete.json").exists()


class _PoisonAfterLastStep(TrainerCallback):
    """Make one trainable weight NaN after the step's loss was logged as finite (e.g. an fp16 overflow)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201 - Trainer signature
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))


def test_non_finite_weights_are_never_saved_as_the_final_model(tmp_path):
    cfg = _tiny(tmp_path, max_steps=1)
    with pytest.raises(TrainingDivergedError, match=r"is not finite after step 1; the final model was not saved"):
        train(cfg, SyntheticDataset(4, num_crops=1, seed=0), callbacks=[_PoisonAfterLastStep()])
    assert not (Path(cfg.output_dir) / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("field", ["learning_rate", "weight_decay", "adam_epsilon", "max_grad_norm"])
def test_the_python_api_refuses_non_finite_settings(field, tmp_path):
    cfg = _tiny(tmp_path, **{field: float("inf")})
    with pytest.raises(ConfigError, match=rf"settings must be finite numbers: {field}=inf"):
        train(cfg, SyntheticDataset(1, num_crops=1, seed=0))
    assert not Path(cfg.output_dir).exists()


def _fake_checkpoint(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": int(folder.name.split("-")[1])}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({}, folder / name)
    return folder


def test_an_explicit_corrupt_checkpoint_is_named(tmp_path):
    from phi3v_core.training.api import resolve_resume

    ckpt = _fake_checkpoint(tmp_path / "run" / "checkpoint-3", b"\x10\x00")
    cfg = _tiny(tmp_path, resume=str(ckpt), max_steps=3)
    with pytest.raises(ConfigError, match=r"corrupt checkpoint \(.*checkpoint-3/adapter_model.safetensors: truncated"):
        resolve_resume(cfg)


def test_when_every_checkpoint_is_corrupt_resume_refuses_with_the_remedy(tmp_path):
    from phi3v_core.training.api import resolve_resume

    for step in (1, 2):
        _fake_checkpoint(tmp_path / "run" / f"checkpoint-{step}", b"\x10\x00")
    with pytest.raises(ConfigError, match=r"every checkpoint in .* is incomplete or inconsistent .* start again with --overwrite_output_dir"):
        resolve_resume(_tiny(tmp_path, resume="latest"))


def test_a_full_disk_at_the_overwrite_journal_names_the_journal_and_keeps_the_old_run(tmp_path, capsys):
    from phi3v_core.transaction import intent_path

    out = tmp_path / "run"
    _json_run(capsys, *LEAN, "--max_steps", "1", "--output_dir", str(out))
    before = snapshot(tmp_path)
    proc = run_with_full_disk_at_the_journal(
        "phi3v_core.cli.finetune", [*LEAN, "--max_steps", "1", "--output_dir", str(out), "--overwrite_output_dir"], _env()
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {intent_path(out)}") and "no space left on the device" in last, proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(tmp_path) == before  # the old run byte for byte; no journal, draft or hidden copy left
