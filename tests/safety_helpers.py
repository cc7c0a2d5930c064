"""Shared helpers of the bad-input tests: run a CLI ``main`` in-process and prove nothing on disk changed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: The one limit a test puts on a subprocess: a hang guard, never a speed requirement. A loaded 2-core machine runs
#: the multi-process tests several times slower than an idle one; only a process that never ends should hit it.
HANG_GUARD_S = 3600


def repo_env() -> dict[str, str]:
    """This environment with the repository first on ``PYTHONPATH``: a subprocess runs this checkout's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def process_running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(")")[-1].split()[0] == "Z")


def wait_until(condition: Callable[[], object], what: str) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after :data:`HANG_GUARD_S` (a hang guard, not a timing)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


#: Runs a CLI's ``main`` (module in argv[1], the CLI's arguments after it) with a full disk at the one ``os.write``
#: that writes an overwrite journal's record: the ENOSPC of a disk that fills up exactly there.
_FULL_DISK_AT_THE_JOURNAL = """
import errno, importlib, os, sys
real = os.write
def write(fd, data):
    if bytes(data[:12]).startswith(b'{"target":'):  # the overwrite journal's record, and nothing else
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(fd, data)
os.write = write
module = sys.argv.pop(1)
sys.argv[0] = "phi3v-" + module.rsplit(".", 1)[-1]
importlib.import_module(module).main()
"""


def run_with_full_disk_at_the_journal(
    module: str, argv: Sequence[str], env: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    """``python -m module argv`` in a subprocess whose disk is full when the overwrite journal is written."""
    return subprocess.run(
        [sys.executable, "-c", _FULL_DISK_AT_THE_JOURNAL, module, *argv],
        env=dict(env), capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip


def snapshot(root: Path) -> dict[str, str]:
    """Path → content hash (or kind) of everything under ``root``; symlinks and special files by their target/kind."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            path = Path(dirpath, name)
            rel = os.path.relpath(path, root)
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "special"
    return out


def expect_user_error(
    main: Callable[[Sequence[str]], int | None],
    argv: Sequence[str],
    message: str,
    root: Path,
    capsys: pytest.CaptureFixture[str],
) -> str:
    """``main(argv)`` exits 1 with one ``error:`` line containing ``message``, no traceback, and ``root`` unchanged."""
    before = snapshot(root)
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    captured = capsys.readouterr()
    assert info.value.code == 1, captured.err
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    assert message in captured.err, captured.err
    assert snapshot(root) == before, "a failed command changed files"
    return captured.err
