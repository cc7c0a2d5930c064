"""Settings checked together after resolution, from the user's side (``phi3v-finetune`` main and its resolver).

Refusals: exit 1, one ``error:`` line naming every problem at once, no traceback, nothing on disk changed.
No training happens here.
"""

from __future__ import annotations

import socket

import pytest

from phi3v_core.cli.finetune import build_config, build_parser, main
from phi3v_core.training import Machine
from phi3v_core.training.distributed_env import distributed_env_problems
from tests.safety_helpers import expect_user_error

BASE = ["--synthetic", "4", "--no-tqdm"]

pytestmark = pytest.mark.usefixtures("finetune_env")


def _resolve(tmp_path, *argv: str):
    args = build_parser().parse_args([*BASE, "--output_dir", str(tmp_path / "out"), *argv])
    return build_config(args, Machine())


def test_a_preset_learning_rate_is_not_used_for_another_method(tmp_path, capsys):
    expect_user_error(
        main,
        [*BASE, "--output_dir", str(tmp_path / "out"), "--preset", "docvqa-lora", "--method", "full"],
        "--preset docvqa-lora sets the learning rate for --method lora (0.0002), not for --method full; use --preset "
        "docvqa-full, or pass --learning_rate",
        tmp_path,
        capsys,
    )


def test_an_explicit_learning_rate_lets_a_preset_serve_another_method(tmp_path):
    cfg = _resolve(tmp_path, "--preset", "docvqa-lora", "--method", "full", "--learning_rate", "5e-6")
    assert (cfg.train.method, cfg.train.learning_rate) == ("full", 5e-6)


def test_lora_and_qlora_presets_share_a_rate_so_switching_is_fine(tmp_path):
    cfg = _resolve(tmp_path, "--preset", "docvqa-lora", "--use_qlora")
    assert (cfg.train.method, cfg.train.learning_rate) == ("qlora", 2e-4)


def test_an_explicit_warmup_longer_than_the_run_is_refused(tmp_path, capsys):
    expect_user_error(
        main,
        [*BASE, "--output_dir", str(tmp_path / "out"), "--max_steps", "3", "--warmup_steps", "50"],
        "--warmup_steps 50 is not below --max_steps 3: the learning rate would never leave warm-up",
        tmp_path,
        capsys,
    )


def test_the_default_warmup_is_shortened_for_a_short_run_with_a_note(tmp_path):
    cfg = _resolve(tmp_path, "--max_steps", "30")
    assert cfg.train.warmup_steps == 3 and cfg.sources["warmup_steps"] == "clamped"
    assert any("warm-up shortened from 50 to 3 steps" in note for note in cfg.notes)
    assert _resolve(tmp_path, "--max_steps", "500").train.warmup_steps == 50  # a long run keeps the recipe's 50


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RANK": "1"}, "RANK=1 is set but LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not"),
        ({"LOCAL_RANK": "abc"}, "environment variable LOCAL_RANK='abc' is not an integer >= 0"),
        ({"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE='0' is not an integer >= 1"),
        (
            {"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"},
            "RANK=2 is not below WORLD_SIZE=2",
        ),
        (
            {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "99999"},
            "MASTER_PORT='99999' is not 1..65535",
        ),
    ],
    ids=["rank-without-launcher", "local-rank-abc", "world-size-0", "rank-too-high", "port-out-of-range"],
)
def test_distributed_variables_are_checked_as_a_set(env, expected, tmp_path, capsys, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    expect_user_error(main, [*BASE, "--output_dir", str(tmp_path / "out")], expected, tmp_path, capsys)


def test_a_busy_master_port_is_one_clear_line(tmp_path, capsys, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
        expect_user_error(
            main,
            [*BASE, "--output_dir", str(tmp_path / "out")],
            f"MASTER_PORT={port} is already in use on 127.0.0.1",
            tmp_path,
            capsys,
        )


def test_a_full_launcher_environment_is_accepted():
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert distributed_env_problems({**env, "TORCHELASTIC_RUN_ID": "x"}) == []
    assert distributed_env_problems({}) == []


def test_every_problem_is_reported_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    err = expect_user_error(
        main,
        [
            *BASE,
            "--output_dir",
            str(tmp_path / "out"),
            "--preset",
            "docvqa-lora",
            "--method",
            "full",
            "--max_steps",
            "3",
            "--warmup_steps",
            "9",
        ],
        "problems: ",
        tmp_path,
        capsys,
    )
    assert "--preset docvqa-lora" in err and "--warmup_steps 9" in err and "RANK=1" in err


def test_fewer_training_records_than_processes_is_refused():
    from phi3v_core.training import TrainConfig

    cfg = TrainConfig(model="tiny")
    assert cfg.dataset_problems(1, Machine(world_size=2)) == [
        "the training set has 1 record(s), fewer than the 2 processes (WORLD_SIZE): every process needs at least "
        "one; use fewer processes or more data"
    ]
    assert cfg.dataset_problems(2, Machine(world_size=2)) == []
