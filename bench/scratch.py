"""What a SIGKILLed measurement cannot leak: scratch folders (cleaned by the next command) and workers (they die).

Every ``/tmp/phi3v-bench-*`` folder the runner makes holds ``.phi3v-owner``, locked (``flock``) by the runner and
inherited by its workers. A folder whose owner file is unlocked belongs to processes that all ended (a SIGKILLed
sweep and its workers): :func:`clean_stale` removes it and says so. Folders without an owner file (older versions,
or anything else under the prefix) are never touched.

Workers are started with :func:`die_with_parent`: the kernel sends them SIGTERM when the runner dies, even by
SIGKILL (``prctl(PR_SET_PDEATHSIG)``), so a killed sweep leaves no worker holding the GPU and the lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["OWNER_NAME", "PREFIXES", "clean_stale", "die_with_parent", "owned_tempdir"]

#: The lock file inside each scratch folder.
OWNER_NAME = ".phi3v-owner"
#: Scratch folder prefixes in the temp folder (per repeat; the FLOP cache shared by a configuration's repeats).
PREFIXES = ("phi3v-bench-", "phi3v-bench-flops-")


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> Callable[[], None]:
    """A ``Popen(preexec_fn=...)`` that makes the child receive SIGTERM when this process dies (Linux; elsewhere a no-op).

    SIGTERM, not SIGKILL: torchrun then stops the workers it started in sessions of their own.
    """
    parent = os.getpid() if parent is None else parent

    def preexec() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)  # the parent died before the signal was armed

    return preexec


@contextlib.contextmanager
def owned_tempdir(prefix: str) -> Iterator[tuple[Path, int]]:
    """A new scratch folder and the descriptor of its locked owner file (pass it to workers); removed at the end."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    fd = os.open(folder / OWNER_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield folder, fd
    finally:
        os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)


def _stale(folder: Path) -> bool:
    """Whether ``folder`` is a scratch folder whose owners all ended (its owner file exists and is unlocked)."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode) or not stat.S_ISREG(os.lstat(folder / OWNER_NAME).st_mode):
            return False
        fd = os.open(folder / OWNER_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a runner or one of its workers still holds it
    finally:
        os.close(fd)
    return True


def clean_stale(root: str | os.PathLike[str] | None = None) -> list[str]:
    """Remove the scratch folders of killed measurements under ``root`` (default: the temp folder); say each on stderr.

    Returns:
        The messages printed.
    """
    base = Path(root if root is not None else tempfile.gettempdir())
    messages = []
    with contextlib.suppress(OSError):
        for folder in sorted(base.glob("phi3v-bench-*")):
            if folder.name.startswith(PREFIXES) and _stale(folder):
                shutil.rmtree(folder, ignore_errors=True)
                messages.append(f"removed {folder}, the scratch folder of a measurement that was killed")
    for message in messages:
        print(f"note: {message}", file=sys.stderr)
    return messages
