"""Safe image access: path containment, decompression-bomb cap and corrupt/truncated detection.

Every file image goes through :func:`resolve_image_path` (the path must stay inside the images root, also after
following symlinks) and :func:`check_image_file` / :func:`open_image` (pixel cap read from the header *before* any
decoding; a full decode catches truncated files). Problems come back as one-line reasons that callers prefix with
``file:line``.
"""

from __future__ import annotations

import logging
import os
import threading
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from phi3v_core.errors import DataError
from phi3v_core.fs import check_regular_file

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageCheck",
    "ImageProblem",
    "PathProblem",
    "as_user_sees_it",
    "check_image_file",
    "missing_file_reason",
    "open_image",
    "resolve_image_path",
]

#: Default pixel cap (width × height). Equal to PIL's own warning threshold (~89.5 MP), but here it is a hard error:
#: a 1700×2200 document page is 3.7 MP, so anything near the cap is a decompression bomb or a mistake.
DEFAULT_MAX_PIXELS = 89_478_485

#: How thoroughly validation opens images: ``"full"`` decodes (finds truncation), ``"header"`` reads size/format only,
#: ``"none"`` only checks that the file exists.
ImageCheck = Literal["full", "header", "none"]

# PIL enforces its own global MAX_IMAGE_PIXELS inside Image.open. When a caller raises our cap above it, the global has
# to be lifted for that open; the lock keeps concurrent validators from restoring each other's value out of order.
_PIL_LIMIT_LOCK = threading.Lock()


logger = logging.getLogger(__name__)

#: EXIF orientations that swap width and height (rotated by 90 or 270 degrees, with or without a mirror).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def _warn_once(name: str, what: str, message: str) -> None:
    """Log ``message`` once per file and kind of change (a file is read every epoch)."""
    with _warned_lock:
        if (name, what) in _warned:
            return
        _warned.add((name, what))
    logger.warning("%s: %s", name, message)


def _orientation(image: Image.Image) -> int:
    if image.format == "PNG" and "exif" not in image.info:
        return 1  # PNG's getexif() would decode the pixels to look for a late eXIf chunk; header checks never decode
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except (OSError, ValueError, TypeError, SyntaxError):  # a broken EXIF block is ignored, as image viewers do
        return 1


def as_user_sees_it(image: Image.Image, name: str = "image") -> Image.Image:
    """The RGB pixels of a decoded image as a viewer shows them, warning (once per file) when pixels change.

    * EXIF orientation is applied (:func:`PIL.ImageOps.exif_transpose`), as ``transformers.image_utils.load_image``
      does: a phone photo stored sideways with an orientation tag trains upright.
    * Transparency is handled exactly as Microsoft's Phi-3-vision image processor does (``image.convert("RGB")``,
      which drops the alpha channel), so training matches the reference model; the warning says that transparent
      areas show the colour stored under them (often black) and how to flatten the image instead.

    Args:
        image: A decoded image.
        name: The file name for the warning.
    """
    orientation = _orientation(image)
    if orientation != 1:
        transposed = ImageOps.exif_transpose(image)
        if transposed is not None:
            _warn_once(name, "exif", f"rotated/mirrored by its EXIF orientation tag ({orientation}) as viewers show it")
            image = transposed
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        _warn_once(
            name,
            "alpha",
            "has transparency; like the reference Phi-3-vision processor, the alpha channel is dropped (transparent "
            "areas show the colour stored under them, often black); flatten it onto a background to choose the colour",
        )
    return image.convert("RGB") if image.mode != "RGB" else image


def missing_file_reason(path: Path, what: str = "file") -> str:
    """Why ``path`` cannot be found, named precisely: a broken symlink, a symlink loop, or a name that exists only in
    the other Unicode normalisation (NFC vs NFD, e.g. a macOS copy); else plain "not found".

    Args:
        path: The missing path.
        what: What the file is, for the message.
    """
    try:
        os.lstat(path)
        is_link = os.path.islink(path)
    except OSError:
        is_link = False
    if is_link:
        target = os.readlink(path)
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == 40:  # ELOOP
                return f"{what} is a symlink loop ({path} -> {target}); point the link at a real file"
        return f"{what} is a broken symlink (points to {target}, which does not exist); fix or replace the link"
    for form in ("NFC", "NFD"):
        other = unicodedata.normalize(form, path.name)
        if other != path.name and (path.parent / other).exists():
            return (
                f"{what} not found, but {other!r} exists with the same name in {form} Unicode normalisation "
                f"(different bytes); rename the file or write the name as {form}"
            )
    return f"{what} not found; fix the path or add the file"


class PathProblem(ValueError):
    """An image path that is unsafe (absolute, ``..``, symlink out of the root); never skippable."""


class ImageProblem(ValueError):
    """An image file that is missing, unreadable, truncated or too large; skippable with ``skip_bad``."""


def resolve_image_path(relative: str, images_root: Path) -> Path:
    """Join ``relative`` onto ``images_root`` after checking that it cannot escape the root.

    Args:
        relative: Path as written in the jsonl (POSIX separators, relative to the images root).
        images_root: The images folder.

    Returns:
        ``images_root / relative`` (not resolved, so messages show the path the user wrote).

    Raises:
        PathProblem: The path is empty, absolute, contains ``..`` or resolves (through symlinks) outside the root.
    """
    if not relative.strip():
        raise PathProblem("is an empty path; give the image path relative to the images root")
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute() or relative.startswith("\\"):
        raise PathProblem(f"is an absolute path; give paths relative to the images root {images_root}")
    if ".." in PurePosixPath(relative.replace("\\", "/")).parts:
        raise PathProblem(f"contains '..'; image paths must stay inside the images root {images_root}")
    if "\x00" in relative:
        raise PathProblem("contains a NUL character; fix the path string")
    joined = images_root / relative
    real_root = os.path.realpath(images_root)
    real = os.path.realpath(joined)
    if os.path.commonpath([real_root, real]) != real_root:
        raise PathProblem(
            f"resolves to {real}, outside the images root {real_root} (symlink); copy the file into the images root"
        )
    return joined


@contextmanager
def _pil_limit_lifted(needed: bool) -> Iterator[None]:
    if not needed:
        yield
        return
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # our own header check (below) is the cap that counts
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _external_decoder(image: Image.Image) -> str | None:
    """The outside program a format needs to decode (EPS: Ghostscript; stub formats: a registered handler), or None.

    Header checks (``phi3v-plan --data``) and full decodes (``phi3v-convert check``, finetune) must refuse the same
    files: such a header reads fine while its pixels decode only where that program happens to be installed.
    """
    if image.format in ("EPS", "PS"):
        return "Ghostscript"
    if isinstance(image, ImageFile.StubImageFile):
        return "a separately registered handler"
    return None


def _open_checked(path: Path, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and enforce ``max_pixels``; the caller decodes and closes."""
    if not path.exists():
        raise ImageProblem(missing_file_reason(path))
    if path.is_dir():
        raise ImageProblem("is a directory, not an image file; point to the image file")
    not_regular = check_regular_file(path, "image file")  # before opening: reading a FIFO would block forever
    if not_regular:
        raise ImageProblem(not_regular)
    pil_limit = Image.MAX_IMAGE_PIXELS
    lift = pil_limit is not None and max_pixels > pil_limit
    try:
        try:
            with _pil_limit_lifted(lift):
                image = Image.open(path)
        except Image.DecompressionBombError:
            # Re-read just the header without PIL's check so the message can quote the real size.
            with _pil_limit_lifted(True):
                image = Image.open(path)
    except UnidentifiedImageError:
        raise ImageProblem(
            "not a readable image (unknown or corrupt format); replace the file or remove the record"
        ) from None
    except PermissionError as exc:
        raise ImageProblem(f"cannot read the file ({exc.strerror}); fix its permissions") from None
    except OSError as exc:
        raise ImageProblem(f"cannot open the image ({exc}); replace the file or remove the record") from None
    external = _external_decoder(image)
    if external:
        image.close()
        raise ImageProblem(
            f"{image.format} image: its pixels decode only through {external}, an outside program that may not be installed; "
            "convert it to PNG or JPEG"
        )
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageProblem(
            f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} "
            f"(decompression-bomb guard); raise max_pixels if the image is genuine"
        )
    return image


def _decode(image: Image.Image) -> None:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL reports truncation as OSError("image file is truncated ...") and broken chunks as SyntaxError.
        raise ImageProblem(
            f"corrupt or truncated image data ({exc}); re-export the file or remove the record"
        ) from None


def check_image_file(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, mode: ImageCheck = "full") -> tuple[int, int]:
    """Validate one image file without keeping it in memory.

    Args:
        path: Image file.
        max_pixels: Largest allowed width × height, checked from the header before decoding.
        mode: ``"full"`` (decode every pixel; catches truncation), ``"header"`` or ``"none"`` (existence only).

    Returns:
        ``(width, height)``; ``(0, 0)`` with ``mode="none"``.

    Raises:
        ImageProblem: With a one-line reason (no location; callers add ``file:line``).
    """
    if mode == "none":
        not_regular = check_regular_file(path, "image file")
        if not_regular:
            raise ImageProblem(not_regular)
        return (0, 0)
    image = _open_checked(path, max_pixels)
    try:
        if mode == "full":
            _decode(image)
        width, height = image.size
        # The size as a viewer shows it (and as training sees it): a 90-degree EXIF rotation swaps the sides.
        return (height, width) if _orientation(image) in _SWAPPING_ORIENTATIONS else (width, height)
    finally:
        image.close()


def open_image(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file as RGB with the same safety checks as validation, as a viewer shows it
    (:func:`as_user_sees_it`: EXIF orientation applied, transparency handled as the reference processor does).

    Raises:
        DataError: ``"<path>: <reason>"`` when the file is missing, unreadable, truncated or too large.
    """
    try:
        image = _open_checked(path, max_pixels)
        try:
            _decode(image)
            seen = as_user_sees_it(image, str(path))
            return seen.copy() if seen is image else seen
        finally:
            image.close()
    except ImageProblem as exc:
        raise DataError(f"{path}: {exc}") from None
