"""The one jsonl reader: every command that reads a data folder (finetune, ``phi3v-convert check``, ``phi3v-plan
--data``) goes through :func:`read_jsonl`, so they agree on what the data is.

Each line runs through a pipeline of steps (:mod:`phi3v_core.data.jsonl_rules`): ``decode -> record -> turns ->
paths``, then every distinct image is checked once (``images``). Each step returns its problems; the reader collects
every problem of the file and raises one :class:`~phi3v_core.errors.DataError` listing them (``file:line: what; fix``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from phi3v_core.data.images import DEFAULT_MAX_PIXELS, ImageCheck, ImageProblem, check_image_file, missing_file_reason
from phi3v_core.data.jsonl_rules import check_record, check_turns, decode_line, resolve_paths, whole_file_problems
from phi3v_core.data.records import Record, Turn, image_tag_problem, with_image_tags
from phi3v_core.errors import DataError, raise_all
from phi3v_core.fs import check_regular_file
from phi3v_core.progress import Counter

__all__ = ["MAX_LISTED_PROBLEMS", "JsonlData", "find_split_file", "raise_problems", "read_jsonl", "validate_records"]

# The reader's warnings keep the logger name they always had (users filter on it).
logger = logging.getLogger("phi3v_core.data.jsonl")

#: How many problems one error message lists before it summarises the rest as a count.
MAX_LISTED_PROBLEMS = 20


def raise_problems(problems: Sequence[str], limit: int = MAX_LISTED_PROBLEMS) -> None:
    """Raise one :class:`DataError` listing every problem (the first ``limit`` verbatim, then a count).

    Args:
        problems: One-line problem descriptions, already prefixed with their location.
        limit: Most problems quoted in full.
    """
    if len(problems) <= limit:
        raise_all(problems, DataError)
        return
    shown = "; ".join(problems[:limit])
    raise DataError(f"{len(problems)} problems (first {limit} shown): {shown}; ... and {len(problems) - limit} more")


@dataclass
class JsonlData:
    """Result of :func:`read_jsonl`.

    Attributes:
        path: The jsonl file.
        records: Valid records (image paths joined onto the images root).
        skipped: One message per record dropped by ``skip_bad=True`` (bad image files).
        lines: The line number of each record in ``records`` (same order).
        image_sizes: ``(width, height)`` of every checked image as the user sees it (EXIF orientation applied);
            empty with ``check_images="none"``.
    """

    path: Path
    records: list[Record]
    skipped: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    image_sizes: dict[Path, tuple[int, int]] = field(default_factory=dict)


@dataclass
class _PendingImage:
    line: int
    record_index: int
    where: str  # "conversations[t].images[k]"
    path: Path


@dataclass
class _ReadState:
    """What the per-line pipeline accumulates over one file."""

    problems: list[tuple[int, str]] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    pending: list[_PendingImage] = field(default_factory=list)
    first_line_of_id: dict[str, int] = field(default_factory=dict)
    saw_record: bool = False


def _read_line(state: _ReadState, loc: str, number: int, raw: bytes, source_default: str, root: Path) -> None:
    """Run one line through ``decode -> record -> turns -> paths``; a clean line becomes a record."""
    obj, problems = decode_line(loc, number, raw)
    if problems or obj is None:
        state.saw_record |= bool(problems)
        state.problems.extend((number, p) for p in problems)
        return
    state.saw_record = True
    parsed, problems = check_record(loc, obj, source_default, state.first_line_of_id, number)
    if parsed is not None:
        problems += check_turns(loc, parsed)
        resolved, path_problems = resolve_paths(loc, parsed.conversations, root)
        problems += path_problems
    if problems or parsed is None:
        state.problems.extend((number, p) for p in problems)
        return
    record_index = len(state.records)
    turns: list[Turn] = []
    for t, turn in enumerate(parsed.turns):
        paths = [resolved[(t, k)] for k in range(len(turn.get("images", [])))]
        state.pending.extend(
            _PendingImage(number, record_index, f"conversations[{t}].images[{k}]", p) for k, p in enumerate(paths)
        )
        turns.append(
            Turn(
                user=with_image_tags(turn["user"], len(paths)),
                assistant=turn["assistant"],
                images=list(paths),
                answers=list(turn.get("answers") or []),
            )
        )
    state.records.append(Record(id=parsed.record_id, source=parsed.source, conversations=turns))
    state.lines.append(number)


def _open_problem(path: Path) -> str | None:
    """Why the jsonl file cannot be read (missing, a broken link, a FIFO...), named before opening it."""
    if not os.path.lexists(path) or not path.exists():
        reason = missing_file_reason(path, "jsonl file")
        if reason.startswith("jsonl file not found; fix the path"):  # nothing more specific to say
            reason = "jsonl file not found; check the path (a data folder holds <name>_train.jsonl)"
        return f"{path}: {reason}"
    not_regular = check_regular_file(path, "jsonl file")  # checked before opening: a FIFO would block forever
    return f"{path}: {not_regular}" if not_regular else None


def read_jsonl(
    path: str | Path,
    images_root: str | Path | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    check_images: ImageCheck = "full",
    skip_bad: bool = False,
    default_source: str | None = None,
    max_listed: int = MAX_LISTED_PROBLEMS,
) -> JsonlData:
    """Read and strictly validate one jsonl file; collect every problem, then raise once.

    Args:
        path: The jsonl file.
        images_root: Folder the image paths are relative to (default: ``images/`` next to the file).
        max_pixels: Per-image pixel cap (decompression-bomb guard), checked from the header before decoding.
        check_images: ``"full"`` decodes every image once (finds truncated files), ``"header"`` reads headers only,
            ``"none"`` checks existence only.
        skip_bad: Drop records whose image files are missing, unreadable, truncated or too large instead of failing
            (the dropped records are returned in ``skipped`` and logged). Unsafe paths are always errors.
        default_source: ``source`` for records that omit it (default: the file name before ``_train``/``_val``).
        max_listed: Most problems quoted in full in the error.

    Returns:
        The valid records.

    Raises:
        DataError: Listing every problem as ``file:line: what; fix``.
    """
    path = Path(path)
    root = Path(images_root) if images_root is not None else path.parent / "images"
    problem = _open_problem(path)
    if problem:
        raise DataError(problem)
    data = path.read_bytes()
    raise_problems(whole_file_problems(path, data))
    source_default = default_source or path.stem.rsplit("_", 1)[0]
    state = _ReadState()
    for number, raw_line in enumerate(data.split(b"\n"), start=1):
        _read_line(state, f"{path}:{number}", number, raw_line.rstrip(b"\r"), source_default, root)
    if not state.saw_record and not state.problems:
        state.problems.append((1, f"{path}:1: the file has no records; add one JSON record per line"))
    return _finish(path, root, state, max_pixels, check_images, skip_bad, max_listed)


def _finish(
    path: Path, root: Path, state: _ReadState, max_pixels: int, mode: ImageCheck, skip_bad: bool, max_listed: int
) -> JsonlData:
    """Step 5 (images): check every distinct image once, then raise everything found or return the records."""
    bad_records: dict[int, list[str]] = {}
    sizes: dict[Path, tuple[int, int]] = {}
    if state.pending:
        if not root.is_dir():
            state.problems.append(
                (0, f"{root}: images folder not found (needed by {path}); put the images there or pass images_root")
            )
        else:
            sizes, image_problems = _check_images({p.path for p in state.pending}, max_pixels, mode)
            for item in state.pending:
                reason = image_problems.get(item.path)
                if reason is not None:
                    message = f"{path}:{item.line}: {item.where} {item.path}: {reason}"
                    bad_records.setdefault(item.record_index, []).append(message)
    records, lines, skipped = state.records, state.lines, []
    if bad_records and skip_bad:
        skipped = [msgs[0] for _, msgs in sorted(bad_records.items())]
        records = [r for i, r in enumerate(records) if i not in bad_records]
        lines = [n for i, n in enumerate(lines) if i not in bad_records]
    elif bad_records:
        state.problems.extend((state.lines[index], m) for index, msgs in bad_records.items() for m in msgs)
    if state.problems:
        state.problems.sort(key=lambda item: item[0])
        raise_problems([p for _, p in state.problems], limit=max_listed)
    if skipped:
        logger.warning(
            "%s: skipped %d record(s) with bad images (skip_bad=True); first: %s", path, len(skipped), skipped[0]
        )
    if not records:
        raise DataError(f"{path}: every record was skipped for bad images ({skipped[0]}); fix the images")
    return JsonlData(path=path, records=records, skipped=skipped, lines=lines, image_sizes=sizes)


def _check_images(
    paths: set[Path], max_pixels: int, mode: ImageCheck
) -> tuple[dict[Path, tuple[int, int]], dict[Path, str]]:
    """Check each distinct image once, in parallel (PIL releases the GIL while decoding); sizes and problems."""

    def check(p: Path) -> tuple[Path, tuple[int, int] | None, str | None]:
        try:
            return p, check_image_file(p, max_pixels=max_pixels, mode=mode), None
        except ImageProblem as exc:
            return p, None, str(exc)

    ordered = sorted(paths)
    workers = min(8, os.cpu_count() or 1, len(ordered))
    results = []
    # Decoding every image takes seconds per hundred: progress on stderr once it takes over 2 s (quiet before).
    with Counter(len(ordered), "checking images", enabled=mode == "full", live=False) as counter:
        if workers <= 1:
            for p in ordered:
                results.append(check(p))
                counter.advance()
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for result in pool.map(check, ordered):
                    results.append(result)
                    counter.advance()
    sizes = {p: size for p, size, _ in results if size is not None and mode != "none"}
    return sizes, {p: reason for p, _, reason in results if reason is not None}


def validate_records(records: Sequence[Record], origin: str) -> None:
    """Check in-memory records (synthetic twins, Hugging Face rows) with the same rules as the jsonl reader.

    Args:
        records: Records to check.
        origin: Name used as the location prefix, e.g. ``"synthetic docvqa train"``.

    Raises:
        DataError: Listing every problem as ``origin[index] (id ...): what``.
    """
    problems: list[str] = []
    seen: dict[str, int] = {}
    if not records:
        problems.append(f"{origin}: no records")
    for index, record in enumerate(records):
        loc = f"{origin}[{index}] (id {record.id!r})"
        if not isinstance(record.id, str) or not record.id.strip():
            problems.append(f"{loc}: 'id' must be a non-empty string")
        elif record.id in seen:
            problems.append(f"{loc}: duplicate id (first at index {seen[record.id]})")
        else:
            seen[record.id] = index
        if not record.conversations:
            problems.append(f"{loc}: 'conversations' is empty")
        prior_images = 0
        for t, turn in enumerate(record.conversations):
            for key in ("user", "assistant"):
                value = getattr(turn, key)
                if not isinstance(value, str) or not value.strip():
                    problems.append(f"{loc}: conversations[{t}].{key} must be a non-empty string")
            if isinstance(turn.user, str):
                tag_problem = image_tag_problem(turn.user, len(turn.images), prior_images)
                if tag_problem:
                    problems.append(f"{loc}: conversations[{t}].user {tag_problem}")
            prior_images += len(turn.images)
            if any(not isinstance(a, str) or not a.strip() for a in turn.answers):
                problems.append(f"{loc}: conversations[{t}].answers must hold non-empty strings")
    raise_problems(problems)


def _inside(path: Path, data_dir: Path) -> Path:
    """``path`` itself, after checking that it resolves (through symlinks) inside ``data_dir``."""
    real, root = path.resolve(), data_dir.resolve()
    if root != real and root not in real.parents:
        raise DataError(
            f"{path}: resolves to {real}, outside the data folder {data_dir} (symlink); copy the file into the folder"
        )
    return path


def find_split_file(data_dir: str | Path, split: str, prefer: str | None = None) -> Path:
    """Find ``<data_dir>/*_<split>.jsonl`` (``<prefer>_<split>.jsonl`` wins when several exist).

    macOS ``._*`` resource-fork files next to the data are not candidates.

    Raises:
        DataError: The folder is missing, or there is no (or no unambiguous) file for the split.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found; pass a folder holding <name>_train.jsonl and images/")
    if prefer and (data_dir / f"{prefer}_{split}.jsonl").exists():
        return _inside(data_dir / f"{prefer}_{split}.jsonl", data_dir)
    matches = sorted(m for m in data_dir.glob(f"*_{split}.jsonl") if not m.name.startswith("._"))
    if len(matches) == 1:
        return _inside(matches[0], data_dir)
    example = f"{prefer or 'data'}_{split}.jsonl"
    if not matches:
        raise DataError(f"{data_dir}: no *_{split}.jsonl file; expected e.g. {example} next to images/")
    names = ", ".join(m.name for m in matches)
    raise DataError(f"{data_dir}: several *_{split}.jsonl files ({names}); pass the file explicitly")
