"""Draw the bundled sample dataset: five kinds of synthetic flowers on grassy backgrounds.

Deterministic (seeded): running it again rewrites byte-identical files. The kinds differ in
petal count, petal shape and colour; position, size, rotation, hue, lighting and background vary
per image so that a model must look at the flower rather than memorise pixels.

    python data/make_sample.py            # writes data/sample/{train,val}/<kind>/*.jpg
"""

from __future__ import annotations

import argparse
import colorsys
import math
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

# name: (petal count, petal hue 0-1, saturation, value, petal length/width ratio, centre colour)
KINDS = {
    "buttercup": (5, 0.14, 0.90, 0.95, 1.6, (120, 80, 20)),
    "cornflower": (8, 0.60, 0.75, 0.85, 2.6, (40, 30, 90)),
    "daisy": (13, 0.00, 0.02, 0.97, 3.2, (230, 180, 30)),
    "poppy": (4, 0.00, 0.90, 0.85, 1.2, (20, 20, 20)),
    "violet": (6, 0.78, 0.60, 0.65, 1.9, (240, 220, 90)),
}
SIZE = 64
SUPERSAMPLE = 4
COUNTS = {"train": 80, "val": 20}


def draw_flower(rng: random.Random, kind: str) -> Image.Image:
    petals, hue, sat, val, elongation, centre_rgb = KINDS[kind]
    big = SIZE * SUPERSAMPLE
    # background: grass green to earth brown, with blotches
    bg_hue = rng.uniform(0.18, 0.38)
    bg = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(bg_hue, rng.uniform(0.3, 0.7), rng.uniform(0.25, 0.6)))
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(6, 14)):
        x, y, r = rng.uniform(0, big), rng.uniform(0, big), rng.uniform(big * 0.05, big * 0.2)
        shade = tuple(max(0, min(255, c + rng.randint(-35, 35))) for c in bg)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=shade)

    cx = rng.uniform(0.35, 0.65) * big
    cy = rng.uniform(0.35, 0.65) * big
    radius = rng.uniform(0.28, 0.42) * big
    rotation = rng.uniform(0, 2 * math.pi)
    petal_len = radius * 0.62
    petal_w = petal_len / elongation
    h = (hue + rng.uniform(-0.03, 0.03)) % 1.0
    colour = tuple(
        int(c * 255)
        for c in colorsys.hsv_to_rgb(h, min(1, sat * rng.uniform(0.85, 1.1)), min(1, val * rng.uniform(0.8, 1.05)))
    )
    for i in range(petals):
        angle = rotation + 2 * math.pi * i / petals
        # centre of the petal ellipse, half-way out
        px, py = cx + math.cos(angle) * petal_len * 0.85, cy + math.sin(angle) * petal_len * 0.85
        points = []
        for t in range(24):
            a = 2 * math.pi * t / 24
            ex, ey = math.cos(a) * petal_len * 0.75, math.sin(a) * petal_w * 0.75
            points.append(
                (px + ex * math.cos(angle) - ey * math.sin(angle), py + ex * math.sin(angle) + ey * math.cos(angle))
            )
        edge = tuple(max(0, c - 40) for c in colour)
        draw.polygon(points, fill=colour, outline=edge)
    core = radius * rng.uniform(0.18, 0.24)
    draw.ellipse([cx - core, cy - core, cx + core, cy + core], fill=centre_rgb)

    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    img = img.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    # lighting: a global brightness change
    factor = rng.uniform(0.75, 1.2)
    return img.point(lambda v: max(0, min(255, int(v * factor))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "sample"))
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    total = 0
    for split, count in COUNTS.items():
        for kind_index, kind in enumerate(sorted(KINDS)):
            folder = out / split / kind
            folder.mkdir(parents=True)
            # one generator per (split, kind): adding a kind never changes the others
            rng = random.Random(f"{args.seed}-{split}-{kind_index}")
            for i in range(count):
                draw_flower(rng, kind).save(folder / f"{kind}_{i:03d}.jpg", quality=90, optimize=True)
                total += 1
    size = sum(p.stat().st_size for p in out.rglob("*.jpg"))
    print(f"wrote {total} images to {out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
