"""Journaled folder replacements: a kill at any moment leaves the old or the new content visible, never neither.

Torch-free. Every replace that takes more than one rename (``phi3v-convert --overwrite``, ``phi3v-finetune
--overwrite_output_dir``, the final save's file moves) runs as a transaction:

1. the new folder is made as a hidden sibling ``.<target>.phi3v-new-<pid>`` holding a *proof* file
   (:data:`PROOF_NAME`) with the transaction's random id (killed before the proof, it is empty: removed as such);
2. an *intent* file is written (temporary file, fsync, rename, fsync of the folder) naming the target, the hidden
   siblings, the id and the device/inode of the old folder; the process keeps a kernel lock (``flock``) on it while
   the transaction runs;
3. the new folder is exchanged with the old one in one atomic step (``renameat2(RENAME_EXCHANGE)``, so the target
   path never disappears; two renames where the file system lacks it), the old one renamed to its hidden name;
4. the old folder is removed, the proof file, then the intent (last).

:func:`recover` is called by every command that writes a folder (:class:`phi3v_core.fs.FolderLock` calls it): an
intent whose lock is free belongs to a process that died (SIGKILL, power loss), and is finished or rolled back, with
one line on stderr saying which. Recovery trusts nothing in the journal it cannot check:

* the journal may only name the hidden siblings this module writes and plain file names; anything else (an absolute
  path, ``..``, a ``/``) is refused with one line and nothing is touched (:class:`JournalError`);
* a folder is removed or replaced only when it proves it belongs to this transaction: it holds the journal's id
  (folders the transaction made) or has the device and inode the journal recorded (the old folder it moved). A folder
  failing the proof (the user re-created the target after the kill) is left as is and reported;
* a folder another process holds (its ``flock``) is never removed.

Read-only commands call :func:`phi3v_core.fs.pending` instead: they report, and change nothing. Kinds:
``swap`` (:func:`replace_folder`; the new folder is complete before the intent: recovery rolls forward),
``set_aside`` (:class:`SetAside`: old folder aside, new one built in place; kept when it holds ``done_marker``, else
the old one is restored), ``moves`` (:func:`move_into`: entries of a complete ``staged`` move in; recovery finishes).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from phi3v_core.errors import Phi3VError
from phi3v_core.signals import stops_deferred

__all__ = ["PROOF_NAME", "JournalError", "SetAside", "intent_path", "journal_paths", "move_into", "process_alive", "recover", "replace_folder", "staging_folder"]  # fmt: skip

_SUFFIX = ".phi3v-txn.json"
#: Inside every folder a transaction made: the transaction's id (proof for recovery that the folder is its own).
PROOF_NAME = ".phi3v-txn-id"
_ROLES = {"swap": ("new", "old"), "set_aside": ("new", "replaced")}
_ID = re.compile(r"[0-9a-f]{32}")


class JournalError(Phi3VError):
    """A transaction record names something this code never writes: refused, nothing touched."""

def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a pid owned by another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def intent_path(target: str | os.PathLike[str]) -> Path:
    """Where the intent of a transaction on folder ``target`` lives: a hidden sibling of the folder."""
    target = Path(target)
    return target.parent / f".{target.name}{_SUFFIX}"


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _say(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# --- proofs -------------------------------------------------------------------------------------------------------


def _mark(folder: Path, txn_id: str) -> None:
    fd = os.open(folder / PROOF_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, txn_id.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _proof(folder: Path) -> str | None:
    """The id in ``folder``'s proof file (``None``: no folder, no proof, or not a regular file: never opened then)."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode) or not stat.S_ISREG(os.lstat(folder / PROOF_NAME).st_mode):
            return None
        return (folder / PROOF_NAME).read_text()[:64].strip()
    except (OSError, UnicodeDecodeError):
        return None


def _unmark(folder: Path) -> None:
    with contextlib.suppress(OSError):
        (folder / PROOF_NAME).unlink()


def _inode(path: Path) -> list[int] | None:
    """``[device, inode]`` of the real folder ``path`` (``None`` when it is not one)."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return [info.st_dev, info.st_ino] if stat.S_ISDIR(info.st_mode) else None


def _held_by_other(folder: Path) -> bool:
    """Whether another process holds the kernel lock of ``folder`` itself (a writer works in it)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also drops the probe lock
    return False


def staging_folder(target: Path) -> Path:
    """Make the hidden folder ``.<target>.phi3v-new-<pid>`` (empty but for its proof) to build new content in."""
    target = _real(target)
    folder = _sibling(target, "new")
    shutil.rmtree(folder, ignore_errors=True)  # our own pid's: a copy this process started before
    folder.mkdir()
    _mark(folder, uuid.uuid4().hex)
    return folder


# --- atomic steps -------------------------------------------------------------------------------------------------

_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; ``False`` where the kernel or file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGTERM/SIGHUP/SIGINT for the few renames of a swap: a stop lands after them, never between."""
    held = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)  # a process without our handlers (the default action)
    try:
        with stops_deferred():  # our handlers, whichever thread the signal reached
            yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _swap_in(new: Path, target: Path, aside: Path) -> None:
    """Put ``new`` at ``target`` and what was there at ``aside``; ``target`` never disappears where it can."""
    if target.exists() or target.is_symlink():
        if _exchange(new, target):
            os.replace(new, aside)
        else:
            os.replace(target, aside)
            os.replace(new, target)
    else:
        os.replace(new, target)
    _fsync_dir(target.parent)


class _Intent:
    """The intent file of one transaction, locked by its owner from before it is visible until it is removed."""

    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        self.path = path
        self.record = record
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = json.dumps(record).encode() + b"\n"
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
            os.fsync(fd)
            os.replace(tmp, path)  # visible only complete, already locked by us
        except BaseException as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError) and exc.filename is None:
                exc.filename = str(tmp)  # the path in the message (a full disk at the journal)
            raise
        self.fd: int | None = fd
        _fsync_dir(path.parent)

    def done(self) -> None:
        """Remove the intent (the last step) and release its lock."""
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        _fsync_dir(self.path.parent)
        os.close(self.fd)
        self.fd = None


def _begin(target: Path, record: dict[str, Any]) -> _Intent:
    record = {"target": target.name, "pid": os.getpid(), **record}
    return _Intent(intent_path(target), record)


def _sibling(target: Path, role: str) -> Path:
    return target.parent / f".{target.name}.phi3v-{role}-{os.getpid()}"


def replace_folder(staged: Path, target: Path, command: str) -> None:
    """Put the complete folder ``staged`` in place of ``target`` (which may be missing) as one transaction.

    Args:
        staged: A complete folder, a sibling of ``target`` named ``.<target>.phi3v-new-<pid>`` (from
            :func:`staging_folder`, or marked here).
        target: The folder to replace (a symlink is resolved first: the real folder is replaced, the link kept).
        command: The command, named in recovery messages.
    """
    target = _real(target)
    aside = _sibling(target, "old")
    txn_id = _proof(staged)
    if txn_id is None or not _ID.fullmatch(txn_id):
        txn_id = uuid.uuid4().hex
        _mark(staged, txn_id)
    record = {"kind": "swap", "command": command, "staged": staged.name, "aside": aside.name, "id": txn_id}
    with _signals_held():  # a stop lands after the renames: the target path is never missing nor half-swapped
        intent = _begin(target, {**record, "old": _inode(target)})
        _swap_in(staged, target, aside)
    _remove(aside)
    _unmark(target)  # after the removal: until then recovery needs the proof to finish it
    intent.done()


def move_into(staged: Path, target: Path, command: str) -> None:
    """Move every entry of the complete folder ``staged`` into ``target`` (replacing same-named entries), journaled.

    Recovery finishes the moves, so a kill leaves the old files or all the new ones once the next command ran.
    """
    txn_id = uuid.uuid4().hex
    names = sorted(p.name for p in staged.iterdir() if p.name != PROOF_NAME)
    replaces = {name: _inode(target / name) for name in names if _inode(target / name)}
    _mark(staged, txn_id)
    intent = _Intent(
        target / f".moves{_SUFFIX}",
        {"kind": "moves", "command": command, "pid": os.getpid(), "staged": staged.name, "names": names,
         "id": txn_id, "replaces": replaces},
    )  # fmt: skip
    _finish_moves(target, staged, names, replaces)
    intent.done()


def _finish_moves(target: Path, staged: Path, names: list[str], replaces: dict[str, Any]) -> list[str]:
    """Move the named entries still in ``staged``; a folder in the way is replaced only when it is the recorded one."""
    kept = []
    for name in names:
        item = staged / name
        if not (item.exists() or item.is_symlink()):
            continue  # moved before the kill
        destination = target / name
        if destination.is_dir() and not destination.is_symlink():
            if _inode(destination) != replaces.get(name):
                kept.append(name)
                continue
            shutil.rmtree(destination)
        os.replace(item, destination)
    if not kept:
        _remove(staged)
    return kept


class SetAside:
    """Move folder ``target`` aside while a new one is built in its place; keep or restore the old one at the end.

    The new folder is made (with the transaction's proof) before it becomes visible, and ``prepare`` runs on it then:
    the caller locks it there, so the target path is held by one lock from the old folder to the new one.

    Args:
        target: The folder (a symlink is resolved: the real folder is moved and rebuilt, the link kept).
        command: The command, named in recovery messages.
        done_marker: A file whose presence in the new folder means it is complete (recovery then keeps it).
        prepare: Called with the hidden new folder before it is put in place.
    """

    def __init__(
        self, target: Path, command: str, done_marker: str, prepare: Callable[[Path], Any] | None = None
    ) -> None:
        self.target = _real(target)
        self.aside = _sibling(self.target, "replaced")
        new = staging_folder(self.target)
        self.id = _proof(new) or ""
        try:
            if prepare is not None:
                prepare(new)
            self._intent = _begin(
                self.target,
                {"kind": "set_aside", "command": command, "staged": new.name, "aside": self.aside.name,
                 "done_marker": done_marker, "id": self.id, "old": _inode(self.target)},
            )  # fmt: skip
        except BaseException:
            _remove(new)
            raise
        with _signals_held():
            _swap_in(new, self.target, self.aside)

    def commit(self) -> None:
        """The new folder is complete: delete the old one."""
        _remove(self.aside)
        _unmark(self.target)
        self._intent.done()

    def rollback(self) -> None:
        """The new folder failed: delete it and put the old one back (the target path never disappears)."""
        if _proof(self.target) == self.id:
            if self.aside.exists():
                _swap_in(self.aside, self.target, self.aside.with_name(_sibling(self.target, "new").name))
                _remove(_sibling(self.target, "new"))
            else:
                _remove(self.target)
        elif not self.target.exists() and self.aside.exists():
            os.replace(self.aside, self.target)
        _fsync_dir(self.target.parent)
        self._intent.done()


def _real(target: Path) -> Path:
    target = Path(target).expanduser()
    return target.resolve() if target.is_symlink() else target.absolute()


# --- recovery -----------------------------------------------------------------------------------------------------


def _plain(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _journal_problem(record: Any, target: Path) -> str | None:
    """Why the record may not be acted on (``None``: every name in it is one this module writes)."""
    if not isinstance(record, dict):
        return "is not a transaction record"
    kind = record.get("kind")
    if kind not in ("swap", "set_aside", "moves"):
        return f"has the unknown kind {kind!r}"
    if not isinstance(record.get("id"), str) or not _ID.fullmatch(record["id"]):
        return "has no transaction id (written by an older version or by hand)"
    if kind == "moves":
        names = record.get("names")
        if not isinstance(names, list):
            return "lists no names"
        for name in [record.get("staged"), *names]:
            if not _plain(name):
                return f"names {name!r}, which is not a plain file name"
        return None
    if record.get("target") != target.name:
        return f"is for {record.get('target')!r}, not {target.name!r}"
    for field, role in zip(("staged", "aside"), _ROLES[kind], strict=True):
        value = record.get(field)
        if not (isinstance(value, str) and re.fullmatch(rf"\.{re.escape(target.name)}\.phi3v-{role}-\d+", value)):
            return f"names {value!r} as {field}, not the .{target.name}.phi3v-{role}-<pid> sibling phi3v writes"
    old = record.get("old")
    if old is not None and not (isinstance(old, list) and len(old) == 2 and all(isinstance(v, int) for v in old)):
        return f"records {old!r} as the old folder's identity"
    return None


def _read_locked(path: Path) -> tuple[int, Any] | None:
    """Open and lock the intent ``path`` (``None``: gone, or its owner or another recoverer holds it)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise JournalError(f"{path}: cannot be opened ({exc.strerror}); nothing was touched: remove it") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise JournalError(f"{path} is not a regular file; nothing was touched: remove it")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise FileNotFoundError  # finished meanwhile
        try:
            record = json.loads(os.read(fd, 1 << 20) or b"null")
        except ValueError:
            record = None
        return fd, record
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise


def _recover_one(path: Path, target: Path) -> str | None:
    """Finish or roll back the transaction of ``path`` when its owner is gone; what was done (``None``: nothing)."""
    opened = _read_locked(path)
    if opened is None:
        return None
    fd, record = opened
    try:
        problem = _journal_problem(record, target)
        if problem:
            raise JournalError(
                f"{path} {problem}: refused, nothing was touched; phi3v journals name only its own hidden siblings "
                "and plain file names: look at what it points to, then delete it"
            )
        message = _apply(record, target)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        _fsync_dir(path.parent)
        return message
    finally:
        os.close(fd)


def _apply(record: dict[str, Any], target: Path) -> str:
    who = f"{record.get('command', 'a command')} (pid {record.get('pid')})"
    if record["kind"] == "moves":
        staged = target / record["staged"]
        if staged.exists() and _proof(staged) != record["id"]:
            return f"{staged} was changed after {who} was interrupted: left as is; the final save was not finished"
        if staged.exists():
            kept = _finish_moves(target, staged, record["names"], record.get("replaces") or {})
            if kept:
                return (
                    f"{target}: {', '.join(kept)} changed after {who} was interrupted: left as is; the new version "
                    f"is kept in {staged}"
                )
        return f"{target}: finished the final save interrupted in {who}"
    return _apply_replace(record, target, who)


def _apply_replace(record: dict[str, Any], target: Path, who: str) -> str:
    """Recover a swap or set-aside by what the proofs say sits where (never by the journal's word alone)."""
    staged, aside = target.parent / record["staged"], target.parent / record["aside"]
    ours = next((p for p in (target, staged) if _proof(p) == record["id"]), None)
    old = next((p for p in (target, staged, aside) if record.get("old") and _inode(p) == record["old"]), None)
    if ours is not None and _held_by_other(ours):
        return f"{ours} is in use by another process: left as is after {who} was interrupted"
    target_is_foreign = (target.exists() or target.is_symlink()) and target not in (ours, old)
    if record["kind"] == "swap" and ours == staged and not target_is_foreign:
        _swap_in(staged, target, aside)  # the new content was complete: roll forward
        ours, old = target, (aside if old is not None else None)
    finished = ours == target and (record["kind"] == "swap" or (target / str(record.get("done_marker"))).is_file())
    if finished:
        if old is not None:
            _remove(old)
        _unmark(target)
        return f"{target}: {who} had finished; removed the previous content it replaced (the new content is in place)"
    if ours == target:
        if old is None:
            _unmark(target)
            return f"{target}: {who} was interrupted and the previous content is gone: the unfinished new content is kept"
        _swap_in(old, target, staged)  # the previous content back in one step; ours now at the staged name
        if _proof(staged) == record["id"]:
            _remove(staged)
        return (
            f"{target}: {who} was interrupted before it finished; restored the previous content (the interrupted "
            "replacement was discarded)"
        )
    if ours == staged:
        _remove(staged)  # never visible
    if target_is_foreign:
        if old == staged:
            os.replace(old, aside)  # never under a phi3v-new name, which leftover cleaning removes
        kept = f"; the previous content is kept at {aside}" if old is not None else ""
        return f"{target} was changed after the interrupted command ({who}): left as is{kept}"
    if old is not None and old != target:
        os.replace(old, target)
        _fsync_dir(target.parent)
        return f"{target}: restored the previous content after {who} was interrupted"
    return f"{target}: cleaned up after {who}, which was interrupted before it changed anything"


def journal_paths(target: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The two journals a transaction on folder ``target`` may leave: its intent and the final save's moves."""
    target = _real(Path(target))
    return intent_path(target), target / f".moves{_SUFFIX}"


def recover(target: str | os.PathLike[str]) -> list[str]:
    """Finish or roll back every interrupted transaction on folder ``target``; one stderr line per action.

    Cheap when there is nothing to do. Removes (and says so) an incomplete new copy of a dead process
    (``.<name>.phi3v-new-<pid>`` holding its proof, never visible), and names other hidden leftovers such as those of
    older versions (``.<name>.old-*``, ``.<name>.tmp-*``, ``.<name>.replaced-*``), which may hold data and are not
    deleted.

    Returns:
        The messages printed.

    Raises:
        JournalError: A journal names something this code never writes (nothing is touched).
    """
    target = _real(Path(target))
    messages = []
    for path, folder in ((intent_path(target), target), (target / f".moves{_SUFFIX}", target)):
        if path.exists() or path.is_symlink():
            message = _recover_one(path, folder)
            if message:
                messages.append(message)
    _remove_dead_intent_drafts([*target.parent.glob(f".{target.name}{_SUFFIX}.*.tmp"), *target.glob(f".moves{_SUFFIX}.*.tmp")])
    with contextlib.suppress(OSError):
        for left in sorted(target.parent.glob(f".{target.name}.*")):
            if not _is_leftover(left, target.name):
                continue
            new_copy = left.name.startswith(f".{target.name}.phi3v-new-")
            if new_copy and _proof(left) and not _held_by_other(left):
                _remove(left)  # never visible: a copy being built when its process died, before any swap began
                messages.append(f"{target}: removed {left.name}, an incomplete new copy left by a killed command")
            elif new_copy and _remove_unwritten_copy(left):
                messages.append(f"{target}: removed {left.name}, an empty new copy left by a killed command")
            else:
                messages.append(
                    f"{left} is left over from an interrupted run on {target}; it may hold the previous content: "
                    "look inside, then delete it"
                )
    for message in messages:
        _say(message)
    return messages


def _remove_unwritten_copy(folder: Path) -> bool:
    """Remove a new copy its creator (a dead pid) left before writing its proof: empty but for the proof file."""
    pid = folder.name.rsplit("-", 1)[-1]
    try:
        if not pid.isdigit() or process_alive(int(pid)) or folder.is_symlink() or set(os.listdir(folder)) - {PROOF_NAME}:
            return False
        with contextlib.suppress(FileNotFoundError):
            (folder / PROOF_NAME).unlink()
        os.rmdir(folder)  # refuses anything that is not empty
    except OSError:
        return False
    return True


def _remove_dead_intent_drafts(drafts: list[Path]) -> None:
    """Remove intent files killed before they were complete (``<intent>.<pid>.tmp``; they hold no data)."""
    for draft in drafts:
        pid = draft.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not process_alive(int(pid)) and draft.is_file() and not draft.is_symlink():
            with contextlib.suppress(OSError):
                draft.unlink()


def _is_leftover(path: Path, name: str) -> bool:
    rest = path.name[len(name) + 2 :]
    if rest.startswith(_SUFFIX.lstrip(".")) or rest.startswith("phi3v.lock"):
        return False  # intents, their drafts and beside locks are handled elsewhere
    for prefix in ("old-", "tmp-", "replaced-", "phi3v-old-", "phi3v-replaced-", "phi3v-new-"):
        if rest.startswith(prefix):
            pid = rest.rsplit("-", 1)[-1]
            # ours (phi3v-*-<pid>) while that process runs are not leftovers
            if prefix.startswith("phi3v-") and pid.isdigit():
                return not process_alive(int(pid))
            return True
    return False
