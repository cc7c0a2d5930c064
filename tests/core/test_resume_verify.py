"""Resume verifies: incomplete or inconsistent checkpoints are named and skipped; a manifest proves a save finished."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from phi3v_core.cli.finetune import main
from phi3v_core.training.checkpoints import (
    CHECKPOINT_MANIFEST,
    checkpoint_problem,
    find_resumable_checkpoint,
    write_manifest,
)

LEAN = ["--synthetic", "2", "--use_lora", "--lora_rank", "4", "--num_crops", "1", "--batch_size", "1",
        "--max_steps", "2", "--warmup_steps", "0", "--no-eval", "--no-tqdm"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("finetune_env")


def _safetensors(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4)}, str(path))


def _checkpoint(root: Path, step: int, *, manifest: bool = False, skip: tuple[str, ...] = ()) -> Path:
    """A checkpoint folder with the files the Trainer writes (tiny but loadable)."""
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    _safetensors(folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text("{}")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"x": 1}, folder / name)
    for name in skip:
        (folder / name).unlink()
    if manifest:
        write_manifest(folder, step)
    return folder


def test_latest_checkpoint_is_the_newest_that_checkpoint_problem_accepts(tmp_path):
    """One completeness rule: the public finder, ``--resume`` and TrainConfig all judge by ``checkpoint_problem``."""
    assert find_resumable_checkpoint(tmp_path) is None
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 10, manifest=True)
    _checkpoint(tmp_path, 12, skip=("optimizer.pt",))  # killed while saving: a file missing
    cut = _checkpoint(tmp_path, 14)
    (cut / "trainer_state.json").write_text('{"global_st')  # cut off mid-write
    skipped = []
    found = find_resumable_checkpoint(tmp_path, max_steps=20, on_skip=lambda folder, why: skipped.append(folder.name))
    assert found == tmp_path / "checkpoint-10" and skipped == ["checkpoint-14", "checkpoint-12"]
    assert find_resumable_checkpoint(tmp_path, max_steps=5) == tmp_path / "checkpoint-2"  # 10 is past max_steps


def test_an_explicit_resume_checkpoint_is_judged_by_the_same_rule(tmp_path):
    from phi3v_core.training import TrainConfig

    folder = _checkpoint(tmp_path / "run", 2, skip=("scheduler.pt",))
    problems = TrainConfig(output_dir=str(tmp_path / "run"), resume=str(folder), max_steps=5)._checkpoint_problems()
    assert len(problems) == 1 and checkpoint_problem(folder, 5) in problems[0]


@pytest.mark.parametrize("manifest", [False, True])
def test_a_complete_checkpoint_has_no_problem(tmp_path, manifest):
    assert checkpoint_problem(_checkpoint(tmp_path, 3, manifest=manifest), max_steps=3) is None


@pytest.mark.parametrize("missing", ["scheduler.pt", "optimizer.pt", "rng_state.pth"])
def test_a_checkpoint_without_its_optimizer_schedule_or_rng_is_incomplete(tmp_path, missing):
    reason = checkpoint_problem(_checkpoint(tmp_path, 2, skip=(missing,)), max_steps=5)
    assert reason is not None and f"missing {missing}" in reason and "checkpoint-2" in reason


def test_a_checkpoint_without_weights_is_incomplete(tmp_path):
    reason = checkpoint_problem(_checkpoint(tmp_path, 2, skip=("adapter_model.safetensors",)), max_steps=5)
    assert reason is not None and "no model or adapter weights" in reason


def test_a_file_the_manifest_lists_is_missing(tmp_path):
    folder = _checkpoint(tmp_path, 2, manifest=True)
    (folder / "scheduler.pt").unlink()
    assert "scheduler.pt is missing (listed in" in checkpoint_problem(folder, max_steps=5)


def test_a_file_of_another_size_than_the_manifest_says(tmp_path):
    folder = _checkpoint(tmp_path, 2, manifest=True)
    torch.save({"x": list(range(100))}, folder / "optimizer.pt")
    assert "optimizer.pt has" in checkpoint_problem(folder, max_steps=5)


def test_an_older_manifest_of_sizes_alone_is_still_read(tmp_path):
    folder = _checkpoint(tmp_path, 2, manifest=True)
    record = json.loads((folder / CHECKPOINT_MANIFEST).read_text())
    record["files"] = {name: entry["size"] for name, entry in record["files"].items()}
    (folder / CHECKPOINT_MANIFEST).write_text(json.dumps(record))
    assert checkpoint_problem(folder, max_steps=5) is None


def test_a_manifest_naming_a_path_outside_the_checkpoint_is_refused(tmp_path):
    folder = _checkpoint(tmp_path, 2, manifest=True)
    (tmp_path / "outside").write_text("x")
    record = json.loads((folder / CHECKPOINT_MANIFEST).read_text())
    record["files"]["../outside"] = {"size": 1, "blake2b": "0" * 32}
    (folder / CHECKPOINT_MANIFEST).write_text(json.dumps(record))
    assert "../outside is missing" in checkpoint_problem(folder, max_steps=5)


def test_an_edited_step_disagrees_with_the_folder_name(tmp_path):
    folder = _checkpoint(tmp_path, 2)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 9}))
    assert "says step 9 but the folder is checkpoint-2" in checkpoint_problem(folder, max_steps=10)


def test_a_step_past_max_steps_is_inconsistent(tmp_path):
    assert "step 4 is past max_steps 2" in checkpoint_problem(_checkpoint(tmp_path, 4), max_steps=2)


def test_a_manifest_of_another_step_is_inconsistent(tmp_path):
    folder = _checkpoint(tmp_path, 2)
    write_manifest(folder, 7)
    assert "says step 7" in checkpoint_problem(folder, max_steps=10)


def test_a_deepspeed_checkpoint_keeps_its_optimizer_in_global_step_folders(tmp_path):
    folder = _checkpoint(tmp_path, 2, skip=("optimizer.pt",))
    (folder / "global_step2").mkdir()
    (folder / "latest").write_text("global_step2")
    assert checkpoint_problem(folder, max_steps=2) is None


def test_the_manifest_lists_names_sizes_and_step(tmp_path):
    folder = _checkpoint(tmp_path, 2, manifest=True)
    record = json.loads((folder / CHECKPOINT_MANIFEST).read_text())
    assert record["step"] == 2
    assert record["files"]["optimizer.pt"]["size"] == (folder / "optimizer.pt").stat().st_size
    assert len(record["files"]["optimizer.pt"]["blake2b"]) == 32
    assert CHECKPOINT_MANIFEST not in record["files"]


# -- the real Trainer ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory) -> Path:
    """A real tiny run with checkpoints 1 and 2, made unfinished (no final model, no completion marker)."""
    root = tmp_path_factory.mktemp("base")
    out = root / "run"
    with pytest.MonkeyPatch.context() as patch:
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PHI3V_MODEL", "PHI3V_DEBUG"):
            patch.delenv(name, raising=False)
        patch.setenv("HF_HUB_OFFLINE", "1")
        assert main([*LEAN, "--save_steps", "1", "--output_dir", str(out), "--json"]) == 0
    for name in ("run_complete.json", "adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink()
    return out


def test_every_checkpoint_of_a_real_run_carries_a_manifest_listing_what_resume_needs(unfinished_run):
    for step in (1, 2):
        record = json.loads((unfinished_run / f"checkpoint-{step}" / CHECKPOINT_MANIFEST).read_text())
        assert record["step"] == step
        assert {"optimizer.pt", "scheduler.pt", "trainer_state.json", "adapter_model.safetensors"} <= set(record["files"])
        assert any(name.startswith("rng_state") for name in record["files"])


def _flip_one_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit, the size unchanged: only the hash can tell
    path.write_bytes(bytes(raw))


def test_one_flipped_bit_in_each_checkpoint_file_is_caught(tmp_path, unfinished_run):
    names = json.loads((unfinished_run / "checkpoint-2" / CHECKPOINT_MANIFEST).read_text())["files"]
    assert {"optimizer.pt", "scheduler.pt", "adapter_model.safetensors", "trainer_state.json"} <= set(names)
    for name in names:
        folder = tmp_path / name.replace("/", "_") / "checkpoint-2"
        shutil.copytree(unfinished_run / "checkpoint-2", folder)
        _flip_one_byte(folder / name)
        reason = checkpoint_problem(folder, max_steps=2)
        assert reason is not None and name.split("/")[-1] in reason, (name, reason)


def _resume(tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict, str]:
    assert main([*LEAN, "--save_steps", "1", "--output_dir", str(tmp_path / "run"), "--resume", "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["scheduler.pt", "optimizer.pt", "adapter_model.safetensors", "edited step",
                                    "one bit of optimizer.pt", "checkpoint-1's adapter copied in"])
def test_resume_skips_a_damaged_newest_checkpoint_with_a_warning_and_falls_back(tmp_path, unfinished_run, capsys, damage):
    out = tmp_path / "run"
    shutil.copytree(unfinished_run, out)
    newest = out / "checkpoint-2"
    if damage == "edited step":
        state = json.loads((newest / "trainer_state.json").read_text())
        (newest / "trainer_state.json").write_text(json.dumps({**state, "global_step": 7}))
    elif damage == "one bit of optimizer.pt":
        _flip_one_byte(newest / "optimizer.pt")
    elif damage == "checkpoint-1's adapter copied in":
        shutil.copyfile(out / "checkpoint-1" / "adapter_model.safetensors", newest / "adapter_model.safetensors")
    else:
        (newest / damage).unlink()
    summary, err = _resume(tmp_path, unfinished_run, capsys)
    assert "warning: skipping incomplete checkpoint checkpoint-2" in err
    assert summary["train"]["resumed_from"].endswith("checkpoint-1")
    assert summary["train"]["global_step"] == 2  # one step trained again from checkpoint-1, none skipped
    assert json.loads((out / "run_complete.json").read_text())["global_step"] == 2


@pytest.mark.slow
def test_resume_with_no_complete_checkpoint_is_one_clear_error(tmp_path, unfinished_run, capsys):
    out = tmp_path / "run"
    shutil.copytree(unfinished_run, out)
    for step in (1, 2):
        (out / f"checkpoint-{step}" / "scheduler.pt").unlink()
    with pytest.raises(SystemExit) as info:
        main([*LEAN, "--save_steps", "1", "--output_dir", str(out), "--resume"])
    err = capsys.readouterr().err
    assert info.value.code == 1
    assert "every checkpoint in" in err and "incomplete or inconsistent" in err and "scheduler.pt" in err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
