"""Shared helpers of the bad-input tests: run a CLI ``main`` in-process and prove nothing on disk changed."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
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
