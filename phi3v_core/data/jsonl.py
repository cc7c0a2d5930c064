"""The recipe's jsonl format: strict reading/validation, atomic writing of jsonl folders.

One line per record::

    {"id": "train-0000000000", "source": "ucf101",
     "conversations": [{"images": ["train/Archery/v_Archery_g01_c01.0.jpg", ...], "user": "...", "assistant": "..."}]}

``images`` are paths relative to the images root (``<data_dir>/images``). ``source`` and ``images`` are optional,
``answers`` (all accepted references, for evaluation) is our optional extension. A folder holds
``<name>_train.jsonl``, ``<name>_val.jsonl`` (optionally ``_test``) and ``images/`` — the layout ``convert_ucf101``
writes.

Validation collects every problem (each ``file:line: what; how to fix``) and raises one :class:`DataError`.

(About 650 lines, on purpose: the format's reader, its validation rules and its atomic writer stay in one file so the
rules a record must meet are read in one place.)
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from phi3v_core.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageCheck,
    ImageProblem,
    PathProblem,
    check_image_file,
    resolve_image_path,
)
from phi3v_core.data.records import LazyImage, Record, Turn, image_tag_problem, load_image, with_image_tags
from phi3v_core.errors import ConfigError, DataError, raise_all
from phi3v_core.fs import check_regular_file, writable_problem

__all__ = [
    "MAX_LISTED_PROBLEMS",
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

logger = logging.getLogger(__name__)

#: How many problems one error message lists before it summarises the rest as a count.
MAX_LISTED_PROBLEMS = 20

_RECORD_KEYS = ("id", "source", "conversations")
_TURN_KEYS = ("user", "assistant", "images", "answers")

#: Most images one record may hold (the recipe's largest is 8 video frames; each image costs up to ~2.5k tokens).
MAX_IMAGES_PER_RECORD = 32
#: Longest text field in characters: a record far beyond any model context is reported before tokenizing it.
MAX_TEXT_CHARS = 500_000
#: Chat control tokens of the Phi-3 tokenizer: inside user/assistant text they would become real special tokens (an
#: answer ending early, a fake turn). Such text is rejected, not escaped: the fix belongs in the data.
CONTROL_TOKEN_RE = re.compile(r"<\|(?:endoftext|user|assistant|system|end|placeholder\d+)\|>|</?s>|<unk>")
_IMAGE_TAG_IN_ANSWER_RE = re.compile(r"<\|image_\d+\|>")


def _text_problems(where: str, text: str) -> list[str]:
    """Control tokens, unencodable characters (lone surrogates) and absurd lengths in one text field."""
    out = []
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        out.append(
            f"{where} holds an unencodable character {text[exc.start]!r} at position {exc.start} (a lone surrogate "
            "escape such as \\ud800); fix the escape"
        )
    match = CONTROL_TOKEN_RE.search(text)
    if match:
        out.append(
            f"{where} contains the chat control token {match.group(0)!r}, which would act as a real special token; "
            "remove it from the text"
        )
    if len(text) > MAX_TEXT_CHARS:
        out.append(f"{where} is {len(text)} characters long (limit {MAX_TEXT_CHARS}); shorten or split the record")
    return out


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


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "empty string" if not value else "string"
    if isinstance(value, list):
        return "empty array" if not value else "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _unknown_key_problem(where: str, key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{where} has unknown key {key!r}; {hint}allowed keys: {', '.join(allowed)}"


@dataclass
class JsonlData:
    """Result of :func:`read_jsonl`.

    Attributes:
        path: The jsonl file.
        records: Valid records (image paths joined onto the images root).
        skipped: One message per record dropped by ``skip_bad=True`` (bad image files).
    """

    path: Path
    records: list[Record]
    skipped: list[str] = field(default_factory=list)


@dataclass
class _PendingImage:
    line: int
    record_index: int
    where: str  # "conversations[t].images[k]"
    path: Path


def _check_turn(raw: Any, where: str, loc: str, problems: list[str], prior_images: int) -> dict[str, Any] | None:
    """Validate one turn object; return it normalised or ``None`` after appending problems."""
    if not isinstance(raw, dict):
        problems.append(
            f"{loc}: {where} must be an object with 'user', 'assistant' and optional 'images', got {_json_type(raw)}"
        )
        return None
    ok = True
    for key in raw:
        if key not in _TURN_KEYS:
            problems.append(f"{loc}: " + _unknown_key_problem(where, key, _TURN_KEYS))
            ok = False
    for key in ("user", "assistant"):
        if key not in raw:
            problems.append(f"{loc}: {where} is missing {key!r}; every turn needs 'user' and 'assistant' strings")
            ok = False
        elif not isinstance(raw[key], str) or not raw[key].strip():
            problems.append(f"{loc}: {where}.{key} must be a non-empty string, got {_json_type(raw[key])}")
            ok = False
    images = raw.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        problems.append(
            f"{loc}: {where}.images must be an array of path strings (relative to the images root), "
            f"got {_json_type(images)}"
        )
        ok = False
    answers = raw.get("answers")
    if answers is not None and (
        not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers)
    ):
        problems.append(
            f"{loc}: {where}.answers must be a non-empty array of non-empty strings, got {_json_type(answers)}"
        )
        ok = False
    if ok:
        for key in ("user", "assistant"):
            text_problems = _text_problems(f"{where}.{key}", raw[key])
            if text_problems:
                problems.extend(f"{loc}: {p}" for p in text_problems)
                ok = False
        tag = _IMAGE_TAG_IN_ANSWER_RE.search(raw["assistant"])
        if tag:
            problems.append(
                f"{loc}: {where}.assistant contains the image tag {tag.group(0)!r}; image tags belong in the user text"
            )
            ok = False
        for a, answer in enumerate(raw.get("answers") or []):
            for p in _text_problems(f"{where}.answers[{a}]", answer):
                problems.append(f"{loc}: {p}")
                ok = False
    if ok:
        tag_problem = image_tag_problem(raw["user"], len(images), prior_images)
        if tag_problem:
            problems.append(f"{loc}: {where}.user {tag_problem}")
            ok = False
    return raw if ok else None


def _split_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    data = path.read_bytes()
    for number, line in enumerate(data.split(b"\n"), start=1):
        yield number, line.rstrip(b"\r")


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
    if not path.exists():
        raise DataError(f"{path}: jsonl file not found; check the path (a data folder holds <name>_train.jsonl)")
    not_regular = check_regular_file(path, "jsonl file")  # checked before opening: a FIFO would block forever
    if not_regular:
        raise DataError(f"{path}: {not_regular}")
    source_default = default_source or path.stem.rsplit("_", 1)[0]

    problems: list[tuple[int, str]] = []
    records: list[Record] = []
    record_lines: list[int] = []
    pending: list[_PendingImage] = []
    first_line_of_id: dict[str, int] = {}
    saw_record = False

    for number, raw_line in _split_lines(path):
        loc = f"{path}:{number}"
        line_problems: list[str] = []
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append((number, f"{loc}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8"))
            continue
        if not text.strip():
            continue  # blank lines (e.g. the trailing newline) carry no record
        saw_record = True
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(
                (number, f"{loc}: invalid JSON ({exc.msg} at column {exc.colno}); write one JSON object per line")
            )
            continue
        except RecursionError:
            problems.append((number, f"{loc}: JSON nested too deeply; a record is a flat object with a list of turns"))
            continue
        except ValueError as exc:  # e.g. an integer of thousands of digits (Python's int conversion limit)
            problems.append((number, f"{loc}: unreadable JSON value ({exc}); fix the value"))
            continue
        if not isinstance(obj, dict):
            problems.append((number, f"{loc}: expected a JSON object per line, got {_json_type(obj)}"))
            continue
        for key in ("id", "source"):
            if isinstance(obj.get(key), str):
                line_problems.extend(f"{loc}: {p}" for p in _text_problems(repr(key), obj[key]))
        for key in obj:
            if key not in _RECORD_KEYS:
                line_problems.append(f"{loc}: " + _unknown_key_problem("record", key, _RECORD_KEYS))
        for key in ("id", "conversations"):
            if key not in obj:
                line_problems.append(f"{loc}: missing key {key!r}; every record needs 'id' and 'conversations'")
        record_id = obj.get("id")
        if "id" in obj and (not isinstance(record_id, str) or not record_id.strip()):
            line_problems.append(f"{loc}: 'id' must be a non-empty string, got {_json_type(record_id)}")
        elif isinstance(record_id, str):
            if record_id in first_line_of_id:
                line_problems.append(
                    f"{loc}: duplicate id {record_id!r} (first on line {first_line_of_id[record_id]}); ids must be unique"
                )
            else:
                first_line_of_id[record_id] = number
        source = obj.get("source", source_default)
        if not isinstance(source, str) or not source.strip():
            line_problems.append(f"{loc}: 'source' must be a non-empty string, got {_json_type(source)}")
        conversations = obj.get("conversations")
        turns: list[dict[str, Any]] = []
        if "conversations" in obj:
            if not isinstance(conversations, list) or not conversations:
                line_problems.append(
                    f"{loc}: 'conversations' must be a non-empty array of turns, got {_json_type(conversations)}"
                )
            else:
                prior_images = 0
                for t, raw_turn in enumerate(conversations):
                    turn = _check_turn(raw_turn, f"conversations[{t}]", loc, line_problems, prior_images)
                    if turn is not None:
                        turns.append(turn)
                        prior_images += len(turn.get("images", []))
                if prior_images > MAX_IMAGES_PER_RECORD:
                    line_problems.append(
                        f"{loc}: the record has {prior_images} images (limit {MAX_IMAGES_PER_RECORD} per record); "
                        "split it into several records"
                    )
        # Image paths are checked for safety even when other fields are broken: an escape must never go unnoticed.
        resolved: dict[tuple[int, int], Path] = {}
        if isinstance(conversations, list):
            for t, raw_turn in enumerate(conversations):
                images = raw_turn.get("images", []) if isinstance(raw_turn, dict) else []
                if not isinstance(images, list):
                    continue
                for k, rel in enumerate(images):
                    if not isinstance(rel, str):
                        continue
                    try:
                        resolved[(t, k)] = resolve_image_path(rel, root)
                    except PathProblem as exc:
                        line_problems.append(f"{loc}: conversations[{t}].images[{k}] {rel!r} {exc}")
        if line_problems:
            problems.extend((number, p) for p in line_problems)
            continue
        record_index = len(records)
        built_turns: list[Turn] = []
        for t, turn in enumerate(turns):
            image_paths = [resolved[(t, k)] for k in range(len(turn.get("images", [])))]
            for k, image_path in enumerate(image_paths):
                pending.append(_PendingImage(number, record_index, f"conversations[{t}].images[{k}]", image_path))
            built_turns.append(
                Turn(
                    user=with_image_tags(turn["user"], len(image_paths)),
                    assistant=turn["assistant"],
                    images=list(image_paths),
                    answers=list(turn.get("answers") or []),
                )
            )
        records.append(Record(id=record_id, source=source, conversations=built_turns))
        record_lines.append(number)

    if not saw_record and not problems:
        problems.append((1, f"{path}:1: the file has no records; add one JSON record per line"))

    bad_records: dict[int, list[str]] = {}
    if pending:
        if not root.is_dir():
            problems.append(
                (0, f"{root}: images folder not found (needed by {path}); put the images there or pass images_root")
            )
        else:
            image_problems = _check_images({p.path for p in pending}, max_pixels, check_images)
            for item in pending:
                reason = image_problems.get(item.path)
                if reason is not None:
                    message = f"{path}:{item.line}: {item.where} {item.path}: {reason}"
                    bad_records.setdefault(item.record_index, []).append(message)

    skipped: list[str] = []
    if bad_records:
        if skip_bad:
            skipped = [msgs[0] for _, msgs in sorted(bad_records.items())]
            records = [r for i, r in enumerate(records) if i not in bad_records]
        else:
            for index, msgs in bad_records.items():
                problems.extend((record_lines[index], m) for m in msgs)

    if problems:
        problems.sort(key=lambda item: item[0])
        raise_problems([p for _, p in problems], limit=max_listed)
    if skipped:
        logger.warning(
            "%s: skipped %d record(s) with bad images (skip_bad=True); first: %s", path, len(skipped), skipped[0]
        )
    if not records:
        raise DataError(f"{path}: every record was skipped for bad images ({skipped[0]}); fix the images")
    return JsonlData(path=path, records=records, skipped=skipped)


def _check_images(paths: set[Path], max_pixels: int, mode: ImageCheck) -> dict[Path, str]:
    """Check each distinct image once, in parallel (PIL releases the GIL while decoding)."""

    def check(p: Path) -> tuple[Path, str | None]:
        try:
            check_image_file(p, max_pixels=max_pixels, mode=mode)
            return p, None
        except ImageProblem as exc:
            return p, str(exc)

    ordered = sorted(paths)
    workers = min(8, os.cpu_count() or 1, len(ordered))
    if workers <= 1:
        results = [check(p) for p in ordered]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(check, ordered))
    return {p: reason for p, reason in results if reason is not None}


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

    Raises:
        DataError: The folder is missing, or there is no (or no unambiguous) file for the split.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found; pass a folder holding <name>_train.jsonl and images/")
    if prefer and (data_dir / f"{prefer}_{split}.jsonl").exists():
        return _inside(data_dir / f"{prefer}_{split}.jsonl", data_dir)
    matches = sorted(data_dir.glob(f"*_{split}.jsonl"))
    if len(matches) == 1:
        return _inside(matches[0], data_dir)
    example = f"{prefer or 'data'}_{split}.jsonl"
    if not matches:
        raise DataError(f"{data_dir}: no *_{split}.jsonl file; expected e.g. {example} next to images/")
    names = ", ".join(m.name for m in matches)
    raise DataError(f"{data_dir}: several *_{split}.jsonl files ({names}); pass the file explicitly")


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
    from phi3v_core.transaction import recover, replace_folder

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
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()  # mode from the umask, as the user's other folders
        yield tmp
        entries = sorted(p.name for p in tmp.iterdir())
        (tmp / MANIFEST_NAME).write_text(json.dumps({"command": "phi3v-convert", "entries": entries}))
        replace_folder(tmp, out_dir, "phi3v-convert")
    except BaseException:
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
