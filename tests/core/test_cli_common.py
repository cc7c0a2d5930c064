"""The shared CLI helper: all four commands report bad flags alike, errors are one line, JSON is strict."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main as bench_main
from phi3v_core.cli.common import CliParser, bounded_float, handle_errors, strict_json
from phi3v_core.cli.convert import main as convert_main
from phi3v_core.cli.finetune import main as finetune_main
from phi3v_core.errors import ConfigError
from phi3v_core.fs import FolderLock, StorageError, describe_storage_error
from planner.cli import main as plan_main
from tests.safety_helpers import expect_user_error

MAINS = {"phi3v-finetune": finetune_main, "phi3v-convert": convert_main, "phi3v-bench": bench_main,
         "phi3v-plan": plan_main}  # fmt: skip


@pytest.mark.parametrize("prog", list(MAINS))
def test_an_unknown_flag_is_one_line_exit_1_in_every_cli(prog, tmp_path, capsys):
    argv = {"phi3v-convert": ["check", str(tmp_path)], "phi3v-bench": ["run"]}.get(prog, [])
    expect_user_error(
        MAINS[prog], [*argv, "--no_such_flag"], f"unrecognized arguments: --no_such_flag (see {prog}", tmp_path, capsys
    )


@pytest.mark.parametrize(
    ("prog", "argv", "message"),
    [
        ("phi3v-plan", ["--nodes", "abc"], "argument --nodes: invalid int value: 'abc' (see phi3v-plan --help)"),
        ("phi3v-plan", ["--gpu"], "argument --gpu: expected one argument (see phi3v-plan --help)"),
        ("phi3v-plan", ["--task", "docvq"], "docvq"),
        ("phi3v-bench", ["run", "--steps", "many"], "invalid int value: 'many'"),
        ("phi3v-bench", ["nope"], "invalid choice: 'nope'"),
        ("phi3v-bench", ["compare", "a"], "the following arguments are required: b"),
        ("phi3v-finetune", ["--use_lor"], "unrecognized arguments: --use_lor (see phi3v-finetune --help)"),
    ],
)
def test_bad_flags_of_bench_and_plan_go_through_the_shared_parser(prog, argv, message, tmp_path, capsys):
    expect_user_error(MAINS[prog], argv, message, tmp_path, capsys)


def test_abbreviations_are_not_accepted():
    parser = CliParser(prog="x")
    parser.add_argument("--learning_rate", type=float)
    with pytest.raises(ConfigError, match=r"unrecognized arguments: --learning 1 \(see x --help\)"):
        parser.parse_args(["--learning", "1"])


def test_parse_collecting_returns_bad_values_with_their_defaults():
    # phi3v-finetune reports bad values together with its config's problems: they come back instead of raising.
    parser = CliParser(prog="demo")
    parser.add_argument("--lr", type=bounded_float(0, 1, low_open=True), default=0.5)
    parser.add_argument("--name", choices=("a", "b"), default="a")
    args, bad = parser.parse_collecting(["--lr", "5", "--name", "c"])
    assert (args.lr, args.name) == (0.5, "a")
    assert bad[0] == "argument --lr: must be a finite number in (0, 1], got 5"
    assert bad[1].startswith("argument --name: invalid choice: 'c'") and bad[1].endswith("(see demo --help)")
    with pytest.raises(ConfigError, match="2 problems"):  # parse_args still raises them at once
        parser.parse_args(["--lr", "5", "--name", "c"])
    with pytest.raises(ConfigError, match="unrecognized arguments: --nope"):  # other errors are not collected
        parser.parse_collecting(["--lr", "5", "--nope"])


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e999"])
def test_bounded_float_rejects_non_finite_values(text):
    parser = CliParser(prog="x")
    parser.add_argument("--v", type=bounded_float(0, 1))
    with pytest.raises(ConfigError, match="must be a finite number in"):
        parser.parse_args([f"--v={text}"])


def test_strict_json_never_writes_nan_or_infinity():
    text = strict_json({"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}, "e": Path("/x")})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}, "e": "/x"}
    assert "NaN" not in text and "Infinity" not in text


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors"),
         "error: /data/out/model.safetensors: no space left on the device; free space or write elsewhere"),
        (OSError(errno.EFBIG, "File too large", "/data/out/x.bin"),
         "error: /data/out/x.bin: file too large for the file system or the file-size limit (ulimit -f)"),
        (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run"),
         "error: /mnt/ro/run: read-only file system; choose a writable path"),
        (PermissionError(errno.EACCES, "Permission denied", "/root/x"),
         "error: /root/x: permission denied; fix the permissions or choose another path"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456"),
         "error: writing the file failed part-way (the disk is probably full or a file-size limit was hit)"),
        (RecursionError("maximum recursion depth exceeded"), "error: input nested too deeply to process"),
        (ValueError("boom"), "error: ValueError: boom (set PHI3V_DEBUG=1 for the traceback)"),
    ],
    ids=["enospc", "efbig", "erofs", "eacces", "torch-zip", "recursion", "bug"],
)
def test_the_error_handler_translates_storage_errors(exc, expected, capsys, monkeypatch):
    monkeypatch.delenv("PHI3V_DEBUG", raising=False)

    @handle_errors
    def failing() -> int:
        raise exc

    with pytest.raises(SystemExit) as info:
        failing()
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.startswith(expected) and err.count("\n") == 1, err


def test_phi3v_debug_keeps_the_traceback(monkeypatch):
    monkeypatch.setenv("PHI3V_DEBUG", "1")

    @handle_errors
    def failing() -> int:
        raise ConfigError("bad")

    with pytest.raises(ConfigError):
        failing()


def test_describe_storage_error_names_the_path_for_file_too_large():
    message = describe_storage_error(RuntimeError("File too large"), "/out/run")
    assert message is not None and message.startswith("/out/run: file too large")
    assert describe_storage_error(RuntimeError("something else"), "/out") is None


def test_folder_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path):
    with FolderLock(tmp_path, "first"):
        with pytest.raises(StorageError, match=rf"is in use by pid {os.getpid()} on .* \(first\)"):
            FolderLock(tmp_path, "second").acquire()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    import socket

    (tmp_path / ".phi3v.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": "old"}))
    lock = FolderLock(tmp_path, "new").acquire()
    assert lock.took_over["pid"] == pid
    lock.release()
    assert not (tmp_path / ".phi3v.lock").exists()


def test_plan_json_is_strict(capsys):
    assert plan_main(["--gpu", "A100-80GB", "--json"]) == 0
    out = capsys.readouterr().out
    json.loads(out, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))
