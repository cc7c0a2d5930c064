"""FolderLock from the user's side: real processes race for it, die holding it, and read who holds it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from phi3v_core.fs import LOCK_NAME, FolderLock, StorageError, held_lock_fds
from tests.safety_helpers import HANG_GUARD_S, repo_env


def _python(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=repo_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen | None = None) -> None:
    """Poll until ``path`` exists (the moment chosen for a signal); a hang guard, not a timing assumption."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended before {path} appeared: {proc.communicate()}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


_HOLD = """
import sys, time
from pathlib import Path
from phi3v_core.fs import FolderLock
lock = FolderLock(sys.argv[1], "holder-command --flag").acquire()
Path(sys.argv[2]).write_text("held")
time.sleep(3600)
"""


@pytest.fixture
def holder(tmp_path):
    """A real process holding the lock on ``tmp_path/out`` until killed."""
    out, ready = tmp_path / "out", tmp_path / "ready"
    proc = _python(_HOLD, str(out), str(ready))
    _wait_for(ready, proc)
    yield out, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=HANG_GUARD_S)


def test_a_second_writer_is_refused_naming_the_holder(holder):
    out, proc = holder
    with pytest.raises(StorageError, match=rf"in use by pid {proc.pid} on .*holder-command --flag.*one writer per folder"):
        FolderLock(out, "second").acquire()


def test_a_killed_holder_frees_the_lock_at_once_and_is_named(holder):
    out, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=HANG_GUARD_S)
    assert (out / LOCK_NAME).is_file()  # left behind by SIGKILL: the kernel released the lock itself
    lock = FolderLock(out, "next").acquire()
    try:
        assert lock.took_over is not None and lock.took_over["pid"] == proc.pid
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (out / LOCK_NAME).exists()


def test_a_deleted_lock_file_does_not_admit_a_second_writer(holder):
    out, proc = holder
    (out / LOCK_NAME).unlink()  # what older versions taught users to do
    with pytest.raises(StorageError, match="one writer per folder"):
        FolderLock(out, "second").acquire()
    assert proc.poll() is None


@pytest.mark.parametrize("kind", ["fifo", "dangling symlink", "symlink to a file"])
def test_a_lock_path_that_is_not_a_regular_file_is_a_clear_error(tmp_path, kind):
    out = tmp_path / "out"
    out.mkdir()
    if kind == "fifo":
        os.mkfifo(out / LOCK_NAME)
    elif kind == "dangling symlink":
        (out / LOCK_NAME).symlink_to(tmp_path / "nowhere")
    else:
        (tmp_path / "elsewhere").write_text("x")
        (out / LOCK_NAME).symlink_to(tmp_path / "elsewhere")
    # in a child process with a hang guard: the bug was a blocked open or an endless loop
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from phi3v_core.fs import FolderLock; FolderLock(sys.argv[1], 'x').acquire()",
         str(out)], env=repo_env(), capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert proc.returncode == 1 and "not one phi3v writes; remove it" in proc.stderr, proc.stderr
    assert not (tmp_path / "nowhere").exists()


def test_the_lock_file_holds_the_holder_text_while_held(holder):
    out, proc = holder
    record = json.loads((out / LOCK_NAME).read_text())
    assert record["pid"] == proc.pid and record["command"] == "holder-command --flag" and record["host"]
    assert (out / LOCK_NAME).stat().st_size > 0


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]"])
def test_an_empty_or_garbage_lock_file_never_refuses_a_run(tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_bytes(content)  # what a kill or full disk left with the old lock scheme
    with FolderLock(out, "runner") as lock:
        assert lock.held
        assert json.loads((out / LOCK_NAME).read_text())["command"] == "runner"
    assert not (out / LOCK_NAME).exists()


def test_the_lock_file_is_never_empty_at_any_moment_of_acquiring(tmp_path):
    # Watch the file while other processes take and release the lock 200 times: an empty file would be seen.
    out = tmp_path / "out"
    script = """
        import sys
        from phi3v_core.fs import FolderLock
        for _ in range(100):
            FolderLock(sys.argv[1], "churn").acquire().release()
    """
    procs = [_python(script, str(out)) for _ in range(2)]
    seen_empty = 0
    while any(p.poll() is None for p in procs):
        try:
            if (out / LOCK_NAME).stat().st_size == 0:
                seen_empty += 1
        except FileNotFoundError:
            pass
    for proc in procs:
        proc.communicate(timeout=HANG_GUARD_S)
    assert seen_empty == 0
    assert not (out / LOCK_NAME).exists()


def test_a_folder_that_cannot_be_created_names_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match=r"--out .*file.*a part of the path is a file"):
        FolderLock(blocker / "out", "runner", flag="--out").acquire()


def test_release_is_idempotent_and_leaves_no_descriptor(tmp_path):
    lock = FolderLock(tmp_path / "out", "runner").acquire()
    assert len(held_lock_fds()) == 2  # the lock file and the folder itself
    lock.release()
    lock.release()
    assert held_lock_fds() == () and not lock.held


def test_one_process_cannot_take_its_own_lock_twice(tmp_path):
    with FolderLock(tmp_path / "out", "first"), pytest.raises(StorageError, match="in use by pid"):
        FolderLock(tmp_path / "out", "second").acquire()


def test_a_beside_lock_sits_next_to_the_folder(tmp_path):
    out = tmp_path / "data"
    with FolderLock(out, "phi3v-convert", "--out_dir", beside=True) as lock:
        assert lock.path == tmp_path / f".data{LOCK_NAME}" and lock.path.is_file()
        assert not out.exists() or not (out / LOCK_NAME).exists()
        with pytest.raises(StorageError, match="--out_dir .*data is in use"):
            FolderLock(out, "phi3v-convert", "--out_dir", beside=True).acquire()


@pytest.mark.slow
def test_twenty_races_of_real_processes_have_exactly_one_winner_each(tmp_path):
    script = """
        import os, sys, time
        from pathlib import Path
        from phi3v_core.fs import FolderLock, StorageError
        trial = Path(sys.argv[2])
        while not (trial / "go").exists():
            time.sleep(0.001)
        try:
            lock = FolderLock(sys.argv[1], "racer").acquire()
        except StorageError:
            print("lost")
        else:
            print("won")
            (trial / f"won-{os.getpid()}").write_text("")
            while not (trial / "release").exists():  # hold it until every racer has tried
                time.sleep(0.01)
            lock.release()
    """
    for number in range(20):
        out, trial = tmp_path / f"out{number}", tmp_path / f"trial{number}"
        trial.mkdir()
        # a dead holder's file is there at the start: every racer finds a lock to take over
        out.mkdir()
        (out / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone", "command": "dead"}))
        procs = [_python(script, str(out), str(trial)) for _ in range(4)]
        (trial / "go").write_text("")
        deadline = time.monotonic() + HANG_GUARD_S
        while sum(p.poll() is not None for p in procs) + len(list(trial.glob("won-*"))) < len(procs):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        (trial / "release").write_text("")
        results = [p.communicate(timeout=HANG_GUARD_S)[0].strip() for p in procs]
        assert sorted(results) == ["lost", "lost", "lost", "won"], (number, results)


@pytest.mark.slow
def test_a_child_given_the_lock_keeps_it_after_the_parent_is_killed(tmp_path):
    # A sweep passes its lock to its workers (held_lock_fds): a SIGKILLed sweep stays locked while a worker lives.
    out, ready = tmp_path / "out", tmp_path / "ready"
    script = """
        import subprocess, sys, time
        from pathlib import Path
        from phi3v_core.fs import FolderLock, held_lock_fds
        FolderLock(sys.argv[1], "sweep").acquire()
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], pass_fds=held_lock_fds())
        Path(sys.argv[2]).write_text(str(child.pid))
        time.sleep(3600)
    """
    proc = _python(script, str(out), str(ready))
    _wait_for(ready, proc)
    child = int(ready.read_text())
    try:
        proc.kill()
        proc.wait(timeout=HANG_GUARD_S)
        with pytest.raises(StorageError, match=rf"pid {proc.pid} has ended but a process it started still holds"):
            FolderLock(out, "rerun").acquire()
    finally:
        os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + HANG_GUARD_S
    while True:  # the child is reaped by init; the kernel frees the lock when it is gone
        try:
            FolderLock(out, "rerun").acquire().release()
            break
        except StorageError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_lock_file_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with FolderLock(tmp_path / "out", "runner") as lock:
            assert lock.path.stat().st_mode & 0o777 == 0o666 & ~umask
    finally:
        os.umask(old)
