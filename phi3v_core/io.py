"""Atomic file writes: readers see the old file or the complete new one, never a half-written file.

Torch-free, so every package (training, processing, bench, planner) can share it. Each write goes to a temporary
file in the destination folder (same filesystem, so ``os.replace`` is atomic), is flushed and fsynced, then replaces
the target; on any failure the temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "current_umask", "json_safe", "modes_from_umask",
           "remove_dead_temps"]  # fmt: skip


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting (briefly process-wide) and restoring
    os.umask(mask)
    return mask


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by ``None``, recursively through dicts, lists and tuples.

    JSON has no NaN/Infinity; a diverged loss is stored as null so the file stays valid JSON for every reader.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def modes_from_umask(folder: str | os.PathLike[str]) -> None:
    """Give every file under ``folder`` mode ``0666`` and every folder ``0777``, less the umask (as ``open`` would).

    For folders written by libraries that create files ``0600`` (safetensors' writer does): the user's umask decides
    who may read the weights, as for every other file.
    """
    mask = current_umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (the parent folder is created if needed).

    Args:
        path: Destination file.
        data: The complete new content.
        mode: Permission bits of the new file (default: ``0666`` less the umask, as ``open()`` creates files;
            ``mkstemp`` alone would leave 0600).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name: remove_dead_temps() tells a killed writer's leftover from a live one's file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), (0o666 & ~current_umask()) if mode is None else mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def remove_dead_temps(folder: str | os.PathLike[str], pattern: str = "*") -> list[Path]:
    """Remove the temporary files of :func:`atomic_write_bytes` whose writer was killed (its pid no longer runs).

    Args:
        folder: Where the writes went.
        pattern: Which final names to look at (``"*.json"``).

    Returns:
        The files removed.
    """
    removed = []
    for tmp in Path(folder).glob(f".{pattern}.*-*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2].split("-", 1)[0]
        if not pid.isdigit() or not tmp.is_file() or tmp.is_symlink():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
        except PermissionError:
            pass  # another user's running process
    return removed


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(
    path: str | os.PathLike[str],
    payload: Any,
    *,
    indent: int | None = 2,
    default: Callable[[Any], Any] | None = None,
) -> Path:
    """Write ``payload`` as strict JSON atomically, with a trailing newline.

    Strict means ``allow_nan=False``: a NaN or infinity raises ``ValueError`` before anything is written, because
    ``NaN`` is not JSON and other readers (``jq``, browsers, pandas with ``orient``) reject it.

    Args:
        path: Destination file.
        payload: JSON-serialisable value.
        indent: ``json.dumps`` indentation (``None`` for one line).
        default: ``json.dumps`` fallback for other objects (e.g. ``str`` for paths).

    Returns:
        The path written.
    """
    text = json.dumps(payload, indent=indent, ensure_ascii=False, allow_nan=False, default=default)
    return atomic_write_text(path, text + "\n")
