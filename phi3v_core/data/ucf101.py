"""Convert a local UCF-101 (subset) folder into the recipe's jsonl format (``convert_ucf101``, the CookBook's convert_ucf101.py).

Input layout: ``<src>/{train,val,test}/<Class>/*.avi``. Output (written atomically)::

    <out_dir>/ucf101_{train,val,test}.jsonl
    <out_dir>/images/{split}/{Class}/{video stem}.{k}.jpg      k = 0..7

Each video becomes one record: ``id = f"{split}-{i:010d}"`` (i runs over train, then val, then test),
``source = "ucf101"``, one turn with the 8 frame paths (relative to ``images/``), the prompt
``"Classify the video into one of the following classes: " + ", ".join(classes) + "."`` and the class as answer.

Frames: ``int(x) for x in arange(0, total, total / 8)`` — 8 evenly spaced frames starting at frame 0. ``total`` comes
from the container metadata, but every video is decoded to the end anyway and, when the metadata is 0 or disagrees
with the decoded count, the real count is used (the recipe trusted the metadata, which is 0 or wrong for some files).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from phi3v_core.data.jsonl import atomic_directory, check_output_dir, raise_problems
from phi3v_core.data.synthetic import ucf101_prompt
from phi3v_core.errors import ConfigError, DataError
from phi3v_core.fs import overlap_problem

__all__ = [
    "SPLITS",
    "ConvertSummary",
    "VideoJob",
    "convert_ucf101",
    "decode_frames",
    "plan_ucf101",
    "sample_frame_indices",
]

#: Splits in the order ids are assigned.
SPLITS = ("train", "val", "test")
_VIDEO_SUFFIXES = (".avi",)


def sample_frame_indices(total: int, num_frames: int = 8) -> list[int]:
    """The recipe's frame choice: ``[int(x) for x in np.arange(0, total, total / num_frames)]``.

    For videos shorter than ``num_frames`` indices repeat (each index still yields a frame, so the count is exact).
    """
    if total < 1:
        raise ValueError(f"a video needs at least one frame, got {total}")
    return [int(x) for x in np.arange(0, total, total / num_frames)][:num_frames]


@dataclass(frozen=True)
class VideoJob:
    """One video to convert."""

    split: str
    class_name: str
    path: Path


@dataclass
class ConvertSummary:
    """Result of :func:`convert_ucf101` (also the CLI's ``--json`` output)."""

    out_dir: str
    classes: list[str]
    videos: dict[str, int]
    frames_per_video: int
    recounted: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> str:
        """One-line JSON."""
        return json.dumps(asdict(self))


def plan_ucf101(src: str | Path) -> tuple[list[str], list[VideoJob]]:
    """Discover classes and videos; validate the layout before anything is decoded or written.

    Returns:
        ``(classes, jobs)``: sorted class names over all splits, and videos ordered by split, class, file name.

    Raises:
        DataError: Missing source folder, no split folders, or no videos.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: source folder not found; pass the folder that holds train/, val/ and test/")
    split_dirs = [src / s for s in SPLITS if (src / s).is_dir()]
    if not split_dirs:
        nested = sorted(p.name for p in src.iterdir() if p.is_dir() and any((p / s).is_dir() for s in SPLITS))
        hint = f" (found them in {src / nested[0]}; pass that folder)" if nested else ""
        raise DataError(f"{src}: no train/, val/ or test/ folder{hint}; expected <src>/<split>/<Class>/*.avi")
    classes = sorted({c.name for d in split_dirs for c in d.iterdir() if c.is_dir()})
    jobs = [
        VideoJob(split_dir.name, class_name, video)
        for split_dir in split_dirs
        for class_name in classes
        if (split_dir / class_name).is_dir()
        for video in sorted((split_dir / class_name).iterdir())
        if video.is_file() and video.suffix.lower() in _VIDEO_SUFFIXES
    ]
    if not jobs:
        raise DataError(f"{src}: no videos found; expected <src>/<split>/<Class>/*.avi")
    return classes, jobs


def _metadata_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return int(container.streams.video[0].frames or 0)


def _decode(path: Path, wanted: Sequence[int]) -> tuple[dict[int, Image.Image], int]:
    """Decode the whole video once; keep RGB images of the ``wanted`` frame numbers; return them and the frame count."""
    import av

    wanted_set = set(wanted)
    kept: dict[int, Image.Image] = {}
    count = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if count in wanted_set:
                kept[count] = frame.to_image()  # RGB PIL image
            count += 1
    return kept, count


def decode_frames(path: str | Path, num_frames: int = 8) -> tuple[list[Image.Image], bool]:
    """Decode the recipe's evenly spaced frames of one video.

    Args:
        path: Video file.
        num_frames: Frames to take.

    Returns:
        ``(frames, recounted)``: the RGB frames, and whether the container's frame count was missing or wrong (the
        decoded count was used instead).

    Raises:
        DataError: The file cannot be opened or decoded, or has no video frames.
    """
    import av

    path = Path(path)
    try:
        total = _metadata_frames(path)
        indices = sample_frame_indices(total, num_frames) if total > 0 else []
        kept, decoded = _decode(path, indices)
        if decoded == 0:
            raise DataError(f"{path}: no decodable video frames; re-encode or remove the video")
        recounted = decoded != total
        if recounted:
            indices = sample_frame_indices(decoded, num_frames)
            if not set(indices) <= kept.keys():
                kept, _ = _decode(path, indices)  # second pass only when the metadata was wrong
    except (av.error.FFmpegError, IndexError, OSError) as exc:
        reason = "no video stream" if isinstance(exc, IndexError) else (getattr(exc, "strerror", None) or str(exc))
        raise DataError(f"{path}: cannot decode the video ({reason}); re-encode or remove it") from None
    return [kept[i] for i in indices], recounted


def convert_ucf101(
    src: str | Path,
    out_dir: str | Path,
    *,
    num_frames: int = 8,
    overwrite: bool = False,
    on_video: Callable[[VideoJob], None] | None = None,
) -> ConvertSummary:
    """Convert ``<src>/{train,val,test}/<Class>/*.avi`` into the recipe's jsonl folder at ``out_dir``.

    Everything is validated first; frames go to a temporary sibling folder that replaces ``out_dir`` only when every
    video converted. Videos that fail are all reported together and nothing is written.

    Args:
        src: Source folder.
        out_dir: Output folder (new or empty unless ``overwrite``).
        num_frames: Frames per video (the recipe uses 8).
        overwrite: Replace a non-empty ``out_dir``.
        on_video: Called after each video (progress reporting).

    Returns:
        A :class:`ConvertSummary`.

    Raises:
        ConfigError: Bad ``num_frames`` or ``out_dir``.
        DataError: Bad source layout or undecodable videos (all listed).
    """
    start = time.perf_counter()
    if num_frames < 1:
        raise ConfigError(f"num_frames must be >= 1, got {num_frames}")
    src, out_dir = Path(src), Path(out_dir)
    overlap = overlap_problem(src, out_dir, "--src", "--out_dir")  # either direction: --overwrite must never eat --src
    if overlap:
        raise ConfigError(overlap)
    check_output_dir(out_dir, overwrite=overwrite)
    classes, jobs = plan_ucf101(src)
    prompt = ucf101_prompt(classes)
    problems: list[str] = []
    recounted: list[str] = []
    lines: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for i, job in enumerate(jobs):
            try:
                frames, was_recounted = decode_frames(job.path, num_frames)
            except DataError as exc:
                problems.append(str(exc))
                if on_video:
                    on_video(job)
                continue
            if was_recounted:
                recounted.append(str(job.path))
            rel_dir = Path(job.split) / job.class_name
            (tmp / "images" / rel_dir).mkdir(parents=True, exist_ok=True)
            rel_paths = []
            for k, frame in enumerate(frames):
                rel = rel_dir / f"{job.path.stem}.{k}.jpg"
                frame.save(tmp / "images" / rel)
                rel_paths.append(rel.as_posix())
            record = {
                "id": f"{job.split}-{i:010d}",
                "source": "ucf101",
                "conversations": [{"images": rel_paths, "user": prompt, "assistant": job.class_name}],
            }
            lines.setdefault(job.split, []).append(json.dumps(record))
            counts[job.split] = counts.get(job.split, 0) + 1
            if on_video:
                on_video(job)
        # Raising inside the block removes the temporary folder: a partial conversion never lands in out_dir.
        raise_problems(problems)
        for split, split_lines in lines.items():
            (tmp / f"ucf101_{split}.jsonl").write_text("".join(line + "\n" for line in split_lines), encoding="utf-8")
    return ConvertSummary(
        out_dir=str(out_dir),
        classes=classes,
        videos=counts,
        frames_per_video=num_frames,
        recounted=recounted,
        seconds=round(time.perf_counter() - start, 3),
    )
