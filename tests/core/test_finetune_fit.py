"""phi3v-finetune refuses a run that cannot fit before building the model (issue #24 §2), through the planner's
check registered as a plugin (phi3v_core may not import the planner); --force trains anyway."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest

import planner.fit_check
from phi3v_core.cli.finetune import build_parser, main
from phi3v_core.training import TrainConfig
from phi3v_core.training.fit_hook import GROUP, fit_problems

GIB = 1 << 30


def test_the_planners_check_is_registered() -> None:
    """If this fails, the editable install predates the entry point: pip install -e . again."""
    assert [e.value for e in entry_points(group=GROUP)] == ["planner.fit_check:finetune_fit_problem"]


def test_finetune_refuses_before_any_model_with_both_numbers(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(planner.fit_check, "host_available_bytes", lambda: 14.0 * GIB)
    argv = ["--model_name_or_path", "phi-3.5-vision", "--task", "docvqa", "--synthetic", "4", "--use_lora",
            "--batch_size", "2", "--batch_size_per_gpu", "2", "--max_steps", "1", "--no-eval",
            "--output_dir", str(tmp_path / "out"), "--json"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: lora on phi-3.5-vision at micro-batch 2 is predicted not to fit: needs ")
    assert "GiB of host RAM, 14.0 GiB available" in err and "--batch_size_per_gpu 1" in err and "--force" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing left behind


def test_force_skips_the_check() -> None:
    args = build_parser().parse_args(["--force"])
    assert args.force is True


def test_a_run_that_fits_passes(monkeypatch) -> None:
    monkeypatch.setattr(planner.fit_check, "host_available_bytes", lambda: 64.0 * GIB)
    train = TrainConfig(model="tiny", method="lora", precision="fp32", output_dir="unused", num_crops=1, micro_batch=2,
                        global_batch=2)
    assert fit_problems(train, "docvqa", None, 1, 1, False) == []
