"""Files as the user expects: modes follow the umask (results, configs, data folders, weights)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from phi3v_core.io import atomic_write_bytes, atomic_write_json, current_umask


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it after."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda value: os.umask(value)
    os.umask(saved)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_current_umask_reads_without_changing(umask):
    umask(0o027)
    assert current_umask() == 0o027 and current_umask() == 0o027


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_bytes(tmp_path / "b.bin", b"x")
    assert _mode(tmp_path / "a.json") == 0o666 & ~mask
    assert _mode(tmp_path / "b.bin") == 0o666 & ~mask


def test_an_explicit_mode_still_wins(tmp_path, umask):
    umask(0o022)
    atomic_write_bytes(tmp_path / "secret", b"x", mode=0o600)
    assert _mode(tmp_path / "secret") == 0o600


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_a_converted_data_folder_follows_the_umask(tmp_path, umask, mask):
    from phi3v_core.cli.convert import main

    umask(mask)
    out = tmp_path / "twin"
    assert main(["synthetic", "--task", "docvqa", "--n", "2", "--out_dir", str(out), "--json"]) == 0
    assert _mode(out) == 0o777 & ~mask  # not mkdtemp's 0700
    for path in out.rglob("*"):
        assert _mode(path) == (0o777 if path.is_dir() else 0o666) & ~mask, path


@pytest.mark.slow
@pytest.mark.usefixtures("finetune_env")
def test_a_run_folder_weights_and_configs_follow_the_umask(tmp_path, umask):
    from phi3v_core.cli.finetune import main

    umask(0o027)
    out = tmp_path / "run"
    lean = ["--synthetic", "2", "--use_lora", "--lora_rank", "4", "--num_crops", "1", "--batch_size", "1",
            "--max_steps", "1", "--warmup_steps", "0", "--no-eval", "--no-tqdm"]  # fmt: skip
    assert main([*lean, "--output_dir", str(out), "--json"]) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "train_config.json", "run_complete.json",
                 "trainer_state.json", ".phi3v-manifest.json"):  # fmt: skip
        assert _mode(out / name) == 0o640, name
    for path in (out / "checkpoint-1").rglob("*"):
        assert _mode(path) == (0o750 if path.is_dir() else 0o640), path
