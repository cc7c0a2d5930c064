"""Journaled folder replacements: a kill at any moment leaves the old or the new content visible, never neither.

Torch-free. Every replace that takes more than one rename (``phi3v-convert --overwrite``, ``phi3v-finetune
--overwrite_output_dir``, the final save's file moves) runs as a transaction:

1. an *intent* file is written first (temporary file, fsync, rename, fsync of the folder) naming the target, the
   hidden sibling holding the old content (``aside``) and the one holding the new content (``staged``); the process
   keeps a kernel lock (``flock``) on it while the transaction runs;
2. the renames run;
3. the hidden siblings are removed, then the intent (last).

:func:`recover` is called by every command before it reads or writes a folder (:class:`phi3v_core.fs.FolderLock`
calls it): an intent whose lock is free belongs to a process that died (SIGKILL, power loss), and is finished or
rolled back, with one line on stderr saying which. Intents of live transactions are left alone.

Kinds:

* ``swap`` (:func:`replace_folder`): ``staged`` is complete before the intent is written, so recovery rolls forward;
* ``set_aside`` (:class:`SetAside`): the old folder is moved aside while a new one is built in place; recovery keeps
  the new folder when it holds ``done_marker`` and otherwise restores the old one;
* ``moves`` (:func:`move_into`): named entries of ``staged`` move into the target one by one; recovery finishes the
  moves (``staged`` was complete before the intent was written).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

__all__ = ["SetAside", "intent_path", "move_into", "process_alive", "recover", "replace_folder"]

_SUFFIX = ".phi3v-txn.json"


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


class _Intent:
    """The intent file of one transaction, locked by its owner from before it is visible until it is removed."""

    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        self.path = path
        self.record = record
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, json.dumps(record).encode() + b"\n")
            os.fsync(fd)
            os.replace(tmp, path)  # visible only complete, already locked by us
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
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
        staged: A complete folder, a sibling of ``target`` (same file system).
        target: The folder to replace (a symlink is resolved first: the real folder is replaced, the link kept).
        command: The command, named in recovery messages.
    """
    target = _real(target)
    aside = _sibling(target, "old")
    intent = _begin(target, {"kind": "swap", "command": command, "staged": staged.name, "aside": aside.name})
    if target.exists():
        os.replace(target, aside)
    os.replace(staged, target)
    _fsync_dir(target.parent)
    _remove(aside)
    intent.done()


def move_into(staged: Path, target: Path, command: str) -> None:
    """Move every entry of the complete folder ``staged`` into ``target`` (replacing same-named entries), journaled.

    Recovery finishes the moves, so a kill leaves the old files or all the new ones once the next command ran.
    """
    names = sorted(p.name for p in staged.iterdir())
    intent = _Intent(
        target / f".moves{_SUFFIX}",
        {"kind": "moves", "command": command, "pid": os.getpid(), "staged": staged.name, "names": names},
    )
    _finish_moves(target, staged, names)
    intent.done()


def _finish_moves(target: Path, staged: Path, names: list[str]) -> None:
    for name in names:
        item = staged / name
        if not item.exists():
            continue  # moved before the kill
        destination = target / name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(item, destination)
    _remove(staged)


class SetAside:
    """Move folder ``target`` aside while a new one is built in its place; keep or restore the old one at the end.

    Args:
        target: The folder (a symlink is resolved: the real folder is moved and rebuilt, the link kept).
        command: The command, named in recovery messages.
        done_marker: A file whose presence in the new folder means it is complete (recovery then keeps it).
    """

    def __init__(self, target: Path, command: str, done_marker: str) -> None:
        self.target = _real(target)
        self.aside = _sibling(self.target, "replaced")
        self._intent = _begin(
            self.target,
            {"kind": "set_aside", "command": command, "aside": self.aside.name, "done_marker": done_marker},
        )
        os.replace(self.target, self.aside)
        _fsync_dir(self.target.parent)

    def commit(self) -> None:
        """The new folder is complete: delete the old one."""
        _remove(self.aside)
        self._intent.done()

    def rollback(self) -> None:
        """The new folder failed: delete it and put the old one back."""
        _remove(self.target)
        os.replace(self.aside, self.target)
        _fsync_dir(self.target.parent)
        self._intent.done()


def _real(target: Path) -> Path:
    target = Path(target).expanduser()
    return target.resolve() if target.is_symlink() else target.absolute()


def _recover_one(path: Path, target: Path) -> str | None:
    """Finish or roll back the transaction of ``path`` when its owner is gone; what was done (``None``: nothing)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # its owner still runs
        try:
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                return None  # finished meanwhile
        except FileNotFoundError:
            return None
        try:
            record = json.loads(os.read(fd, 1 << 20) or b"{}")
        except ValueError:
            record = {}
        message = _apply(record, target, path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        _fsync_dir(path.parent)
        return message
    finally:
        os.close(fd)


def _apply(record: dict[str, Any], target: Path, path: Path) -> str:
    kind = record.get("kind")
    who = f"{record.get('command', 'a command')} (pid {record.get('pid')})"
    if kind == "moves":
        staged = target / str(record.get("staged"))
        if staged.is_dir():
            _finish_moves(target, staged, [str(n) for n in record.get("names", [])])
        return f"{target}: finished the final save interrupted in {who}"
    aside = target.parent / str(record.get("aside"))
    if kind == "swap":
        staged = target.parent / str(record.get("staged"))
        if staged.is_dir():
            if target.exists() and aside.exists():
                _remove(target)  # cannot happen by our steps; keep the complete new content
            elif target.exists():
                os.replace(target, aside)
            os.replace(staged, target)
            _remove(aside)
            return f"{target}: finished the replacement interrupted in {who} (the new content is in place)"
        if not target.exists() and aside.exists():
            os.replace(aside, target)
            return f"{target}: restored the previous content after {who} was interrupted"
        _remove(aside)
        return f"{target}: cleaned up after {who}, which was interrupted after its replacement"
    if kind == "set_aside":
        marker = str(record.get("done_marker", ""))
        if not aside.exists():
            return f"{target}: {who} was interrupted after it finished; nothing to restore"
        if marker and (target / marker).is_file():
            _remove(aside)
            return f"{target}: {who} had finished; removed the previous content it replaced"
        _remove(target)
        os.replace(aside, target)
        return (
            f"{target}: {who} was interrupted before it finished; restored the previous content from {aside.name} "
            "(the interrupted replacement was discarded)"
        )
    return f"{target}: removed the unreadable transaction record {path.name}"


def recover(target: str | os.PathLike[str]) -> list[str]:
    """Finish or roll back every interrupted transaction on folder ``target``; one stderr line per action.

    Cheap when there is nothing to do. Removes (and says so) an incomplete new copy of a dead process
    (``.<name>.phi3v-new-<pid>``, never visible), and names other hidden leftovers such as those of older versions
    (``.<name>.old-*``, ``.<name>.tmp-*``, ``.<name>.replaced-*``), which may hold data and are not deleted.

    Returns:
        The messages printed.
    """
    target = _real(Path(target))
    messages = []
    for path, folder in ((intent_path(target), target), (target / f".moves{_SUFFIX}", target)):
        if path.exists():
            message = _recover_one(path, folder)
            if message:
                messages.append(message)
    _remove_dead_intent_drafts([*target.parent.glob(f".{target.name}{_SUFFIX}.*.tmp"), *target.glob(f".moves{_SUFFIX}.*.tmp")])
    with contextlib.suppress(OSError):
        for left in sorted(target.parent.glob(f".{target.name}.*")):
            if not _is_leftover(left, target.name):
                continue
            if left.name.startswith(f".{target.name}.phi3v-new-"):
                _remove(left)  # never visible: a copy being built when its process died, before any swap began
                messages.append(f"{target}: removed {left.name}, an incomplete new copy left by a killed command")
            else:
                messages.append(
                    f"{left} is left over from an interrupted run on {target}; it may hold the previous content: "
                    "look inside, then delete it"
                )
    for message in messages:
        _say(message)
    return messages


def _remove_dead_intent_drafts(drafts: list[Path]) -> None:
    """Remove intent files killed before they were complete (``<intent>.<pid>.tmp``; they hold no data)."""
    for draft in drafts:
        pid = draft.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not process_alive(int(pid)):
            with contextlib.suppress(OSError):
                draft.unlink()


def _is_leftover(path: Path, name: str) -> bool:
    rest = path.name[len(name) + 2 :]
    if rest.startswith(_SUFFIX.lstrip(".")):
        return False  # intents and their drafts are handled above
    for prefix in ("old-", "tmp-", "replaced-", "phi3v-old-", "phi3v-replaced-", "phi3v-new-"):
        if rest.startswith(prefix):
            pid = rest.rsplit("-", 1)[-1]
            # ours (phi3v-*-<pid>) while that process runs are not leftovers
            if prefix.startswith("phi3v-") and pid.isdigit():
                return not process_alive(int(pid))
            return True
    return False
