"""File-system safety shared by every command: locks, overlap checks, write probes and OS-error messages.

Torch-free (the planner imports it). The rules it serves (issue #11):

* one writer per output folder: :class:`FolderLock` holds a kernel lock on ``.phi3v.lock`` for the holder's lifetime
  (released by the kernel when the holder dies) and keeps the holder's pid, host and command in it for messages;
* never destroy what the command did not create: :func:`overlap_problem` refuses a source inside the output (or the
  reverse), :func:`foreign_entries` lists what a folder holds beyond a command's own outputs;
* fail first: :func:`writable_problem` probes an output path before any work starts;
* a full disk or unwritable path is reported as such, naming the path: :func:`describe_os_error` and
  :func:`describe_storage_error` turn ``OSError`` (ENOSPC, EFBIG, EACCES, EROFS, ...) and torch's serializer errors
  ("enforce fail at inline_container", "File too large") into one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from phi3v_core.errors import Phi3VError
from phi3v_core.io import current_umask
from phi3v_core.transaction import journal_paths, process_alive, recover

__all__ = [
    "LOCK_NAME",
    "FolderLock",
    "StorageError",
    "check_regular_file",
    "describe_os_error",
    "describe_storage_error",
    "held_lock_fds",
    "live_transaction",
    "foreign_entries",
    "model_folder_problems",
    "overlap_problem",
    "pending",
    "process_alive",
    "weight_file_problem",
    "writable_problem",
]

#: Lock file name inside a locked folder.
LOCK_NAME = ".phi3v.lock"

_ERRNO_CAUSES = {
    errno.ENOSPC: ("no space left on the device", "free space or write elsewhere"),
    errno.EFBIG: ("file too large for the file system or the file-size limit (ulimit -f)", "raise the limit or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free space in your quota or write elsewhere"),
    errno.EACCES: ("permission denied", "fix the permissions or choose another path"),
    errno.EPERM: ("operation not permitted", "fix the permissions or choose another path"),
    errno.EROFS: ("read-only file system", "choose a writable path"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path"),
    errno.EISDIR: ("is a folder, not a file", "check the path"),
    errno.EEXIST: ("already exists", "choose another path"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
    errno.EIO: ("input/output error (failing disk or network file system)", "check the device"),
}


class StorageError(Phi3VError):
    """A file could not be written or read for a reason of the storage (full, too large, read-only, locked)."""


def describe_os_error(exc: OSError, path: str | os.PathLike[str] | None = None) -> str:
    """One line naming the path, the cause and the fix for an ``OSError``.

    Args:
        exc: The error.
        path: The path the caller was working on (used when the error carries none).
    """
    where = exc.filename if exc.filename is not None else path
    cause, fix = _ERRNO_CAUSES.get(exc.errno or -1, (exc.strerror or str(exc) or type(exc).__name__, "check the path"))
    target = f"{where}: " if where is not None else ""
    return f"{target}{cause}; {fix}"


def describe_storage_error(exc: BaseException, path: str | os.PathLike[str] | None = None) -> str | None:
    """A one-line message for write failures that hide their cause, or ``None`` when ``exc`` is something else.

    Torch's zip writer raises ``RuntimeError("[enforce fail at inline_container.cc:...] . unexpected pos ...")`` on
    a full disk and ``RuntimeError("... File too large")`` past ``ulimit -f``; neither names the file.
    """
    if isinstance(exc, OSError) and exc.errno in _ERRNO_CAUSES:
        return describe_os_error(exc, path)
    text = str(exc)
    where = f"{path}: " if path is not None else ""
    if "File too large" in text:
        return f"{where}{_ERRNO_CAUSES[errno.EFBIG][0]}; {_ERRNO_CAUSES[errno.EFBIG][1]}"
    if "No space left on device" in text:
        return f"{where}{_ERRNO_CAUSES[errno.ENOSPC][0]}; {_ERRNO_CAUSES[errno.ENOSPC][1]}"
    if "inline_container" in text or "unexpected pos" in text:
        return (
            f"{where}writing the file failed part-way (the disk is probably full or a file-size limit was hit); "
            "free space or raise the limit, then rerun"
        )
    return None


def check_regular_file(path: Path, what: str = "file") -> str | None:
    """``None`` when ``path`` is a regular file (after symlinks), else the reason. Never opens it (a FIFO would hang).

    Args:
        path: The file.
        what: What the file is, for the message.
    """
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"{what} not found; fix the path or add the file"
    except OSError as exc:
        return describe_os_error(exc, path).split(": ", 1)[-1]
    if stat.S_ISREG(mode):
        return None
    kind = (
        "a folder"
        if stat.S_ISDIR(mode)
        else "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a regular file"
    )
    return f"is {kind}, not a regular {what}; point to a regular file"


def overlap_problem(source: Path, output: Path, source_flag: str, output_flag: str) -> str | None:
    """Refuse a source and an output folder that contain each other (either way) or are the same folder."""
    src, out = Path(source).expanduser().resolve(), Path(output).expanduser().resolve()
    if src == out:
        return f"{output_flag} {output} is the source folder {source_flag} {source}; write the output elsewhere"
    if src in out.parents:
        return f"{output_flag} {output} is inside the source folder {source_flag} {source}; write the output elsewhere"
    if out in src.parents:
        return (
            f"{output_flag} {output} contains the source folder {source_flag} {source}; replacing it would delete the "
            "source: write the output elsewhere"
        )
    return None


def writable_problem(path: Path, flag: str) -> str | None:
    """Why a folder cannot be created or written at ``path`` (``None`` when it can). Creates nothing.

    Checks that ``path`` is not a file, and that the nearest existing folder on the way is writable.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        return f"{flag} {path} exists and is not a folder; choose a folder path"
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{flag} {path}: {probe} is a file, not a folder; choose another path"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{flag} {path}: {probe} is not writable (permission denied or read-only); choose a writable path"
    return None


def foreign_entries(folder: Path, own: Iterable[str], own_prefixes: Iterable[str] = ()) -> list[str]:
    """Names in ``folder`` that are neither in ``own`` nor start with one of ``own_prefixes`` (sorted)."""
    own_set, prefixes = set(own), tuple(own_prefixes)
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in own_set and not p.name.startswith(prefixes))


#: Size of the holder record: written in place with one ``pwrite`` (never truncated, so never empty).
_HOLDER_BYTES = 2048
#: Lock file descriptors this process holds (child processes that must keep a lock alive inherit them).
_HELD_FDS: set[int] = set()


def held_lock_fds() -> tuple[int, ...]:
    """File descriptors of the :class:`FolderLock` objects this process holds.

    Pass them to ``subprocess.Popen(pass_fds=...)``: a worker that inherits one keeps the lock held until it exits,
    so a sweep killed with SIGKILL stays locked while one of its workers still runs.
    """
    return tuple(sorted(_HELD_FDS))


def _holder_record(payload: dict[str, Any]) -> bytes:
    raw = json.dumps(payload).encode()
    if len(raw) > _HOLDER_BYTES - 1:
        payload = {**payload, "command": str(payload.get("command", ""))[:200]}
        raw = json.dumps(payload).encode()[: _HOLDER_BYTES - 1]
    return raw.ljust(_HOLDER_BYTES - 1) + b"\n"  # trailing spaces are valid JSON whitespace


class FolderLock:
    """One writer per folder: a kernel lock (``fcntl.flock``) on ``.phi3v.lock``, held for the holder's lifetime.

    The kernel releases the lock when the holder exits or is killed (even by SIGKILL), so there is no staleness to
    guess and no take-over race: exactly one of any number of racing processes gets it. The file also holds the
    holder's pid, host and command, for the message others get. It is born with that text (written to a temporary
    file and hard-linked into place) and later rewritten in place at a fixed size, so it is never empty.

    On NFS, Linux (>= 2.6.12) emulates ``flock`` with ``fcntl`` byte-range locks, which the NFS lock protocol shares
    between clients: the lock works across machines as long as the server supports locking (``nolock`` mounts make
    every lock local to one client).

    A lock file left by a process that ended without releasing (killed) is reused silently apart from
    :attr:`took_over`, which names the previous holder.

    Args:
        folder: The folder to lock (created when missing).
        command: What holds the lock (for the message).
        flag: The flag naming the folder (for the message).
        beside: Lock ``<parent>/.<name>.phi3v.lock`` instead of a file inside the folder (for a folder that is
            replaced as a whole, such as a converted data folder).
    """

    def __init__(
        self, folder: str | os.PathLike[str], command: str, flag: str = "--output_dir", *, beside: bool = False
    ) -> None:
        self.folder = Path(folder)
        self.beside = beside
        self.path = self.folder.parent / f".{self.folder.name}{LOCK_NAME}" if beside else self.folder / LOCK_NAME
        self.command = command
        self.flag = flag
        self.took_over: dict[str, Any] | None = None
        self._fd: int | None = None
        self._dir_fd: int | None = None

    @property
    def held(self) -> bool:
        """This object holds the lock."""
        return self._fd is not None

    def _holder(self) -> dict[str, Any] | None:
        import stat

        try:
            if not stat.S_ISREG(os.lstat(self.path).st_mode):
                return {}  # never opened: a FIFO would block
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            data = json.loads(self.path.read_bytes() or b"{}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _open_or_create(self, record: bytes) -> int:
        """Open the lock file, creating it already holding ``record`` when missing (never an empty file)."""
        import stat

        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO must not block us
            except FileNotFoundError:
                fd = None
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                fd = None
            if fd is not None and stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
            if fd is not None or self.path.is_symlink():
                if fd is not None:
                    os.close(fd)
                kind = "a symbolic link" if self.path.is_symlink() else "not a regular file (a FIFO or device?)"
                raise StorageError(
                    f"{self.flag} {self.folder}: the lock file {self.path} is {kind}, not one phi3v writes; "
                    "remove it (no phi3v process uses it), then rerun"
                )
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f"{self.path.name}.", suffix=".tmp")
            try:
                os.fchmod(fd, 0o666 & ~current_umask())  # readable as the user's files are: others see the holder
                os.write(fd, record)
                os.fsync(fd)
                os.close(fd)
                os.link(tmp, self.path)  # atomic, and fails instead of replacing a lock file someone else made
            except FileExistsError:
                continue
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        raise StorageError(f"{self.flag} {self.folder}: could not create the lock file {self.path}; retry")

    def acquire(self, *, recovering: bool = True) -> FolderLock:
        """Take the lock (without waiting); first finish or roll back a transaction interrupted in the folder.

        Besides ``.phi3v.lock`` (which names the holder), the folder itself is locked: deleting the lock file does
        not admit a second writer. A folder that another process is replacing (a live transaction) is refused.

        Args:
            recovering: Recover the folder first (``False`` for a hidden folder a transaction is building).

        Raises:
            StorageError: Another process holds it (named), or the folder cannot be written.
        """
        import fcntl

        if not self.beside and recovering:
            recover(self.folder)
            live = live_transaction(self.folder)
            if live is not None and isinstance(live.get("pid"), int) and not process_alive(live["pid"]):
                # The journal is locked by a command recovering it, not by its (dead) owner.
                raise StorageError(
                    f"{self.flag} {self.folder}: another command is recovering the interrupted {live.get('command')} "
                    f"(pid {live.get('pid')}, ended) on it: one writer per folder; run this again in a moment"
                )
            if live is not None:
                raise StorageError(
                    f"{self.flag} {self.folder} is being replaced by pid {live.get('pid')} ({live.get('command')}): "
                    "one writer per folder; wait for it to finish or choose another folder"
                )
        target = self.path.parent
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{self.flag} " + describe_os_error(exc, target)) from None
        if not self.beside:
            self._lock_folder()
        payload = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "since": time.time()}
        record = _holder_record(payload)
        for _ in range(20):
            try:
                fd = self._open_or_create(record)
            except OSError as exc:
                self._drop_folder_lock()
                raise StorageError(f"{self.flag} " + describe_os_error(exc, self.path)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._drop_folder_lock()
                raise StorageError(self._busy_message()) from None
            except OSError as exc:
                os.close(fd)
                self._drop_folder_lock()
                raise StorageError(f"{self.flag} {self.path}: cannot lock ({describe_os_error(exc)})") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (and removed) it between our open and lock: lock the new file
                os.close(fd)
                continue
            previous = self._holder()
            if previous and previous.get("pid") != os.getpid() and previous != payload:
                self.took_over = previous
            try:
                os.pwrite(fd, record, 0)
            except OSError as exc:
                os.close(fd)
                self._drop_folder_lock()
                raise StorageError(f"{self.flag} " + describe_os_error(exc, self.path)) from None
            self._fd = fd
            _HELD_FDS.add(fd)
            return self
        self._drop_folder_lock()
        raise StorageError(f"{self.flag} {self.folder}: could not take the lock {self.path}; retry")

    def _lock_folder(self) -> None:
        """Lock the folder itself (its inode): a removed or replaced lock file cannot admit a second writer."""
        import fcntl

        for _ in range(20):
            try:
                fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                self.folder.mkdir(parents=True, exist_ok=True)
                continue
            except OSError as exc:
                raise StorageError(f"{self.flag} " + describe_os_error(exc, self.folder)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StorageError(self._busy_message()) from None
            except OSError:
                os.close(fd)  # a file system without flock on folders: the lock file alone guards it
                return
            try:
                same = os.fstat(fd).st_ino == os.stat(self.folder).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._dir_fd = fd
                _HELD_FDS.add(fd)
                return
            os.close(fd)  # replaced between our open and lock: lock the folder now at the path
        raise StorageError(f"{self.flag} {self.folder}: the folder kept changing while locking it; retry")

    def _drop_folder_lock(self) -> None:
        if self._dir_fd is not None:
            _HELD_FDS.discard(self._dir_fd)
            with contextlib.suppress(OSError):
                os.close(self._dir_fd)
            self._dir_fd = None

    def moved_to(self, folder: str | os.PathLike[str]) -> None:
        """The held folder was renamed to ``folder`` (a transaction put it in place): name it there from now on."""
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME

    def _busy_message(self) -> str:
        holder = self._holder() or {}
        pid, host = holder.get("pid"), holder.get("host")
        who = f"pid {pid} on {host} ({holder.get('command')})" if pid else "another process"
        hint = "wait for it to finish or choose another folder"
        if isinstance(pid, int) and host == socket.gethostname() and not process_alive(pid):
            hint = (
                f"pid {pid} has ended but a process it started still holds the lock (e.g. a worker); "
                f"wait for it, or find it with `fuser {self.path}`"
            )
        return f"{self.flag} {self.folder} is in use by {who}: one writer per folder; {hint}"

    def release(self) -> None:
        """Remove the lock file and release the kernel lock (in that order, so no one locks a removed file)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        _HELD_FDS.discard(self._fd)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None
        self._drop_folder_lock()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def weight_file_problem(path: Path) -> str | None:
    """Why a weight file cannot be loaded (``None`` when its header and size are consistent). Reads the header only.

    ``*.safetensors``: the 8-byte header length, the JSON header, and the file long enough for every tensor.
    ``*.bin`` / ``*.pt`` / ``*.pth`` (torch zip format): the zip central directory at the end (a cut-off file has none).
    """
    import struct
    import zipfile

    reason = check_regular_file(path, "weight file")
    if reason:
        return reason
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        try:
            with path.open("rb") as handle:
                raw = handle.read(8)
                if len(raw) < 8:
                    return f"truncated ({size} bytes, no safetensors header)"
                (length,) = struct.unpack("<Q", raw)
                if length > min(size - 8, 100_000_000):
                    return f"truncated or not a safetensors file (header of {length} bytes in a {size}-byte file)"
                header = json.loads(handle.read(length))
        except (OSError, ValueError) as exc:
            return f"unreadable safetensors header ({exc})"
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + length + end > size:
            return f"truncated: the header describes {8 + length + end} bytes, the file has {size}"
        return None
    if path.suffix in (".bin", ".pt", ".pth"):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        except (OSError, zipfile.BadZipFile) as exc:
            return f"truncated or not a torch file ({exc})"
    return None


def model_folder_problems(folder: Path, flag: str) -> list[str]:
    """A checkpoint folder's model type and weight headers, read without loading it; one message per problem.

    Args:
        folder: The folder given on the command line.
        flag: How the user gave it (``"--model PATH"``), named at the start of each message.

    Returns:
        Problems (empty when the folder looks loadable, and for a folder without ``config.json``: callers report a
        path that is neither a preset nor a checkpoint themselves).
    """
    config_path = folder / "config.json"
    if not config_path.is_file():
        return []
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        return [f"{flag}: config.json is not readable JSON ({exc}); restore the checkpoint's config.json"]
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "phi3_v":
        return [
            f"{flag}: config.json has model_type {model_type!r}, not 'phi3_v'; pass a Phi-3-vision or "
            "Phi-3.5-vision checkpoint folder"
        ]
    problems = []
    for weights in sorted([*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")]):
        reason = weight_file_problem(weights)
        if reason:
            problems.append(f"{flag}: {weights.name}: {reason}; download the file again")
    return problems


def live_transaction(target: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record of a transaction on ``target`` whose owner still runs (``None`` when there is none)."""
    import fcntl
    import stat

    for path in journal_paths(target):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    record = json.loads(os.read(fd, 1 << 20) or b"{}")
                except ValueError:
                    record = {}
                return record if isinstance(record, dict) else {}
        finally:
            os.close(fd)
    return None


def pending(target: str | os.PathLike[str], flag: str = "the folder") -> list[str]:
    """Report (stderr) interrupted transactions on ``target`` without touching anything: for read-only commands.

    Args:
        target: The folder the command reads.
        flag: How the command names it (``--data_dir``), for the message.

    Returns:
        The messages printed.
    """
    messages = []
    for path in journal_paths(target):
        if not (path.exists() or path.is_symlink()):
            continue
        record: Any = None
        if check_regular_file(path) is None and not path.is_symlink():  # never opens a FIFO
            with contextlib.suppress(OSError, ValueError), path.open("rb") as handle:
                record = json.loads(handle.read(1 << 20))
        command = str((record if isinstance(record, dict) else {}).get("command") or "a phi3v command").split(" ")[0]
        messages.append(
            f"{flag} {target}: an interrupted {command} left a transaction ({path.name}); this command only reads and "
            f"leaves it: the next {_finisher(command, Path(target))} finishes or rolls it back"
        )
    for message in messages:
        print(f"note: {message}", file=sys.stderr)
    return messages


def _finisher(command: str, target: Path) -> str:
    if command == "phi3v-convert":
        return f"`phi3v-convert ... --out_dir {target}`"
    if command == "phi3v-finetune":
        return f"`phi3v-finetune --output_dir {target} ...`"
    return f"phi3v command that writes {target}"
