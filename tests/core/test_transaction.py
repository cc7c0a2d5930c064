"""Journaled replacements: a real SIGKILL at every step leaves the old or the new folder, and the next command says
what it finished or restored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from unittest.mock import ANY

import pytest

from phi3v_core.transaction import PROOF_NAME, JournalError, SetAside, intent_path, move_into, recover, replace_folder
from tests.safety_helpers import HANG_GUARD_S, repo_env


def _folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _content(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def _siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# A process that runs one transaction and SIGKILLs itself at the Nth os.replace (or at the Nth removal).
_KILL_AT = """
import os, shutil, signal, sys
from pathlib import Path
import phi3v_core.transaction as txn
kind, where, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = {"n": 0}
def killer(real):
    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return wrapped
if where == "replace":
    txn.os.replace = killer(os.replace)
elif where == "exchange":
    txn._exchange = killer(txn._exchange)
else:
    txn._remove = killer(txn._remove)
if sys.argv[5] == "fallback":
    txn._exchange = lambda a, b: False  # a file system without RENAME_EXCHANGE: two renames
root = Path(sys.argv[4])
if kind == "swap":
    txn.replace_folder(root / ".data.phi3v-new-999999", root / "data", "test-swap")
elif kind == "moves":
    txn.move_into(root / "run" / ".final-staging", root / "run", "test-moves")
else:
    aside = txn.SetAside(root / "run", "test-overwrite", done_marker="done.json")
    (root / "run" / "new.txt").write_text("new")
    if kind == "set_aside_done":
        (root / "run" / "done.json").write_text("{}")
    aside.commit() if kind.startswith("set_aside_done") else os.kill(os.getpid(), signal.SIGKILL)
"""


def _run_killed(kind: str, where: str, count: int, root: Path, mode: str = "exchange") -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_AT, kind, where, str(count), str(root), mode],
        env=repo_env(),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    return proc


def test_replace_folder_swaps_and_leaves_nothing_hidden(tmp_path):
    _folder(tmp_path / "data", a="old")
    staged = _folder(tmp_path / ".data.phi3v-new-999999", a="new", b="new")
    replace_folder(staged, tmp_path / "data", "test")
    assert _content(tmp_path / "data") == {"a": "new", "b": "new"}
    assert _siblings(tmp_path) == []


def test_replace_folder_into_a_new_folder(tmp_path):
    staged = _folder(tmp_path / ".data.phi3v-new-999999", a="new")
    replace_folder(staged, tmp_path / "data", "test")
    assert _content(tmp_path / "data") == {"a": "new"} and _siblings(tmp_path) == []


def test_a_symlinked_target_is_written_through_and_the_link_kept(tmp_path):
    real = _folder(tmp_path / "disk" / "data", a="old")
    (tmp_path / "link").symlink_to(real)
    staged = _folder(tmp_path / "disk" / ".data.phi3v-new-999999", a="new")
    replace_folder(staged, tmp_path / "link", "test")
    assert (tmp_path / "link").is_symlink() and _content(tmp_path / "link") == {"a": "new"}
    assert _content(real) == {"a": "new"}


def test_sigkill_before_the_intent_is_visible_keeps_the_old_folder_and_removes_the_staged_copy(tmp_path):
    _folder(tmp_path / "data", a="old")
    _folder(tmp_path / ".data.phi3v-new-999999", a="new")
    proc = _run_killed("swap", "replace", 1, tmp_path)  # the intent's own rename
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not intent_path(tmp_path / "data").exists() and _content(tmp_path / "data") == {"a": "old"}
    messages = recover(tmp_path / "data")
    assert len(messages) == 1 and "removed .data.phi3v-new-999999, an incomplete new copy" in messages[0]
    assert _siblings(tmp_path) == [] and _content(tmp_path / "data") == {"a": "old"}


# exchange: os.replace 1 the intent, the exchange, os.replace 2 the old folder to its hidden name, then its removal;
# fallback (no RENAME_EXCHANGE): os.replace 1 the intent, 2 old folder aside, 3 new folder in place, the removal
@pytest.mark.parametrize(("mode", "where", "count"), [
    ("exchange", "exchange", 1), ("exchange", "replace", 2), ("exchange", "remove", 1),
    ("fallback", "replace", 2), ("fallback", "replace", 3), ("fallback", "remove", 1),
])  # fmt: skip
def test_sigkill_during_a_swap_then_the_next_command_finishes_it(tmp_path, mode, where, count):
    _folder(tmp_path / "data", a="old")
    _folder(tmp_path / ".data.phi3v-new-999999", a="new")
    proc = _run_killed("swap", where, count, tmp_path, mode)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert intent_path(tmp_path / "data").exists()  # the journal says what to finish
    # old or new always visible: either the folder or the staged copy holds complete content
    assert (tmp_path / "data").is_dir() or (tmp_path / ".data.phi3v-new-999999").is_dir()
    messages = recover(tmp_path / "data")
    assert len(messages) == 1 and "test-swap" in messages[0]
    assert _content(tmp_path / "data") == {"a": "new"}
    assert _siblings(tmp_path) == []


@pytest.mark.parametrize(("kind", "expected", "said"), [
    ("set_aside", {"a": "old"}, "restored the previous content"),
    ("set_aside_done", {"done.json": "{}", "new.txt": "new"}, "had finished"),
])  # fmt: skip
def test_sigkill_during_an_overwrite_restores_the_old_run_unless_the_new_one_finished(tmp_path, kind, expected, said):
    _folder(tmp_path / "run", a="old")
    # set_aside_done: killed while deleting the old run, after the new one finished
    proc = _run_killed(kind, "remove", 1, tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    hidden = [n for n in _siblings(tmp_path) if "replaced" in n]
    assert hidden, "the old run was moved aside"
    messages = recover(tmp_path / "run")
    assert said in messages[0] and "test-overwrite" in messages[0]
    assert _content(tmp_path / "run") == expected
    assert _siblings(tmp_path) == []


@pytest.mark.parametrize("count", [2, 3])  # os.replace 1 is the intent; 2, 3, 4 the moves
def test_sigkill_during_the_final_save_moves_then_the_next_command_finishes_them(tmp_path, count):
    run = _folder(tmp_path / "run", **{"model.safetensors": "old", "config.json": "old"})
    _folder(run / ".final-staging", **{"model.safetensors": "new", "config.json": "new", "extra.json": "new"})
    proc = _run_killed("moves", "replace", count, tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    messages = recover(run)
    assert "finished the final save" in messages[0]
    assert _content(run) == {"config.json": "new", "extra.json": "new", "model.safetensors": "new"}


def test_a_live_transaction_is_left_alone_and_recovered_once_its_owner_dies(tmp_path):
    _folder(tmp_path / "run", a="old")
    ready = tmp_path / "ready"
    script = """
        import sys, time
        from pathlib import Path
        from phi3v_core.transaction import SetAside
        root = Path(sys.argv[1])
        SetAside(root / "run", "long-overwrite", done_marker="done.json")
        (root / "ready").write_text("")
        time.sleep(3600)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(tmp_path)], env=repo_env())
    deadline = time.monotonic() + HANG_GUARD_S
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    try:
        assert recover(tmp_path / "run") == []  # its owner runs: nothing is touched
        assert intent_path(tmp_path / "run").exists() and _content(tmp_path / "run") == {PROOF_NAME: ANY}
    finally:
        proc.kill()
        proc.wait(timeout=HANG_GUARD_S)
    messages = recover(tmp_path / "run")
    assert "long-overwrite" in messages[0] and _content(tmp_path / "run") == {"a": "old"}


def test_set_aside_rollback_and_commit_in_process(tmp_path):
    _folder(tmp_path / "run", a="old")
    aside = SetAside(tmp_path / "run", "test", done_marker="done")
    (tmp_path / "run" / "b").write_text("new")
    aside.rollback()
    assert _content(tmp_path / "run") == {"a": "old"} and _siblings(tmp_path) == []
    aside = SetAside(tmp_path / "run", "test", done_marker="done")
    (tmp_path / "run" / "b").write_text("new")
    aside.commit()
    assert _content(tmp_path / "run") == {"b": "new"} and _siblings(tmp_path) == []


def test_move_into_replaces_same_named_folders(tmp_path):
    run = _folder(tmp_path / "run", keep="old")
    _folder(run / "sub", x="old")
    staging = _folder(run / ".final-staging")
    _folder(staging / "sub", y="new")
    move_into(staging, run, "test")
    assert _content(run / "sub") == {"y": "new"} and (run / "keep").read_text() == "old"
    assert not staging.exists() and not (run / ".moves.phi3v-txn.json").exists()


def test_leftovers_of_older_versions_are_named_not_deleted(tmp_path, capsys):
    _folder(tmp_path / "data", a="x")
    _folder(tmp_path / ".data.old-abc123", a="previous")
    _folder(tmp_path / ".data.replaced-4242", a="previous")
    messages = recover(tmp_path / "data")
    assert len(messages) == 2 and all("left over" in m for m in messages)
    assert ".data.old-abc123" in capsys.readouterr().err
    assert (tmp_path / ".data.old-abc123" / "a").read_text() == "previous"


def test_an_unreadable_intent_is_refused_and_left(tmp_path):
    _folder(tmp_path / "data", a="x")
    intent_path(tmp_path / "data").write_text("{cut off")
    with pytest.raises(JournalError, match="nothing was touched"):
        recover(tmp_path / "data")
    assert intent_path(tmp_path / "data").exists() and _content(tmp_path / "data") == {"a": "x"}


def test_nothing_to_recover_is_silent(tmp_path, capsys):
    _folder(tmp_path / "data", a="x")
    assert recover(tmp_path / "data") == [] and recover(tmp_path / "missing") == []
    assert capsys.readouterr().err == ""


def test_the_intent_is_complete_json_naming_the_steps(tmp_path):
    _folder(tmp_path / "run", a="old")
    aside = SetAside(tmp_path / "run", "cmd", done_marker="done")
    record = json.loads(intent_path(tmp_path / "run").read_text())
    assert record["kind"] == "set_aside" and record["aside"] == aside.aside.name and record["pid"] == os.getpid()
    aside.rollback()
