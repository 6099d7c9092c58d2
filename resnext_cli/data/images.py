"""File -> upright 8-bit RGB picture: any format Pillow reads, decoded robustly, with a short
reason for every file that cannot be read."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112
DEVICE_JPEG_MODES = ("RGB", "L")  # what the GPU's JPEG decoder turns into RGB (not CMYK)


def load_rgb(path: str | Path | BinaryIO, min_size: int | None = None) -> Image.Image:
    """Decode any Pillow-readable file to 8-bit RGB, upright per its EXIF orientation.

    With `min_size`, JPEGs are decoded at the smallest DCT scale whose shorter side stays
    >= min_size (Pillow's draft mode): a 4000x3000 photo decodes several times faster.
    """
    with bombs_are_errors(), Image.open(path) as img:
        if min_size and img.format == "JPEG":
            img.draft("RGB", (min_size, min_size))
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))


@contextlib.contextmanager
def bombs_are_errors() -> Iterator[None]:
    """Over Pillow's pixel limit is unreadable, not a warning: a decompression bomb."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB without surprises: alpha over white, 16-bit and float scaled rather than clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        low, high = img.getextrema() if img.mode != "I;16" else (0, 65535)
        if img.mode.startswith("I;16"):
            img = img.convert("I")
        scale = 255.0 / high if isinstance(high, (int, float)) and high > 255 else 1.0
        img = img.point(lambda v: v * scale).convert("L")
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
            with Image.open(path) as img:
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
    content = Path(path).read_bytes()
    try:
        with bombs_are_errors(), Image.open(io.BytesIO(content)) as img:
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
