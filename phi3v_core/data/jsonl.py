"""The recipe's jsonl format: the atomic writer of jsonl folders, and the public home of the reader's names.

One line per record::

    {"id": "train-0000000000", "source": "ucf101",
     "conversations": [{"images": ["train/Archery/v_Archery_g01_c01.0.jpg", ...], "user": "...", "assistant": "..."}]}

``images`` are paths relative to the images root (``<data_dir>/images``). ``source`` and ``images`` are optional,
``answers`` (all accepted references, for evaluation) is our optional extension. A folder holds
``<name>_train.jsonl``, ``<name>_val.jsonl`` (optionally ``_test``) and ``images/`` — the layout ``convert_ucf101``
writes.

Reading is in :mod:`phi3v_core.data.jsonl_reader` (the one reader every command uses) and the rules a record must
meet in :mod:`phi3v_core.data.jsonl_rules`; both are re-exported here. Validation collects every problem (each
``file:line: what; how to fix``) and raises one :class:`DataError`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from phi3v_core.data.jsonl_reader import (
    MAX_LISTED_PROBLEMS,
    JsonlData,
    find_split_file,
    raise_problems,
    read_jsonl,
    validate_records,
)
from phi3v_core.data.jsonl_rules import CONTROL_TOKEN_RE, MAX_IMAGES_PER_RECORD, MAX_TEXT_CHARS
from phi3v_core.data.records import LazyImage, Record, load_image
from phi3v_core.errors import ConfigError
from phi3v_core.fs import writable_problem

__all__ = [
    "CONTROL_TOKEN_RE",
    "MAX_IMAGES_PER_RECORD",
    "MAX_LISTED_PROBLEMS",
    "MAX_TEXT_CHARS",
    "JsonlData",
    "atomic_directory",
    "check_output_dir",
    "find_split_file",
    "raise_problems",
    "read_jsonl",
    "record_to_json",
    "validate_records",
    "write_jsonl_folder",
]


def _remove_empty_dirs(created: Sequence[Path]) -> None:
    for directory in reversed(created):
        try:
            directory.rmdir()
        except OSError:
            break


#: Top-level names a data folder written by phi3v-convert holds (listed in it, for a later ``--overwrite``).
MANIFEST_NAME = ".phi3v-manifest.json"


def _own_data_entries(out_dir: Path) -> set[str] | None:
    try:
        manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    entries = manifest.get("entries") if isinstance(manifest, dict) else None
    return set(entries) | {MANIFEST_NAME} if isinstance(entries, list) else None


def check_output_dir(out_dir: str | Path, *, overwrite: bool = False) -> None:
    """Refuse an output folder that is a file, unwritable, or non-empty without ``overwrite`` (before any work).

    ``overwrite`` replaces only a folder this command wrote: every entry must be in its manifest (or, for folders
    from before manifests, be a ``*.jsonl`` file or ``images/``); anything else is named and the folder refused.

    Raises:
        ConfigError: With the fix (choose another folder or pass ``--overwrite``).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} exists and is not a folder; choose another output folder")
    problem = writable_problem(out_dir, "--out_dir")
    if problem:
        raise ConfigError(problem)
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"{out_dir} is not empty; choose a new or empty folder, or pass --overwrite to replace it")
    own = _own_data_entries(out_dir)
    names = sorted(p.name for p in out_dir.iterdir())
    if own is not None:
        foreign = [n for n in names if n not in own]
    else:
        foreign = [n for n in names if not (n.endswith(".jsonl") or n == "images")]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ConfigError(
            f"--out_dir {out_dir} holds files phi3v-convert did not write ({shown}); --overwrite replaces only its "
            "own output: move them away or choose another --out_dir"
        )


@contextmanager
def atomic_directory(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``out_dir`` only when the block succeeds.

    On any exception the temporary folder (and parent folders this call created) are removed, so nothing is
    half-written. An existing non-empty ``out_dir`` is refused unless ``overwrite``; then it is swapped out by a
    journaled replacement (:func:`phi3v_core.transaction.replace_folder`: a kill leaves the old or the new folder, and
    the next command finishes the swap). A second converter into the same folder is refused while one runs.

    Raises:
        ConfigError: ``out_dir`` is a file, or a non-empty folder without ``overwrite``.
    """
    from phi3v_core.fs import FolderLock
    from phi3v_core.transaction import PROOF_NAME, recover, replace_folder, staging_folder

    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        out_dir = out_dir.resolve()  # write through the link: the real folder is replaced, the link kept
    recover(out_dir)  # an interrupted earlier replacement is finished (or rolled back) first
    check_output_dir(out_dir, overwrite=overwrite)
    parent = out_dir.absolute().parent
    created = [p for p in [parent, *parent.parents] if not p.exists()][::-1]
    parent.mkdir(parents=True, exist_ok=True)
    # One converter per output folder: a second one is refused, naming the first (the lock sits beside the folder,
    # which is replaced as a whole).
    lock = FolderLock(out_dir, "phi3v-convert", "--out_dir", beside=True).acquire()
    tmp = parent / f".{out_dir.name}.phi3v-new-{os.getpid()}"
    try:
        tmp = staging_folder(out_dir)  # mode from the umask, as the user's other folders; holds the proof
        yield tmp
        entries = sorted(p.name for p in tmp.iterdir() if p.name != PROOF_NAME)
        (tmp / MANIFEST_NAME).write_text(json.dumps({"command": "phi3v-convert", "entries": entries}))
        replace_folder(tmp, out_dir, "phi3v-convert")
    except BaseException as exc:
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(out_dir)  # a full disk while writing images: name the folder being written
        shutil.rmtree(tmp, ignore_errors=True)
        lock.release()  # before the empty parents it sits in are removed
        _remove_empty_dirs(created)
        raise
    lock.release()


def record_to_json(record: Record, image_paths: Sequence[Sequence[str]] | None = None) -> dict[str, Any]:
    """Serialise a record to the jsonl schema (``answers`` only when it adds information).

    Args:
        record: The record.
        image_paths: Relative image paths per turn (default: the turn's ``Path`` images as strings).
    """
    turns = []
    for t, turn in enumerate(record.conversations):
        paths = list(image_paths[t]) if image_paths is not None else [str(p) for p in turn.images]
        entry: dict[str, Any] = {"images": paths, "user": turn.user, "assistant": turn.assistant}
        if turn.answers and list(turn.answers) != [turn.assistant]:
            entry["answers"] = list(turn.answers)
        turns.append(entry)
    return {"id": record.id, "source": record.source, "conversations": turns}


def _save_image(src: Any, target: Path, image_format: Literal["png", "jpg"]) -> None:
    if isinstance(src, Path):
        shutil.copyfile(src, target)
        return
    image = src.load() if isinstance(src, LazyImage) else load_image(src)
    if image_format == "jpg":
        image = image.convert("RGB") if image.mode != "RGB" else image
        image.save(target, format="JPEG", quality=90)
    else:
        # compress_level=1: document pages are large; fast saving matters more than a few percent of disk.
        image.save(target, format="PNG", compress_level=1)


def write_jsonl_folder(
    out_dir: str | Path,
    splits: Mapping[str, Sequence[Record]],
    *,
    name: str = "data",
    overwrite: bool = False,
    image_format: Literal["png", "jpg"] = "png",
) -> dict[str, Path]:
    """Write records as a jsonl folder (``<name>_<split>.jsonl`` + ``images/<split>/...``), atomically.

    Images that are files are copied (keeping their extension); in-memory and lazy images are encoded as
    ``image_format``. Image files are named ``images/<split>/<record index>.<turn>.<k>.<ext>``.

    Args:
        out_dir: Output folder (must be new or empty unless ``overwrite``).
        splits: Split name (``"train"``, ``"val"``, ``"test"``) → records.
        name: File prefix, e.g. the task name.
        overwrite: Replace a non-empty ``out_dir``.
        image_format: Encoding for non-file images.

    Returns:
        Split name → path of the written jsonl file (inside ``out_dir``).
    """
    if image_format not in ("png", "jpg"):
        raise ConfigError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    out_dir = Path(out_dir)
    jobs: list[tuple[Any, Path]] = []
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        lines_per_split: dict[str, list[str]] = {}
        for split, records in splits.items():
            split_dir = tmp / "images" / split
            split_dir.mkdir(parents=True, exist_ok=True)
            lines = []
            for index, record in enumerate(records):
                rel_paths: list[list[str]] = []
                for t, turn in enumerate(record.conversations):
                    rel_turn = []
                    for k, src in enumerate(turn.images):
                        ext = (
                            (src.suffix.lstrip(".").lower() or image_format) if isinstance(src, Path) else image_format
                        )
                        rel = f"{split}/{index:06d}.{t}.{k}.{ext}"
                        jobs.append((src, tmp / "images" / rel))
                        rel_turn.append(rel)
                    rel_paths.append(rel_turn)
                lines.append(json.dumps(record_to_json(record, rel_paths), ensure_ascii=False))
            lines_per_split[split] = lines
        workers = min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda job: _save_image(job[0], job[1], image_format), jobs))
        for split, lines in lines_per_split.items():
            (tmp / f"{name}_{split}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return {split: out_dir / f"{name}_{split}.jsonl" for split in splits}
