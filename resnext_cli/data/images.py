"""File -> upright 8-bit RGB picture: any format Pillow reads, decoded robustly, with a short
reason for every file that cannot be read. Every image file any command reads is opened here
(`open_image_file`): only regular files, of a bounded size."""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112
DEVICE_JPEG_MODES = ("RGB", "L")  # what the GPU's JPEG decoder turns into RGB (not CMYK)
# No picture within Pillow's pixel limit (89 M pixels; more is refused as a bomb) needs more
# bytes than this, even uncompressed at 4 bytes a pixel (358 MB); a larger file is not read.
MAX_FILE_BYTES = 1 << 30
DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # more than 8 bits a sample


class RefusedFile(OSError):
    """A path that is not read at all: not a regular file, or larger than any image can be.
    Its message is the whole reason (`describe_failure` shows it without a class name)."""


def open_image_file(path: str | Path) -> BinaryIO:
    """The file, opened for reading, if it is a regular file of at most MAX_FILE_BYTES.

    A FIFO named x.jpg would make a plain open() wait for a writer forever, and a link to
    /dev/zero would never end: the file is opened without blocking and checked on the open
    descriptor (so a file swapped between a check and the open cannot slip through)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RefusedFile(f"not a regular file ({_file_kind(info.st_mode)})")
        if info.st_size > MAX_FILE_BYTES:
            raise RefusedFile(f"{info.st_size / 2**30:.1f} GiB: larger than any image resnext reads "
                              f"({MAX_FILE_BYTES >> 30} GiB)")  # fmt: skip
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "not a file")


def read_image_bytes(path: str | Path) -> bytes:
    """The whole file, read with a bound (a regular file may still grow while it is read)."""
    with open_image_file(path) as handle:
        content = handle.read(MAX_FILE_BYTES + 1)
    if len(content) > MAX_FILE_BYTES:
        raise RefusedFile(f"larger than any image resnext reads ({MAX_FILE_BYTES >> 30} GiB)")
    return content


@contextlib.contextmanager
def open_image(source: str | Path | BinaryIO) -> Iterator[Image.Image]:
    """Pillow's image of a path (through `open_image_file`) or of bytes in memory; bombs are
    errors, and a file that is no image is worded as Pillow words it for a path."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(bombs_are_errors())
        handle = source if hasattr(source, "read") else stack.enter_context(open_image_file(source))
        try:
            img = stack.enter_context(Image.open(handle))
        except UnidentifiedImageError:
            if hasattr(source, "read"):
                raise
            raise unidentified(source) from None
        yield img


def load_rgb(path: str | Path | BinaryIO, min_size: int | None = None) -> Image.Image:
    """Decode any Pillow-readable file to 8-bit RGB, upright per its EXIF orientation.

    With `min_size`, JPEGs are decoded at the smallest DCT scale whose shorter side stays
    >= min_size (Pillow's draft mode): a 4000x3000 photo decodes several times faster.
    """
    with open_image(path) as img:
        return decode_rgb(img, min_size)


def decode_rgb(img: Image.Image, min_size: int | None = None) -> Image.Image:
    """An opened image's pixels as `load_rgb` gives them (check-data decodes through it too, so
    that what it calls readable is what training reads)."""
    if min_size and img.format == "JPEG":
        img.draft("RGB", (min_size, min_size))
    full_scale = sample_range(img) if img.mode in DEEP_MODES else None  # before the tiles go
    img.load()
    return to_rgb(ImageOps.exif_transpose(img), full_scale)


@contextlib.contextmanager
def bombs_are_errors() -> Iterator[None]:
    """Over Pillow's pixel limit is unreadable, not a warning: a decompression bomb."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def sample_range(img: Image.Image) -> float:
    """The value that stands for full white in a deep (more than 8-bit) grayscale image: the
    range of the type its file stores, whatever the pixels hold, so that one picture is
    equally bright from any container. 16-bit samples: 65535 (PNG, TIFF I;16/I;16B, PPM);
    32-bit integers: 2**31 - 1 (2**32 - 1 unsigned); floats: 1.0. Read from the undecoded
    tiles' raw mode where there are any (a 16-bit source can open as Pillow's 32-bit "I")."""
    raw = img.tile[0].args if img.tile else None
    raw = raw[0] if isinstance(raw, tuple) and raw else raw
    if not isinstance(raw, str) or not raw.startswith(("I", "F")):
        raw = img.mode
    bits = re.search(r";(\d+)", raw)
    depth = int(bits.group(1)) if bits else (32 if raw in ("I", "F") else 16)
    if raw.startswith("F") and (not bits or raw.endswith("F")):
        return 1.0  # floating-point samples
    signed = depth == 32 and raw in ("I", "I;32S", "I;32BS", "I;32NS") or raw.endswith("S")
    return float(2 ** (depth - 1) - 1 if signed else 2**depth - 1)


def to_rgb(img: Image.Image, full_scale: float | None = None) -> Image.Image:
    """RGB without surprises: alpha over white; deep grayscale (16-bit, 32-bit, float) scaled by
    `full_scale` (default: `sample_range` of the mode), so 0 is black and full scale white."""
    if img.mode in DEEP_MODES:
        values = np.asarray(img, dtype=np.float64)
        scale = 255.0 / (full_scale or sample_range(img))
        img = Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def typical_short_side(paths: list[str], sample: int = 16) -> int | None:
    """Median shorter side of up to `sample` files spread over `paths`, from their headers
    only (no pixel is decoded); None when none of them can be opened."""
    step = max(1, len(paths) // sample)
    sides = []
    for path in paths[::step][:sample]:
        try:
            with open_image(path) as img:
                sides.append(min(img.size))
        except Exception:  # noqa: BLE001 - an unreadable file is reported when it is decoded
            continue
    return sorted(sides)[len(sides) // 2] if sides else None


def unidentified(path: str | Path) -> UnidentifiedImageError:
    """Pillow's error for a file that is no image, worded as `Image.open(path)` words it (opened
    from bytes in memory, Pillow would name its buffer instead of the file)."""
    return UnidentifiedImageError(f"cannot identify image file {str(path)!r}")


def describe_failure(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    if isinstance(exc, RefusedFile):
        return text
    return f"{name}: {text}" if text else name


@dataclass(frozen=True)
class Header:
    """What a file's first bytes tell, without decoding its pixels: enough to draw its crop and
    to hand a JPEG to the GPU's decoder."""

    content: bytes
    device_jpeg: bool  # a complete RGB or grayscale JPEG, which the GPU decoder takes
    orientation: int  # EXIF orientation, 1 = stored upright
    size: tuple[int, int]  # upright width, height
    draft_size: tuple[int, int]  # upright size of `load_rgb(path, min_size)`'s reduced decode


def read_header(path: str | Path, min_size: int | None = None) -> Header:
    """The file's bytes and header; raises as `load_rgb` would for a file that is not an image
    (or a decompression bomb), so such files are reported alike on either path."""
    content = read_image_bytes(path)
    try:
        with open_image(io.BytesIO(content)) as img:
            size, jpeg, mode = img.size, img.format == "JPEG", img.mode
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)
            if min_size and jpeg:
                img.draft("RGB", (min_size, min_size))
            draft = img.size
    except UnidentifiedImageError:
        raise unidentified(path) from None
    orientation = orientation if orientation in range(2, 9) else 1
    if orientation >= 5:  # a quarter turn: width and height swap
        size, draft = size[::-1], draft[::-1]
    complete = b"\xff\xd9" in content[-64:]  # the end-of-image marker: not truncated
    device_jpeg = jpeg and mode in DEVICE_JPEG_MODES and complete
    return Header(content, device_jpeg, orientation, size, draft)
