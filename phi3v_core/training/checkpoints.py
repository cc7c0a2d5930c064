"""Checkpoints that prove they are complete: a manifest written last, and a check before every resume.

The HF Trainer writes a checkpoint as several files (weights, ``optimizer.pt``, ``scheduler.pt``, ``rng_state*.pth``,
``trainer_state.json``); a kill or full disk can leave any subset.
:class:`~phi3v_core.training.callbacks.CheckpointManifest` writes
``phi3v_checkpoint.json`` (every file's name, size and BLAKE2b hash, and the step) atomically after the Trainer's save, so its
presence means the save finished. :func:`checkpoint_problem` says why a checkpoint cannot be resumed from: a file
missing, cut off, of another size or content than the manifest says, a step that disagrees with the folder name or with
``max_steps``. ``resume="latest"`` skips such checkpoints with a warning naming them and uses the newest complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from phi3v_core.fs import weight_file_problem
from phi3v_core.io import atomic_write_json

__all__ = [
    "CHECKPOINT_MANIFEST", "checkpoint_problem", "checkpoint_step", "data_fingerprint",
    "file_digest", "find_resumable_checkpoint", "write_manifest",
]

#: Written last into every checkpoint folder: its files, their sizes and the step.
CHECKPOINT_MANIFEST = "phi3v_checkpoint.json"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin",
            "adapter_model.bin")  # fmt: skip


def checkpoint_step(folder: Path) -> int | None:
    """The step in a ``checkpoint-N`` folder name (``None`` for another name)."""
    number = Path(folder).name.removeprefix("checkpoint-")
    return int(number) if number.isdigit() else None


def file_digest(path: Path) -> str:
    """BLAKE2b (128-bit) of a file, streamed in 1 MiB blocks: fast enough for every resume, catches any changed bit."""
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(records: Iterable[Any]) -> str:
    """The training data's identity by content: every record's id and text, and each image's bytes.

    Image files count by their bytes (:func:`file_digest`, streamed, each distinct file once): an image edited in
    place to the same size, or copied over with its modification time kept, is a different data set. In-memory images
    (synthetic data) count by their pixels. Recorded with the run and compared on resume: a different data set
    (``--synthetic 24`` after 16, an edited jsonl or image) is refused instead of resumed silently.
    """
    digest = hashlib.blake2b(digest_size=16)
    file_digests: dict[str, str] = {}  # a frame or page shared by several records is read once
    for record in records:
        digest.update(json.dumps([record.id, [[t.user, t.assistant] for t in record.conversations]]).encode())
        for image in record.images:
            if isinstance(image, (str, os.PathLike)):
                name = os.fspath(image)
                if name not in file_digests:
                    try:
                        file_digests[name] = file_digest(Path(name))
                    except OSError as exc:  # the reader reports unreadable images; the identity just records it
                        file_digests[name] = f"unreadable:{exc.errno}"
                digest.update(f"{name}:{file_digests[name]}".encode())
            elif hasattr(image, "tobytes"):
                digest.update(f"{image.mode}:{image.size}".encode() + image.tobytes())
            else:  # a lazily decoded image (a video frame): its stable name and size
                digest.update(f"{getattr(image, 'name', '')}:{getattr(image, 'size', '')}".encode())
    return digest.hexdigest()


def write_manifest(folder: Path, step: int) -> Path:
    """Record every file of checkpoint ``folder`` (relative name → size and BLAKE2b) and ``step``, atomically, last."""
    files = {
        str(path.relative_to(folder)): {"size": path.stat().st_size, "blake2b": file_digest(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != CHECKPOINT_MANIFEST and not path.name.startswith(".")
    }
    return atomic_write_json(folder / CHECKPOINT_MANIFEST, {"step": step, "files": files})


def _required_problem(folder: Path) -> str | None:
    """A checkpoint without a manifest (older versions, or killed just before it): the files the Trainer writes."""
    names = {p.name for p in folder.iterdir()}
    if not names & set(_WEIGHTS):
        return "no model or adapter weights (the save was interrupted)"
    deepspeed = (folder / "latest").is_file() or any(n.startswith("global_step") for n in names)
    needed = ["scheduler.pt"] if deepspeed else ["optimizer.pt", "scheduler.pt"]
    missing = [n for n in needed if n not in names]
    if not any(n.startswith("rng_state") for n in names):
        missing.append("rng_state.pth")
    if missing:
        return f"missing {', '.join(missing)} (resuming would restart the optimizer or schedule)"
    return None


def _manifest_problem(folder: Path, manifest: Any) -> str | None:
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return f"{CHECKPOINT_MANIFEST} is unreadable"
    for name, entry in files.items():
        # older manifests hold the size alone
        size, digest = (entry.get("size"), entry.get("blake2b")) if isinstance(entry, dict) else (entry, None)
        path = folder / name
        if not _plain_relative(name) or not path.is_file():
            return f"{name} is missing (listed in {CHECKPOINT_MANIFEST})"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {CHECKPOINT_MANIFEST} says {size} (changed or cut off)"
        if digest is not None and file_digest(path) != digest:
            return f"{name} does not match its hash in {CHECKPOINT_MANIFEST} (changed or damaged after the save)"
    return None


def _plain_relative(name: str) -> bool:
    return isinstance(name, str) and not Path(name).is_absolute() and ".." not in Path(name).parts


def checkpoint_problem(folder: Path, max_steps: int = -1) -> str | None:
    """Why checkpoint ``folder`` cannot be resumed from (``None`` when it is complete and consistent). Reads headers.

    Args:
        folder: A ``checkpoint-N`` folder.
        max_steps: The run's step budget (``<= 0``: by epochs, not checked).
    """
    folder = Path(folder)
    state_path = folder / "trainer_state.json"
    try:
        state = json.loads(state_path.read_text())
        step = int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{state_path}: missing or cut off (the save was interrupted)"
    named = checkpoint_step(folder)
    if named is not None and step != named:
        return f"{state_path} says step {step} but the folder is {folder.name} (edited or mixed up)"
    if max_steps > 0 and step > max_steps:
        return f"step {step} is past max_steps {max_steps} (from another run, or edited)"
    try:
        manifest = json.loads((folder / CHECKPOINT_MANIFEST).read_text())
    except FileNotFoundError:
        manifest = None
    except (OSError, ValueError):
        manifest = {}
    if manifest is not None:
        reason = _manifest_problem(folder, manifest)
        if reason is None and manifest.get("step") != step:
            reason = f"{CHECKPOINT_MANIFEST} says step {manifest.get('step')}, trainer_state.json says {step}"
    else:
        reason = _required_problem(folder)
    if reason is not None:
        return f"{folder}: {reason}"
    for path in sorted(folder.iterdir()):
        if path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            reason = weight_file_problem(path)
            if reason:
                return f"{path}: {reason}"
    return None


def find_resumable_checkpoint(
    output_dir: str | Path, max_steps: int = -1, on_skip: Callable[[Path, str], None] | None = None
) -> Path | None:
    """The newest ``checkpoint-N`` of ``output_dir`` that :func:`checkpoint_problem` accepts, or ``None``.

    The one completeness rule of resuming: each newer folder it passes over is reported to ``on_skip(folder, why)``.
    """
    folders = sorted((step, path) for path in Path(output_dir).glob("checkpoint-*")
                     if (step := checkpoint_step(path)) is not None)  # fmt: skip
    for _step, folder in reversed(folders):
        reason = checkpoint_problem(folder, max_steps)
        if reason is None:
            return folder
        if on_skip is not None:
            on_skip(folder, reason)
    return None
