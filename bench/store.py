"""Reading and writing benchmark result files: one atomic JSON file per configuration, and a pandas loader.

Files live at ``<out>/<release>/<hardware>/<cell_id>.json`` (schema: :mod:`bench.results`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.config import RESERVED_RELEASES, BenchConfig
from bench.results import BenchResult
from phi3v_core.environment import RunEnvironment
from phi3v_core.errors import DataError
from phi3v_core.fs import check_regular_file, pending
from phi3v_core.io import atomic_write_text

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "iter_result_files",
    "load_result",
    "load_results",
    "read_results",
    "replacement_problem",
    "result_path",
    "save_result",
]


def result_path(root: str | Path, release: str, hardware: str, config: BenchConfig) -> Path:
    """Return where a result is stored: ``<root>/<release>/<hardware>/<cell_id>.json``."""
    return Path(root) / release / hardware / f"{config.cell_id()}.json"


def replacement_problem(path: str | Path, environment: RunEnvironment) -> str | None:
    """Why a new result measured in ``environment`` must not replace the file at ``path`` (``None`` = it may).

    A finished (``ok``/``oom``) result measured on other hardware or at another commit is someone's data: replacing
    it silently is how a clone's run once overwrote the shipped CPU results. ``error``, ``killed`` and ``timeout`` rows
    and unreadable files may be replaced (they are retried, as ``phi3v-bench matrix`` retries them).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        old = load_result(path)
    except DataError:
        return None
    if old.status in ("error", "killed", "timeout"):
        return None
    old_env = old.environment
    if old_env.hardware != environment.hardware:
        return f"{path} was measured on {old_env.hardware}, this machine is {environment.hardware}"
    if old_env.git_sha and environment.git_sha and old_env.git_sha != environment.git_sha:
        return f"{path} was measured at commit {old_env.git_sha[:10]}, this tree is {environment.git_sha[:10]}"
    return None


def save_result(result: BenchResult, root: str | Path | None = None, *, force: bool = False) -> Path:
    """Write ``result`` atomically to its place under ``root`` (default: ``result.config.out``).

    Args:
        result: The result to store.
        root: Results root folder.
        force: Replace a result measured on other hardware or at another commit.

    Returns:
        The path written.

    Raises:
        DataError: The file holds another machine's or commit's result and ``force`` is off.
    """
    cfg = result.config
    path = result_path(root if root is not None else cfg.out, cfg.release, result.environment.hardware, cfg)
    problem = None if force else replacement_problem(path, result.environment)
    if problem:
        raise DataError(f"{problem}; pass --force to replace it, or --release/--out to keep both")
    return atomic_write_text(path, result.to_json())


def load_result(path: str | Path) -> BenchResult:
    """Read one result file.

    Raises:
        DataError: Unreadable JSON (with file:line) or not a valid result.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); delete or re-run this result") from None
    return BenchResult.from_dict(data, source=str(path))


def iter_result_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Yield result JSON files from files and folders (recursively; ``reference/`` and ``validation/`` are skipped).

    Raises:
        DataError: A path does not exist.
    """
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            candidates = [path]
        elif path.is_dir():
            pending(path, "results folder")  # reading never repairs: an interrupted write is reported
            for tmp, _ in _stranded(path):
                print(f"note: {tmp}: a result write stranded by a kill; the next `phi3v-bench run/matrix --out "
                      f"{path}` recovers it", file=sys.stderr)  # fmt: skip
            candidates = sorted(
                p for p in path.rglob("*.json")
                if not set(RESERVED_RELEASES) & set(p.relative_to(path).parts) and not p.name.startswith(".")
            )
            candidates = [p for p in candidates if _regular_or_said(p)]
        else:
            raise DataError(f"{path}: no such file or folder; pass a result .json or a results folder")
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                yield candidate


def _stranded(root: Path) -> list[tuple[Path, Path]]:
    """``(temporary file, the result it was to become)`` for every ``.<name>.json.<x>.tmp`` an atomic write left."""
    found = []
    for tmp in sorted(root.rglob(".*.json.*.tmp")) if root.is_dir() else []:
        final = tmp.with_name(tmp.name[1:].rsplit(".", 2)[0])
        if final.suffix == ".json":
            found.append((tmp, final))
    return found


def recover_stranded(root: str | Path) -> list[str]:
    """Finish the result writes a kill stranded under ``root`` (call with the folder's lock held); say each.

    A complete, valid result whose file is missing is put in place; a cut-off one holds nothing and is removed; one
    beside an existing result is named, not chosen between.
    """
    messages = []
    for tmp, final in _stranded(Path(root)):
        if check_regular_file(tmp) is not None:
            continue
        try:
            load_result(tmp)
        except DataError:
            tmp.unlink(missing_ok=True)
            messages.append(f"{tmp}: removed a result write cut off by a kill (it held no complete result)")
            continue
        if final.exists():
            messages.append(f"{tmp}: a complete result stranded beside {final.name}; compare them and keep one")
        else:
            tmp.replace(final)
            messages.append(f"{final}: recovered a finished result a kill left in {tmp.name}")
    for message in messages:
        print(f"note: {message}", file=sys.stderr)
    return messages


def _regular_or_said(path: Path) -> bool:
    """Whether ``path`` is a regular file; a FIFO or device named ``*.json`` is skipped with a note (never opened)."""
    reason = check_regular_file(path, "result file")
    if reason is not None:
        print(f"note: {path}: {reason}; skipped", file=sys.stderr)
    return reason is None


def read_results(paths: Iterable[str | Path]) -> list[tuple[Path, BenchResult]]:
    """Load every result under ``paths`` as ``(path, result)`` pairs, in a stable order."""
    return [(p, load_result(p)) for p in iter_result_files(paths)]


def load_results(*paths: str | Path) -> pd.DataFrame:
    """Load results into a pandas DataFrame with one row per result file.

    Columns: ``path``, ``release``, ``hardware``, ``status``, ``message``, ``failed_at_step``, every
    :class:`BenchConfig` field, every :class:`Summary` field, ``world_size``, ``gpu_name``, ``compute_capability``,
    ``driver_version``, ``git_sha`` and ``<package>_version`` for the tracked packages.

    Args:
        *paths: Result files or folders (default: ``results``).

    Example:
        >>> df = load_results("results/v0.1.0")
        >>> df[df.status == "ok"].groupby("method").img_per_s.max()
    """
    import pandas as pd

    rows = [_row(path, result) for path, result in read_results(paths or ("results",))]
    return pd.DataFrame(rows)


def _row(path: Path, result: BenchResult) -> dict[str, Any]:
    env = result.environment
    row: dict[str, Any] = {
        "path": str(path),
        "release": result.config.release,
        "hardware": env.hardware,
        "status": result.status,
        "message": result.message,
        "failed_at_step": result.failed_at_step,
    }
    row.update(result.config.to_dict())
    row["world_size"] = result.config.world_size
    row.update(result.summary.to_dict())
    row.update(
        gpu_name=env.gpu_name,
        compute_capability=env.gpus[0].compute_capability if env.gpus else None,
        driver_version=env.driver_version,
        git_sha=env.git_sha,
        finished_at=result.finished_at,
    )
    for name, version in env.packages.items():
        row[f"{name.replace('-', '_')}_version"] = version
    return row
