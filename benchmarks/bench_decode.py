"""CPU JPEG decode: Pillow (full, and with draft mode as resnext's CPU path uses it) vs torchcodec
vs torchvision's deprecated decoder, on photos as given and the same photos as 3000x2000 JPEGs.

    python benchmarks/bench_decode.py ../shared/data/flowers5
    python benchmarks/bench_decode.py ../shared/data/flowers5 --large-count 40 --repeats 5

Each decoder turns the file's bytes (read once, in memory) into upright 8-bit RGB pixels, one
image at a time in this process (one thread: decoding runs in loader workers, one per core).
"Pillow draft" is `data.images.load_rgb(path, min_size)`: the JPEG decoded at the smallest DCT
scale whose shorter side stays >= the resize size (256 for a 224 crop), i.e. what the CPU path
does; the tensor decoders have no reduced decode, so their row is the full picture. Reported:
milliseconds per image (median over repeats of the whole set) and the speed relative to
Pillow's full decode.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torchvision.transforms.functional as F
from PIL import Image

from resnext_cli.data.folders import list_images
from resnext_cli.data.images import load_rgb


def decoders(min_size: int) -> dict[str, Callable[[bytes], object]]:
    found: dict[str, Callable[[bytes], object]] = {
        "Pillow (full)": lambda data: F.pil_to_tensor(load_rgb(io.BytesIO(data))),
        f"Pillow draft (>= {min_size} px)": lambda data: F.pil_to_tensor(load_rgb(io.BytesIO(data), min_size)),
    }
    try:
        from torchcodec.decoders import decode_jpeg as codec

        found["torchcodec"] = lambda data: codec(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except ImportError:
        print("torchcodec is not installed: pip install 'resnext-cli[gpu]'")
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        found["torchvision (deprecated)"] = lambda data: decode_jpeg(
            torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
            apply_exif_orientation=True)  # fmt: skip
    except ImportError:
        pass
    return found


def time_set(decode: Callable[[bytes], object], blobs: list[bytes], repeats: int) -> float:
    """Median over `repeats` passes of the milliseconds per image."""
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for data in blobs:
            decode(data)
        runs.append((time.perf_counter() - started) * 1000 / len(blobs))
    return statistics.median(runs)


def large_copies(paths: list[str], count: int, size: tuple[int, int]) -> list[bytes]:
    out = []
    for path in paths[:count]:
        with Image.open(path) as img:
            buffer = io.BytesIO()
            img.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
            out.append(buffer.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder of JPEG photos (searched recursively)")
    parser.add_argument("--large-count", type=int, default=40)
    parser.add_argument("--large-size", default="3000x2000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-size", type=int, default=256, help="Pillow draft's target (the resize size)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # torchvision's deprecation warning, once per call
    paths = [p for p in list_images(args.folder, recursive=True) if p.lower().endswith((".jpg", ".jpeg"))]
    width, height = (int(v) for v in args.large_size.split("x"))
    sets = {
        f"as given ({len(paths)} photos)": [Path(p).read_bytes() for p in paths],
        f"{width}x{height} ({args.large_count} photos)": large_copies(paths, args.large_count, (width, height)),
    }
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}; one thread, bytes in memory, median of {args.repeats} passes")
    print("\n| photos | decoder | ms / image | vs Pillow full |\n|---|---|---|---|")
    for name, blobs in sets.items():
        results = {label: time_set(fn, blobs, args.repeats) for label, fn in decoders(args.min_size).items()}
        for label, ms in results.items():
            print(f"| {name} | {label} | {ms:.2f} | {results['Pillow (full)'] / ms:.2f}x |")


if __name__ == "__main__":
    main()
