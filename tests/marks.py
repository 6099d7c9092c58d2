"""A synthetic set where the class is decided only by a small coloured mark at a random place on
a textured background: where a heatmap should point is known for every picture. Used by
tests/test_explain.py (the pointing game) and benchmarks/bench_explain.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from resnext_cli.data.transforms import centre_crop_box, resize_size

MARK_COLOURS = {"red": (225, 35, 35), "blue": (35, 70, 235), "yellow": (235, 215, 25)}


def texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Blotches of muted colour with grain on top: nothing as saturated as a mark."""
    low = rng.normal(0, 1, (height // 8 + 2, width // 8 + 2, 3)) * 25 + 120
    low = Image.fromarray(low.clip(0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    blotches = np.asarray(low, dtype=np.float64)
    grey = blotches.mean(axis=2, keepdims=True)
    grain = rng.normal(0, 18, (height, width, 1)) + rng.normal(0, 6, (height, width, 3))
    return grey + (blotches - grey) * 0.4 + grain


def make_mark_dataset(
    root: Path, img_size: int = 96, train_per_class: int = 60, val_per_class: int = 20,
    mark: int = 30, size: tuple[int, int] = (116, 104), seed: int = 0,
) -> dict[str, list[int]]:  # fmt: skip
    """root/{train,val}/<colour>/*: photos of `size` (not square, so the centre crop cuts the
    longer side) with a `mark`-pixel square of the class's colour placed at random inside the
    part the model sees at `img_size`. A third of the val photos are JPEGs stored turned, with
    the EXIF orientation that turns them upright. Returns {path: [x0, y0, x1, y1]}, the mark in
    the upright photo's pixels (edges), also written to root/marks.json."""
    rng = np.random.default_rng(seed)
    width, height = size
    x0, y0, x1, y1 = centre_crop_box(width, height, img_size, resize_size(img_size))
    low_x, low_y = int(np.ceil(x0)) + 1, int(np.ceil(y0)) + 1
    high_x, high_y = int(x1) - mark - 1, int(y1) - mark - 1
    marks: dict[str, list[int]] = {}
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name, colour in MARK_COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                picture = texture(rng, width, height)
                x, y = int(rng.integers(low_x, high_x + 1)), int(rng.integers(low_y, high_y + 1))
                picture[y : y + mark, x : x + mark] = np.array(colour) + rng.normal(0, 8, (mark, mark, 3))
                upright = Image.fromarray(picture.clip(0, 255).astype(np.uint8))
                path = _save(upright, folder / f"{name}_{i:03d}", turned=split == "val" and i % 3 == 0)
                marks[str(path)] = [x, y, x + mark, y + mark]
    (root / "marks.json").write_text(json.dumps(marks, indent=1) + "\n")
    return marks


def _save(upright: Image.Image, stem: Path, turned: bool) -> Path:
    if not turned:
        path = stem.with_suffix(".png")
        upright.save(path)
        return path
    path = stem.with_suffix(".jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers turn it 90 degrees clockwise: store it turned the other way
    upright.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif.tobytes())
    return path


def pointing_game(entries: list[dict], marks: dict[str, list[int]]) -> float:
    """Share of explain.json entries whose peak lies on the mark of their photo."""
    hits = 0
    for entry in entries:
        x0, y0, x1, y1 = marks[entry["path"]]
        peak = entry["peak"]
        hits += peak is not None and x0 <= peak[0] < x1 and y0 <= peak[1] < y1
    return hits / len(entries)


def chance(marks: dict[str, list[int]], img_size: int = 96, size: tuple[int, int] = (116, 104)) -> float:
    """What a peak drawn at random in the part of the photo the model sees scores: the mark's
    share of that area."""
    x0, y0, x1, y1 = centre_crop_box(*size, img_size, resize_size(img_size))
    side = next(iter(marks.values()))
    return (side[2] - side[0]) * (side[3] - side[1]) / ((x1 - x0) * (y1 - y0))
