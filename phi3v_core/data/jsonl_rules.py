"""The rules a jsonl record must meet: one function per step of the reader's per-line pipeline.

:mod:`phi3v_core.data.jsonl_reader` runs every line through ``decode -> record -> turns -> paths``; each step here
returns what it found plus a list of one-line problems (already prefixed with ``file:line``), so the reader can
collect every problem of a file and raise once. :func:`whole_file_problems` runs first and names the file-level
mistakes (a gzip file, a JSON array, CR-only line endings, UTF-16, a macOS ``._`` resource fork) that would otherwise
surface as one confusing error per line.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi3v_core.data.images import PathProblem, resolve_image_path
from phi3v_core.data.records import image_tag_problem

__all__ = [
    "CONTROL_TOKEN_RE",
    "MAX_IMAGES_PER_RECORD",
    "MAX_TEXT_CHARS",
    "ParsedRecord",
    "check_record",
    "check_turns",
    "decode_line",
    "json_type",
    "resolve_paths",
    "text_problems",
    "whole_file_problems",
]

RECORD_KEYS = ("id", "source", "conversations")
TURN_KEYS = ("user", "assistant", "images", "answers")

#: Most images one record may hold (the recipe's largest is 8 video frames; each image costs up to ~2.5k tokens).
MAX_IMAGES_PER_RECORD = 32
#: Longest text field in characters: a record far beyond any model context is reported before tokenizing it.
MAX_TEXT_CHARS = 500_000
#: Chat control tokens of the Phi-3 tokenizer: inside user/assistant text they would become real special tokens (an
#: answer ending early, a fake turn). Such text is rejected, not escaped: the fix belongs in the data.
CONTROL_TOKEN_RE = re.compile(r"<\|(?:endoftext|user|assistant|system|end|placeholder\d+)\|>|</?s>|<unk>")
_IMAGE_TAG_IN_ANSWER_RE = re.compile(r"<\|image_\d+\|>")


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages (``"empty string"``, ``"array"``, ...)."""
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


def text_problems(where: str, text: str) -> list[str]:
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


def _unknown_key_problem(where: str, key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{where} has unknown key {key!r}; {hint}allowed keys: {', '.join(allowed)}"


# --------------------------------------------------------------------------------------------------- whole file
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"


def whole_file_problems(path: Path, data: bytes) -> list[str]:
    """File-level mistakes named once, before any line is read (each would otherwise fail every line).

    Args:
        path: The jsonl file (for the message).
        data: Its bytes.
    """
    if path.name.startswith("._"):
        return [
            f"{path}: is a macOS resource-fork file ('._' AppleDouble, written when copying to a non-Mac disk), not "
            "data; delete it (or copy with COPYFILE_DISABLE=1)"
        ]
    if data.startswith(_GZIP_MAGIC):
        return [f"{path}: is gzip-compressed; decompress it first (gunzip -k {path.name})"]
    if data.startswith(_ZIP_MAGIC):
        return [f"{path}: is a zip archive, not a jsonl text file; extract it first"]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return [f"{path}: is UTF-16 encoded (byte-order mark); save it as UTF-8"]
    start = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    # A JSON array of records (pretty-printed, or ``[{...}, ...]`` on one line); a line such as ``[1, 2]`` is left
    # to the per-line check.
    if start.startswith(b"[") and (
        start[1:].lstrip(b" \t\r\n").startswith(b"{") or start.split(b"\n")[0].strip() == b"["
    ):
        return [
            f"{path}: holds one JSON array, not JSON Lines; write one record object per line "
            "(e.g. jq -c '.[]' in.json > out.jsonl)"
        ]
    if b"\r" in data and b"\n" not in data.rstrip(b"\r\n") and data.count(b"\r") > 1:
        return [f"{path}: uses CR-only line endings (classic Mac); convert them to LF (e.g. tr '\\r' '\\n')"]
    return []


# --------------------------------------------------------------------------------------------------- per line
def decode_line(loc: str, line: int, raw: bytes) -> tuple[Any, list[str]]:
    """Step 1: bytes -> JSON value. Returns ``(value, problems)``; ``value`` is ``None`` on failure or a blank line."""
    try:
        text = raw.decode("utf-8-sig" if line == 1 else "utf-8")  # a UTF-8 BOM (Windows editors) is harmless
    except UnicodeDecodeError as exc:
        return None, [f"{loc}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8"]
    if not text.strip():
        return None, []
    try:
        return json.loads(text), []
    except json.JSONDecodeError as exc:
        return None, [f"{loc}: invalid JSON ({exc.msg} at column {exc.colno}); write one JSON object per line"]
    except RecursionError:
        return None, [f"{loc}: JSON nested too deeply; a record is a flat object with a list of turns"]
    except ValueError as exc:  # e.g. an integer of thousands of digits (Python's int conversion limit)
        return None, [f"{loc}: unreadable JSON value ({exc}); fix the value"]


@dataclass
class ParsedRecord:
    """What the record step found in one line (``turns`` filled by :func:`check_turns`)."""

    record_id: Any
    source: Any
    conversations: Any
    turns: list[dict[str, Any]] = field(default_factory=list)


def check_record(
    loc: str, obj: Any, source_default: str, first_line_of_id: dict[str, int], line: int
) -> tuple[ParsedRecord | None, list[str]]:
    """Step 2: the record object's keys, id (unique in the file) and source.

    ``first_line_of_id`` is updated with a new id. Returns ``(None, problems)`` when ``obj`` is not an object.
    """
    if not isinstance(obj, dict):
        return None, [f"{loc}: expected a JSON object per line, got {json_type(obj)}"]
    problems: list[str] = []
    for key in ("id", "source"):
        if isinstance(obj.get(key), str):
            problems.extend(f"{loc}: {p}" for p in text_problems(repr(key), obj[key]))
    problems.extend(f"{loc}: " + _unknown_key_problem("record", k, RECORD_KEYS) for k in obj if k not in RECORD_KEYS)
    problems.extend(
        f"{loc}: missing key {k!r}; every record needs 'id' and 'conversations'"
        for k in ("id", "conversations")
        if k not in obj
    )
    record_id = obj.get("id")
    if "id" in obj and (not isinstance(record_id, str) or not record_id.strip()):
        problems.append(f"{loc}: 'id' must be a non-empty string, got {json_type(record_id)}")
    elif isinstance(record_id, str):
        if record_id in first_line_of_id:
            problems.append(
                f"{loc}: duplicate id {record_id!r} (first on line {first_line_of_id[record_id]}); ids must be unique"
            )
        else:
            first_line_of_id[record_id] = line
    source = obj.get("source", source_default)
    if not isinstance(source, str) or not source.strip():
        problems.append(f"{loc}: 'source' must be a non-empty string, got {json_type(source)}")
    return ParsedRecord(record_id, source, obj.get("conversations"), []), problems


def _turn_shape_problems(raw: dict[str, Any], where: str) -> list[str]:
    """Keys and types of one turn object."""
    problems = [_unknown_key_problem(where, key, TURN_KEYS) for key in raw if key not in TURN_KEYS]
    for key in ("user", "assistant"):
        if key not in raw:
            problems.append(f"{where} is missing {key!r}; every turn needs 'user' and 'assistant' strings")
        elif not isinstance(raw[key], str) or not raw[key].strip():
            problems.append(f"{where}.{key} must be a non-empty string, got {json_type(raw[key])}")
    images = raw.get("images", [])
    if isinstance(images, str):
        problems.append(f"{where}.images must be an array of path strings, got a string; write [{json.dumps(images)}]")
    elif not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        problems.append(
            f"{where}.images must be an array of path strings (relative to the images root), got {json_type(images)}"
        )
    answers = raw.get("answers")
    if answers is not None and (
        not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers)
    ):
        problems.append(f"{where}.answers must be a non-empty array of non-empty strings, got {json_type(answers)}")
    return problems


def _turn_text_problems(raw: dict[str, Any], where: str, prior_images: int) -> list[str]:
    """Text content of a well-shaped turn: control tokens, image tags in the answer, tags vs images."""
    problems: list[str] = []
    for key in ("user", "assistant"):
        problems.extend(text_problems(f"{where}.{key}", raw[key]))
    tag = _IMAGE_TAG_IN_ANSWER_RE.search(raw["assistant"])
    if tag:
        problems.append(
            f"{where}.assistant contains the image tag {tag.group(0)!r}; image tags belong in the user text"
        )
    for a, answer in enumerate(raw.get("answers") or []):
        problems.extend(text_problems(f"{where}.answers[{a}]", answer))
    if not problems:
        tag_problem = image_tag_problem(raw["user"], len(raw.get("images", [])), prior_images)
        if tag_problem:
            problems.append(f"{where}.user {tag_problem}")
    return problems


def check_turns(loc: str, parsed: ParsedRecord) -> list[str]:
    """Step 3: every turn of ``parsed.conversations``; valid turns are stored in ``parsed.turns``."""
    if parsed.conversations is None:
        return []  # the missing key was reported by the record step
    conversations = parsed.conversations
    if not isinstance(conversations, list) or not conversations:
        return [f"{loc}: 'conversations' must be a non-empty array of turns, got {json_type(conversations)}"]
    problems: list[str] = []
    prior_images = 0
    for t, raw in enumerate(conversations):
        where = f"conversations[{t}]"
        if not isinstance(raw, dict):
            problems.append(
                f"{loc}: {where} must be an object with 'user', 'assistant' and optional 'images', got {json_type(raw)}"
            )
            continue
        turn_problems = _turn_shape_problems(raw, where) or _turn_text_problems(raw, where, prior_images)
        problems.extend(f"{loc}: {p}" for p in turn_problems)
        if not turn_problems:
            parsed.turns.append(raw)
            prior_images += len(raw.get("images", []))
    if prior_images > MAX_IMAGES_PER_RECORD:
        problems.append(
            f"{loc}: the record has {prior_images} images (limit {MAX_IMAGES_PER_RECORD} per record); "
            "split it into several records"
        )
    return problems


def resolve_paths(loc: str, conversations: Any, root: Path) -> tuple[dict[tuple[int, int], Path], list[str]]:
    """Step 4: every image path joined onto ``root`` after the safety rules (checked even when other fields are
    broken: an escape must never go unnoticed). Returns ``{(turn, k): path}`` and the problems."""
    resolved: dict[tuple[int, int], Path] = {}
    problems: list[str] = []
    if not isinstance(conversations, list):
        return resolved, problems
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
                problems.append(f"{loc}: conversations[{t}].images[{k}] {rel!r} {exc}")
    return resolved, problems
